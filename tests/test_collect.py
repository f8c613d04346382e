"""Collection at scale: process workers, determinism, resume, crash recovery, store writes."""

from __future__ import annotations

import importlib.util
import os

import pytest

from evolve.agents.base import NoHooks
from evolve.agents.collect import EnvSpec, collect, done_episodes, plan_episodes
from evolve.envs import register_env
from evolve.envs.textworld_env import TextWorldEnv
from evolve.errors import ConfigError, EnvCrashed
from evolve.schema import Outcome
from evolve.stores import ExperienceStore

TW = {"name": "textworld", "n_train": 4}


class PidHooks(NoHooks):
    """Marks each trajectory with the process that built the hooks (a worker, not the parent)."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def on_episode_end(self, traj) -> None:
        traj.metadata["hooks_pid"] = self.pid


def actions(trajs):
    return [(t.task_id, t.seed, [s.action.text for s in t.steps]) for t in trajs]


def test_plan_is_seeded_and_cycles():
    tasks = ["a", "b", "c"]
    p1, p2 = plan_episodes(tasks, 7, seed=5), plan_episodes(tasks, 7, seed=5)
    assert [j.key for j in p1] == [j.key for j in p2]
    assert sorted(j.task_id for j in p1[:3]) == tasks
    assert [j.seed for j in p1] == [5, 5, 5, 6, 6, 6, 7]
    assert plan_episodes(tasks, None, seed=1, skip_done={("a", 1)}) == [
        j for j in plan_episodes(tasks, None, seed=1) if j.task_id != "a"
    ]


def test_env_spec_forms():
    assert EnvSpec.parse("textworld") == EnvSpec(name="textworld")
    assert EnvSpec.parse({"name": "textworld", "n_train": 2}).kwargs == {"n_train": 2}
    assert EnvSpec.parse({"name": "textworld", "kwargs": {"n_train": 2}}).kwargs == {"n_train": 2}
    with pytest.raises(ConfigError):
        EnvSpec.parse({"kwargs": {}})


def test_two_workers_match_one_worker_and_record(tmp_path):
    path = tmp_path / "c.duckdb"
    kw = dict(max_steps=6, seed=7, progress=False)
    one = collect(TW, {"kind": "random"}, workers=1, **kw)
    two = collect(
        TW,
        {"kind": "random"},
        workers=2,
        store=path,
        namespace="c",
        run_id="r2",
        hooks_factory=PidHooks,
        **kw,
    )
    assert len(one) == len(two) == 4
    assert actions(one) == actions(two)
    assert all(t.metadata["hooks_pid"] != os.getpid() for t in two)
    with ExperienceStore(path, namespace="c") as store:
        stored = store.trajectories(run_id="r2")
        assert sorted(actions(stored)) == sorted(actions(two))
        assert all(
            len(t.steps) == len(s.steps)
            for t, s in zip(sorted(stored, key=lambda t: t.id), sorted(two, key=lambda t: t.id))
        )


def test_oracle_collect_succeeds_and_resume_skips_done(tmp_path):
    path = tmp_path / "r.duckdb"
    kw = dict(store=path, namespace="r", run_id="run-a", max_steps=20, progress=False)
    first = collect(TW, {"kind": "oracle"}, n_episodes=2, **kw)
    assert len(first) == 2 and all(t.outcome == Outcome.success for t in first)
    with ExperienceStore(path, namespace="r") as store:
        done = done_episodes(store, run_id="run-a")
    assert done == {(t.task_id, t.seed) for t in first}
    rest = collect(TW, {"kind": "oracle"}, n_episodes=4, skip_done=done, **kw)
    assert len(rest) == 2 and not {(t.task_id, t.seed) for t in rest} & done
    with ExperienceStore(path, namespace="r") as store:
        keys = [(t.task_id, t.seed) for t in store.trajectories(run_id="run-a")]
        assert len(keys) == len(set(keys)) == 4
        again = collect(
            TW, {"kind": "oracle"}, n_episodes=4, skip_done=done_episodes(store), **kw | {"store": store}
        )
        assert again == [] and store.count_trajectories() == 4


class CrashOnce(TextWorldEnv):
    """The first instance crashes on its 2nd step; instances built after it (restarts) work."""

    built = 0

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        CrashOnce.built += 1
        self.generation, self.steps = CrashOnce.built, 0

    def step(self, action: str):
        self.steps += 1
        if self.generation == 1 and self.steps == 2:
            raise EnvCrashed("game process died (test)")
        return super().step(action)


def test_worker_restarts_crashed_env_and_continues(tmp_path):
    register_env("crash-once", CrashOnce, overwrite=True)
    CrashOnce.built = 0
    trajs = collect(
        {"name": "crash-once", "n_train": 3},
        {"kind": "oracle"},
        max_steps=20,
        progress=False,
        store=tmp_path / "x.duckdb",
    )
    assert [t.outcome for t in trajs] == [Outcome.error, Outcome.success, Outcome.success]
    assert len(trajs[0].steps) == 2 and trajs[0].steps[-1].error.startswith("EnvCrashed")
    assert CrashOnce.built == 2
    with ExperienceStore(tmp_path / "x.duckdb") as store:
        assert store.count_trajectories(outcome="error") == 1


def test_unknown_task_is_recorded_as_error_and_run_continues():
    trajs = collect(
        TW, {"kind": "oracle"}, tasks=["tw-nonsense", "tw-custom-s0-q5-w5-o10"], max_steps=20, progress=False
    )
    by_id = {t.task_id: t for t in trajs}
    assert by_id["tw-nonsense"].outcome == Outcome.error
    assert "UnknownTaskError" in by_id["tw-nonsense"].metadata["error"]
    assert by_id["tw-custom-s0-q5-w5-o10"].outcome == Outcome.success


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_ray_address_without_ray_says_how_to_install():
    with pytest.raises(ConfigError, match=r"pip install 'evolve-agents\[ray\]'"):
        collect(TW, {"kind": "random"}, ray_address="auto", progress=False)


class DieOnTask(TextWorldEnv):
    """Kills its whole worker process (like a segfault in the engine) on one task's first step."""

    def __init__(self, die_on: str = "", **kw) -> None:
        super().__init__(**kw)
        self.die_on = die_on

    def step(self, action: str):
        if self._task is not None and self._task.id == self.die_on:
            os._exit(3)
        return super().step(action)


