"""Conformance suite for every registered env adapter, plus adapter-specific checks.

One engine instance per env is shared by the whole module (a ScienceWorld JVM costs ~2 s and
~1.8 GB; a TextWorld game ~5 s to generate), so the file stays well under a minute on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from evolve.envs import Env, available_envs, make_env, register_env
from evolve.errors import EnvCrashed, EnvError, UnknownEnvError, UnknownTaskError
from evolve.schema import Observation, Privileged, Split

HAS_JAVA = shutil.which("java") is not None
NO_JAVA = "ScienceWorld needs a Java runtime (`java` is not on PATH)"


def _env_kwargs(tmp: Path) -> dict[str, dict[str, Any]]:
    """Small, quick configurations for the suite; an env not listed here runs with its defaults."""
    return {
        # Small games: generation (~3 s each, mostly the Inform7 compiler) dominates this file's time.
        "textworld": {
            "n_train": 2,
            "n_dev": 1,
            "n_test": 1,
            "quest_length": 3,
            "world_size": 3,
            "nb_objects": 5,
            "cache_dir": str(tmp / "tw-cache"),
        },
        # Two tasks whose gold-path search is fast; two variations per split.
        "scienceworld": {"task_names": ["lifespan-longest-lived", "find-plant"], "max_variations": 2},
    }


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Env]]:
    """``get(name)``: the module's one instance of each env, made on first use."""
    made: dict[str, Env] = {}
    kwargs = _env_kwargs(tmp_path_factory.mktemp("envs"))

    def get(name: str) -> Env:
        if name == "scienceworld" and not HAS_JAVA:
            pytest.skip(NO_JAVA)
        if name not in made:
            made[name] = make_env(name, **kwargs.get(name, {}))
        return made[name]

    yield get
    for env in made.values():
        env.close()


@pytest.fixture(params=available_envs())
def env(request: pytest.FixtureRequest, instances: Callable[[str], Env]) -> Env:
    return instances(request.param)


def _roundtrip(obs: Observation) -> None:
    assert Observation.model_validate_json(obs.model_dump_json()) == obs


def _replay(env: Env, task_id: str) -> tuple[Observation, list[str], Observation]:
    first = env.reset(task_id)
    gold = env.privileged().gold_actions
    obs = first
    for action in gold:
        obs = env.step(action)
        _roundtrip(obs)
        if obs.state.done:
            break
    return first, gold, obs


# --------------------------------------------------------------------------- registry


def test_registry_lists_both_benchmarks() -> None:
    assert {"textworld", "scienceworld"} <= set(available_envs())


def test_unknown_env_is_one_clear_line() -> None:
    with pytest.raises(UnknownEnvError) as e:
        make_env("no-such-bench")
    msg = str(e.value)
    assert "\n" not in msg and "no-such-bench" in msg and "textworld" in msg and "scienceworld" in msg


def test_register_env_adds_a_name() -> None:
    register_env("tw-alias-for-test", "evolve.envs.textworld_env:TextWorldEnv")
    try:
        assert "tw-alias-for-test" in available_envs()
        with pytest.raises(ValueError):
            register_env("tw-alias-for-test", "x:y")
    finally:
        from evolve import envs

        envs._REGISTRY.pop("tw-alias-for-test")


