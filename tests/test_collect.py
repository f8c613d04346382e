"""Collection at scale: process workers, determinism, resume, crash recovery, store writes."""

from __future__ import annotations

import importlib.util
import os

import pytest

from evolve.agents.base import NoHooks
from evolve.agents.collect import (
    WorkerSettings,
    WorkerSpec,
    collect,
    done_episodes,
    plan_episodes,
    run_missing,
)
from evolve.envs import register_env
from evolve.envs.textworld_env import TextWorldEnv
from evolve.errors import ConfigError, EnvCrashed
from evolve.schema import Outcome
from evolve.specs import EnvSpec, PolicySpec
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
                query=f"goal: step {step.index}",
                rank=step.index % 3,
                similarity=0.25,
                rerank_score=1.5,
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
    # The reranker's training data: the query and each candidate's rank and scores survive.
    assert [r.query for r in logs] == [f"goal: step {i}" for i in range(len(traj.steps))]
    assert [r.rank for r in logs] == [i % 3 for i in range(len(traj.steps))]
    assert all(r.similarity == 0.25 and r.rerank_score == 1.5 for r in logs)


def test_worker_spec_is_typed_and_picklable():
    import pickle

    spec = WorkerSpec(
        EnvSpec(name="textworld"), PolicySpec(kind="random"), None, WorkerSettings(max_steps=3, arm="a")
    )
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and back.settings.max_steps == 3
    with pytest.raises(AttributeError):
        spec.settings.max_steps = 4  # frozen


def test_run_missing_runs_only_what_the_store_lacks(tmp_path):
    with ExperienceStore(tmp_path / "m.duckdb", namespace="m") as store:
        kw = dict(
            tasks=["tw-custom-s0-q5-w5-o10", "tw-custom-s1-q5-w5-o10"],
            run_id="r",
            max_steps=6,
            progress=False,
        )
        calls = []
        first = run_missing(
            store,
            TW,
            {"kind": "random"},
            arm="a",
            seeds=[0, 1],
            announce=lambda n, s: calls.append((n, s)),
            **kw,
        )
        assert sorted((t.task_id, t.seed) for t in first) == sorted(
            (t, s) for t in kw["tasks"] for s in (0, 1)
        )
        assert calls == [(2, 0), (2, 1)]
        # Same episodes as a plain collect per seed (seeding unchanged).
        for seed in (0, 1):
            plain = collect(TW, {"kind": "random"}, tasks=kw["tasks"], max_steps=6, seed=seed, progress=False)
            got = sorted(actions([t for t in first if t.seed == seed]))
            assert got == sorted(actions(plain))
        calls.clear()
        again = run_missing(
            store,
            TW,
            {"kind": "random"},
            arm="a",
            seeds=[0, 1],
            announce=lambda n, s: calls.append((n, s)),
            **kw,
        )
        assert calls == [] and sorted(t.id for t in again) == sorted(t.id for t in first)
        # Another arm of the same run is separate; trials add laps (seed + lap).
        laps = run_missing(store, TW, {"kind": "random"}, arm="b", seeds=[5], trials=2, **kw)
        assert sorted(t.seed for t in laps) == [5, 5, 6, 6]
        assert store.count_trajectories() == 8


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (the 'ray' extra)")
def test_ray_actors_match_one_worker_and_record(tmp_path):
    import ray

    kw = dict(max_steps=6, seed=3, progress=False)
    one = collect(TW, {"kind": "random"}, workers=1, **kw)
    try:
        # The actors import this module (PidHooks) from the tests folder.
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
        two = collect(
            TW,
            {"kind": "random"},
            workers=2,
            ray_address="auto",
            store=tmp_path / "ray.duckdb",
            namespace="ray",
            run_id="r",
            hooks_factory=PidHooks,
            **kw,
        )
    finally:
        ray.shutdown()
    assert actions(one) == actions(two)
    assert all(t.metadata["hooks_pid"] != os.getpid() for t in two)  # built in the actors
    with ExperienceStore(tmp_path / "ray.duckdb", namespace="ray") as store:
        assert sorted(actions(store.trajectories(run_id="r"))) == sorted(actions(two))