def test_pool_survives_a_worker_process_dying():
    die_on = "tw-custom-s1-q5-w5-o10"
    # A "module:Class" env name is what worker processes can import (nothing registered there).
    env = {"name": "test_collect:DieOnTask", "kwargs": {"n_train": 2, "die_on": die_on}}
    trajs = collect(env, {"kind": "oracle"}, workers=2, max_steps=20, progress=False)
    by_id = {t.task_id: t for t in trajs}
    assert len(trajs) == 2
    assert by_id[die_on].outcome == Outcome.error and "WorkerDied" in by_id[die_on].metadata["error"]
    assert by_id[die_on].diagnosis.cause_names() == ["env_error"]
    assert all(t.outcome == Outcome.success for tid, t in by_id.items() if tid != die_on)


class LoggingHooks(NoHooks):
    """Hooks that log one retrieval per step, for the parent to write."""

    def __init__(self) -> None:
        self.logs = []

    def diagnose(self, step, history):
        from evolve.schema import RetrievalLog

        self.logs.append(
            RetrievalLog(
                trajectory_id="",
                step_index=step.index,
                knowledge_id="skill-x",
                kind="skill",
                score=0.5,
                applicable=True,
                injected=False,
            )
        )
        return None

    def pop_retrieval_logs(self):
        logs, self.logs = self.logs, []
        return logs


def test_retrieval_logs_from_hooks_reach_the_store(tmp_path):
    path = tmp_path / "l.duckdb"
    (traj,) = collect(
        TW,
        {"kind": "oracle"},
        n_episodes=1,
        hooks_factory=LoggingHooks,
        store=path,
        namespace="l",
        max_steps=20,
        progress=False,
    )
    with ExperienceStore(path, namespace="l") as store:
        logs = store.retrieval_logs(trajectory_id=traj.id)
    assert [r.step_index for r in logs] == list(range(len(traj.steps)))
    assert all(r.namespace == "l" and r.knowledge_id == "skill-x" for r in logs)