def test_import_is_cheap() -> None:
    code = (
        "import sys, evolve.envs, evolve.envs.textworld_env, evolve.envs.scienceworld_env;"
        "heavy = [m for m in ('textworld', 'scienceworld', 'py4j', 'jericho') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --------------------------------------------------------------------------- conformance


def test_conforms_to_protocol(env: Env) -> None:
    assert isinstance(env, Env)
    assert env.name in available_envs()


def test_tasks_per_split_are_nonempty_stable_and_disjoint(env: Env) -> None:
    ids: dict[Split, set[str]] = {}
    for split in Split:
        tasks = env.tasks(split)
        assert tasks, f"{env.name} has no {split.value} tasks"
        assert [t.id for t in tasks] == [t.id for t in env.tasks(split.value)]  # stable, str accepted
        assert all(t.env == env.name and t.split == split for t in tasks)
        ids[split] = {t.id for t in tasks}
        assert len(ids[split]) == len(tasks)
    assert not ids[Split.train] & ids[Split.dev]
    assert not ids[Split.train] & ids[Split.test]
    assert not ids[Split.dev] & ids[Split.test]


def test_reset_gives_goal_and_admissible_actions(env: Env) -> None:
    task = env.tasks(Split.train)[0]
    obs = env.reset(task)
    assert isinstance(obs, Observation)
    assert obs.text and obs.goal
    assert obs.admissible_actions
    assert not obs.state.done and obs.reward == 0.0
    assert obs.state.location
    _roundtrip(obs)
    again = env.reset(task.id)  # a task id works as well as a Task
    assert again.goal == obs.goal and again.text == obs.text


def test_step_with_admissible_action(env: Env) -> None:
    obs = env.reset(env.tasks(Split.train)[0])
    safe = [a for a in obs.admissible_actions or [] if a in ("look", "look around", "inventory")]
    action = safe[0] if safe else (obs.admissible_actions or [""])[0]
    nxt = env.step(action)
    assert isinstance(nxt, Observation) and nxt.text
    assert nxt.goal == obs.goal
    assert nxt.info.get("admissible") is True
    assert isinstance(nxt.reward, float)
    _roundtrip(nxt)


def test_invalid_action_does_not_crash(env: Env) -> None:
    env.reset(env.tasks(Split.train)[0])
    obs = env.step("xyzzy frobnicate the quux")
    assert isinstance(obs, Observation) and obs.text
    assert obs.info.get("admissible") is False
    assert not obs.state.done
    _roundtrip(obs)
    assert isinstance(env.step(""), Observation)


def test_gold_replay_wins_two_tasks(env: Env) -> None:
    for task in env.tasks(Split.train)[:2]:
        first, gold, last = _replay(env, task.id)
        assert gold, f"{task.id}: no gold actions"
        assert last.state.done and last.state.won and not last.state.lost, f"{task.id}: gold replay lost"
        assert isinstance(env.privileged(), Privileged)
        # Gold actions live only in privileged(), never inside what a policy sees.
        assert "walkthrough" not in first.info and gold != first.admissible_actions
        after = env.step("look")  # stepping a finished episode is harmless
        assert after.state.done and after.reward == 0.0


def test_rewards_add_up_to_the_score(env: Env) -> None:
    task = env.tasks(Split.train)[1]
    first = env.reset(task)
    total = 0.0
    obs = first
    for action in env.privileged().gold_actions:
        obs = env.step(action)
        total += obs.reward
    assert obs.state.score - first.state.score == pytest.approx(total)
    if obs.state.max_score is not None:
        assert obs.state.score == pytest.approx(obs.state.max_score)


def test_unknown_task_raises_one_line(env: Env) -> None:
    for bad in ("definitely-not-a-task", f"{env.name}-nope"):
        with pytest.raises(UnknownTaskError) as e:
            env.reset(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", available_envs())
def test_step_before_reset_is_a_clear_error(name: str, tmp_path: Path) -> None:
    fresh = make_env(name, **_env_kwargs(tmp_path).get(name, {}))  # constructing starts no engine
    with pytest.raises(EnvError):
        fresh.step("look")
    fresh.close()


# --------------------------------------------------------------------------- textworld


def test_textworld_task_ids_roundtrip() -> None:
    from evolve.envs.textworld_env import GameSpec

    for task_id in (
        "tw-custom-s12-q3-w5-o10",
        "tw-treasure_hunter-s3-l12",
        "tw-cooking-s7-r2-t1-g6-open-cut-fvalid",
        "tw-cooking-s0-r1-t0-g1",
    ):
        assert GameSpec.parse(task_id).task_id == task_id
    for bad in (
        "tw-custom-s1-q3",
        "tw-custom-s1-q3-w5-o10-zz",
        "tw-unknown-s1",
        "tw-treasure_hunter-s1-l31",
        "tw-cooking-s1-r1-t1-g5",
        "sw-boil-v0",
    ):
        with pytest.raises(UnknownTaskError):
            GameSpec.parse(bad)


def test_textworld_splits_use_disjoint_seeds(tmp_path: Path) -> None:
    from evolve.envs.textworld_env import TextWorldEnv

    env = TextWorldEnv(game_type="tw-cooking", n_train=3, n_dev=3, n_test=3, cache_dir=tmp_path)
    seeds = {s: {t.params["seed"] for t in env.tasks(s)} for s in Split}
    assert not seeds[Split.train] & seeds[Split.dev] and not seeds[Split.dev] & seeds[Split.test]
    # Cooking dev/test games draw unseen foods (tw-cooking's own food split).
    assert [t.params["split"] for t in (env.tasks(s)[0] for s in Split)] == ["train", "valid", "test"]
    with pytest.raises(EnvError):
        TextWorldEnv(game_type="tw-zork")


def test_textworld_cache_dir_follows_evolve_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from evolve.envs.textworld_env import TextWorldEnv, default_cache_dir

    monkeypatch.setenv("EVOLVE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "textworld"
    assert TextWorldEnv().cache_dir == tmp_path / "textworld"
    assert TextWorldEnv(cache_dir=tmp_path / "x").cache_dir == tmp_path / "x"


def test_textworld_state_is_structured(instances: Callable[[str], Env]) -> None:
    env = instances("textworld")
    obs = env.reset(env.tasks(Split.train)[0])
    s = obs.state
    assert f"at(P, {s.location})" in s.facts
    assert all(f"in({item}, I)" in s.facts for item in s.inventory)
    assert s.max_score and s.max_score > 0 and s.moves == 0
    assert "$$$$" not in obs.text  # the ASCII banner is stripped
    priv = env.privileged()
    assert priv.facts and priv.facts[0].startswith("win: ")


def test_textworld_generation_is_cached_and_race_safe(tmp_path: Path) -> None:
    # Two processes generate the same game at once: both succeed and one complete game remains.
    code = (
        "import sys; from evolve.envs.textworld_env import TextWorldEnv;"
        "print(TextWorldEnv(cache_dir=sys.argv[1]).game_file('tw-custom-s5-q1-w1-o1'))"
    )
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    game = Path(paths.pop())
    assert game.exists() and game.with_suffix(".json").exists()
    assert sorted(os.listdir(game.parent)) == sorted([game.name, game.with_suffix(".json").name])


# --------------------------------------------------------------------------- scienceworld


@pytest.mark.skipif(not HAS_JAVA, reason=NO_JAVA)
def test_scienceworld_split_port_matches_engine(instances: Callable[[str], Env]) -> None:
    from evolve.envs.scienceworld_env import split_variations

    env: Any = instances("scienceworld")
    env.reset(env.tasks(Split.train)[0])
    sw = env._sw
    for name in env.task_names:
        sw.load(name, 0, "")
        ours = split_variations(int(sw.get_max_variations(name)))
        assert ours[Split.train] == list(sw.get_variations_train())
        assert ours[Split.dev] == list(sw.get_variations_dev())
        assert ours[Split.test] == list(sw.get_variations_test())


@pytest.mark.skipif(not HAS_JAVA, reason=NO_JAVA)
def test_scienceworld_state_and_midepisode_privileged(instances: Callable[[str], Env]) -> None:
    env: Any = instances("scienceworld")
    env._gold.clear()  # force the lazy gold search + replay path
    obs = env.reset("sw-find-plant-v1")
    assert obs.state.location and f"at({obs.state.location})" in obs.state.facts
    assert all(f"has({item})" in obs.state.facts for item in obs.state.inventory)
    assert obs.state.max_score == 100.0 and not obs.goal.startswith("Task Description")
    moved = env.step("look around")
    priv = env.privileged()  # reloads with the gold path and replays the one step
    assert priv.notes == "" and priv.gold_actions
    assert any(f.startswith(("todo(", "done(")) for f in priv.facts)
    again = env.step("look around")  # the episode carries on where it was (objects come in any order)
    assert sorted(again.text.splitlines()) == sorted(moved.text.splitlines())
    assert again.state.score == moved.state.score


@pytest.mark.skipif(not HAS_JAVA, reason=NO_JAVA)
def test_scienceworld_wrong_focus_is_lost(instances: Callable[[str], Env]) -> None:
    env = instances("scienceworld")
    obs = env.reset("sw-find-plant-v1")
    plants = set(env.privileged().gold_actions)
    wrong = next(a for a in obs.admissible_actions or [] if a.startswith("focus on") and a not in plants)
    obs = env.step(wrong)
    assert obs.state.lost and obs.state.done and not obs.state.won and obs.state.score < 0


@pytest.mark.skipif(not HAS_JAVA, reason=NO_JAVA)
def test_scienceworld_jvm_death_raises_envcrashed_then_recovers(instances: Callable[[str], Env]) -> None:
    env: Any = instances("scienceworld")
    task = env.tasks(Split.train)[0]
    env.reset(task)
    proc = env._sw._gateway.java_process
    proc.kill()
    proc.wait(timeout=30)
    with pytest.raises(EnvCrashed) as e:
        env.step("look around")
    assert "\n" not in str(e.value) and "JVM" in str(e.value)
    obs = env.reset(task)  # a fresh JVM
    assert obs.admissible_actions and env._sw._gateway.java_process.pid != proc.pid


def test_scienceworld_look_parser() -> None:
    from evolve.envs.scienceworld_env import parse_inventory, parse_look

    look = (
        "This room is called the kitchen. In it, you see: \n"
        "\tthe agent\n"
        "\ta substance called air\n"
        "\ta counter. On the counter is: a bowl (containing a red apple, a banana), a drawer.\n"
        "\ta sink, which is turned off. In the sink is: nothing.\n"
        "\ta toilet. In the toilet is: a drain, which is open, a substance called water.\n"
        "\ta freezer. The freezer door is closed. \n"
        "You also see:\n"
        "\tA door to the hallway (that is open)\n"
    )
    location, visible, facts = parse_look(look)
    assert location == "kitchen"
    assert visible[:4] == ["air", "counter", "bowl", "red apple"]
    assert "door to hallway" in visible and "agent" not in visible
    for fact in (
        "at(kitchen)",
        "in(red apple, bowl)",
        "in(bowl, counter)",
        "in(water, toilet)",
        "off(sink)",
        "closed(freezer)",
        "open(door to hallway)",
    ):
        assert fact in facts
    assert not any("which" in f for f in facts)
    inv = "In your inventory, you see:\n\tan orange\n\ta thermometer, currently reading a temperature of 10 degrees\n"
    assert parse_inventory(inv) == ["orange", "thermometer"]
