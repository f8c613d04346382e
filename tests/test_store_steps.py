"""Every read path of the store gives back exactly the trajectories that were written, field by field
(which fields count as set included), for real TextWorld episodes and edge cases: get, list,
filters, search hits, and an export/import round trip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel
from test_store import make_traj, observation, open_store

from evolve.envs import make_env
from evolve.schema import Trajectory
from evolve.stores import ExperienceStore


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """``got`` equals ``want`` field by field, down to every nested model's type and set fields."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, BaseModel):
        assert got.model_fields_set == want.model_fields_set, f"{path}: fields set"
        for name in type(want).model_fields:
            assert_same(getattr(got, name), getattr(want, name), f"{path}.{name}")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys"
        for k in want:
            assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: length"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and np.isnan(want):
        assert np.isnan(got), path
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def assert_same_trajectory(got: Trajectory, want: Trajectory, from_store: bool = True) -> None:
    """What a store gives back for ``want``: its JSON round trip (every field set), and a pre_state
    equal to the previous post_state is that very object, as the store always restored it."""
    ref = Trajectory.model_validate_json(want.model_dump_json())
    assert got == want
    assert_same(got, ref, got.id)
    for i in range(1, len(got.steps) if from_store else 0):
        if want.steps[i].pre_state == want.steps[i - 1].post_state:
            assert got.steps[i].pre_state is got.steps[i - 1].post_state


@pytest.fixture(scope="module")
def tw_episodes(tmp_path_factory: pytest.TempPathFactory) -> list[Trajectory]:
    """Real TextWorld episodes (one small game): the oracle's, and a random policy's wandering."""
    from evolve.agents.graph import run_episode
    from evolve.agents.policies import OraclePolicy, RandomPolicy

    game = {"quest_length": 3, "world_size": 3, "nb_objects": 5}
    cache = str(tmp_path_factory.mktemp("tw-cache"))
    env = make_env("textworld", n_train=1, n_dev=1, n_test=1, cache_dir=cache, **game)
    try:
        (task,) = env.tasks("train")
        return [
            run_episode(env, OraclePolicy(), task, max_steps=20, seed=1),
            run_episode(env, RandomPolicy(seed=0), task, max_steps=25, seed=2),
        ]
    finally:
        env.close()


def edge_case_trajectory() -> Trajectory:
    """Edge cases a step encoding can get wrong: admissible lists None, empty, [""], with a newline
    inside an action; a pre_state that is not the previous post_state; an empty text; texts with
    newlines, quotes and non-ASCII."""
    t = make_traj(11, n_steps=7)
    lists: list[list[str] | None] = [
        None,
        [],
        [""],
        ["open the\ndoor", "look"],
        ["", "a", ""],
        ["é ü", '"q"'],
    ]
    for i, adm in enumerate(lists):
        post = t.steps[i].post_state.model_copy(update={"admissible_actions": adm})
        t.steps[i] = t.steps[i].model_copy(update={"post_state": post})
        if i + 1 < len(t.steps):
            t.steps[i + 1] = t.steps[i + 1].model_copy(update={"pre_state": post})
    last = t.steps[6].post_state.model_copy(update={"text": "", "admissible_actions": ["look"]})
    t.steps[6] = t.steps[6].model_copy(update={"post_state": last})
    odd = observation(np.random.default_rng(5), "attic", [], 0, 0)
    odd = odd.model_copy(update={"text": 'line one\nline "two" \\ naïve'})
    t.steps[3] = t.steps[3].model_copy(update={"pre_state": odd})  # not the previous post_state
    return t


@pytest.fixture
def written(
    tmp_path: Path, tw_episodes: list[Trajectory]
) -> Iterator[tuple[ExperienceStore, list[Trajectory]]]:
    trajs = [*tw_episodes, edge_case_trajectory(), make_traj(3, n_steps=9)]
    path = tmp_path / "s.duckdb"
    with open_store(path) as s:
        s.add_trajectories(trajs)
    with open_store(path) as s:  # read back from the file, not from what this process wrote
        yield s, trajs


def test_real_episodes_round_trip_field_by_field_through_every_read_path(
    written: tuple[ExperienceStore, list[Trajectory]], tmp_path: Path
) -> None:
    s, trajs = written
    assert all(t.steps and t.steps[0].post_state.admissible_actions for t in trajs[:2])
    by_id = {t.id: t for t in trajs}
    for t in trajs:
        assert_same_trajectory(s.get_trajectory(t.id), t)
    listed = s.trajectories()
    assert sorted(t.id for t in listed) == sorted(by_id)
    for got in listed:
        assert_same_trajectory(got, by_id[got.id])
    for got in s.trajectories(ids=[trajs[0].id, trajs[2].id], outcome=[trajs[0].outcome.value, "failure"]):
        assert_same_trajectory(got, by_id[got.id])
    # search finds trajectories by their summary; the hits' ids read back the same objects
    hits = s.search(trajs[0].goal, kind="trajectory", k=10, mode="keyword")
    assert trajs[0].id in {h.id for h in hits}
    for got in s.trajectories(ids=[h.id for h in hits]):
        assert_same_trajectory(got, by_id[got.id])
    # export_jsonl -> import_jsonl into another store -> read: the same again
    assert s.export_jsonl(tmp_path / "t.jsonl") == len(trajs)
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    for line in lines:
        got = Trajectory.model_validate_json(line)
        assert_same_trajectory(got, by_id[got.id], from_store=False)
    with open_store(tmp_path / "other.duckdb") as o:
        assert o.import_jsonl(tmp_path / "t.jsonl") == len(trajs)
        for got in o.trajectories():
            assert_same_trajectory(got, by_id[got.id])
