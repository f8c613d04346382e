"""Collect episodes at scale: N episodes over a task split with K parallel workers.

Each worker process builds ONE env and ONE policy (from picklable specs) and reuses them for all
its episodes, so a ScienceWorld JVM or a loaded model is paid for once per worker. Workers only
run episodes; the parent alone writes the store (DuckDB is single-writer), in batches, as
episodes complete. Ray runs the same workers as actors when ``ray_address`` is given.

Determinism: the task order is a shuffle seeded by ``seed``; the random policy seeds itself
per (seed, task id), so which worker runs an episode does not change its actions.

Resuming: :func:`run_missing` runs only the episodes of an arm the store does not hold yet
(``store.done_episodes``) and commits each one as it finishes; it is what ``evolve run`` and the
eval harness use. Worker settings travel as a frozen :class:`WorkerSettings`.

Retrieval logs: hooks that define ``pop_retrieval_logs() -> list[RetrievalLog]`` have it called
after each episode; the logs travel back with the trajectory (an empty ``trajectory_id`` is
filled in) and the parent writes them with ``store.log_retrievals``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolve.agents.base import AgentHooks, NoHooks
from evolve.agents.graph import error_diagnosis, run_episode
from evolve.agents.policies import make_policy
from evolve.agents.recorder import Recorder
from evolve.envs import build_env
from evolve.envs.base import Env
from evolve.errors import ConfigError, EnvCrashed, EvolveError
from evolve.schema import FailureCause, Outcome, RetrievalLog, Split, Task, Trajectory, new_id
from evolve.specs import EnvSpec, PolicySpec
from evolve.stores import ExperienceStore

log = logging.getLogger(__name__)

RAY_MISSING = "ray is not installed; install it with: pip install 'evolve-agents[ray]'"


@dataclass(frozen=True)
class EpisodeJob:
    """One planned episode: its position in the plan, its task and its seed."""

    index: int
    task: Task | str
    seed: int

    @property
    def task_id(self) -> str:
        return self.task.id if isinstance(self.task, Task) else self.task

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.seed)


def plan_episodes(
    tasks: Sequence[Task | str],
    n_episodes: int | None,
    seed: int,
    skip_done: Iterable[tuple[str, int | None]] = (),
) -> list[EpisodeJob]:
    """The episodes to run: a seeded shuffle of ``tasks``, cycled (seed + 1 per lap) to reach
    ``n_episodes`` (default: each task once), minus the ``(task_id, seed)`` pairs already done."""
    if not tasks:
        return []
    order = list(tasks)
    random.Random(seed).shuffle(order)
    n = len(order) if n_episodes is None else n_episodes
    done = set(skip_done)
    jobs = []
    for i in range(n):
        job = EpisodeJob(index=i, task=order[i % len(order)], seed=seed + i // len(order))
        if job.key not in done:
            jobs.append(job)
    return jobs


done_episodes = ExperienceStore.done_episodes
"""``done_episodes(store, namespace=None, *, run_id=None, arm=None, env=None, include_errors=False)``:
the ``(task_id, seed)`` pairs already in ``store`` (the ``skip_done`` of a resumed run); episodes
that ended in ``error`` are left out, so a resume retries them, unless asked."""


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class WorkerSettings:
    """What every episode of one collect call shares (picklable: it travels to worker processes)."""

    max_steps: int = 50
    arm: str = ""
    namespace: str = "default"
    run_id: str | None = None
    seed: int = 0
    """The collect call's seed: a later lap over the tasks shifts the policy's seed by the lap."""
    parent_pid: int | None = None
    """Pool workers exit when this process is gone (the collecting process was killed)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to build its :class:`EpisodeWorker` (picklable)."""

    env: EnvSpec
    policy: PolicySpec
    hooks_factory: Callable[[], AgentHooks] | None
    settings: WorkerSettings

    def build(self) -> EpisodeWorker:
        return EpisodeWorker(self.env, self.policy, self.hooks_factory, self.settings)


def _error_trajectory(job: EpisodeJob, env_name: str, message: str, settings: WorkerSettings) -> Trajectory:
    task = job.task if isinstance(job.task, Task) else None
    return Trajectory(
        namespace=settings.namespace,
        run_id=settings.run_id,
        task_id=job.task_id,
        env=env_name,
        split=task.split if task else Split.train,
        goal=task.goal if task else "",
        arm=settings.arm,
        outcome=Outcome.error,
        seed=job.seed,
        metadata={"error": message, "max_steps": settings.max_steps},
        diagnosis=error_diagnosis(
            message,
            FailureCause.policy_error if message.startswith("PolicyError") else FailureCause.env_error,
        ),
    )


class EpisodeWorker:
    """Owns one env, one policy and one hooks object, and runs episodes with them.

    Used in-process (workers=1), in each pool process, and as a Ray actor.
    """

    def __init__(
        self,
        env_spec: EnvSpec,
        policy_spec: PolicySpec,
        hooks_factory: Callable[[], AgentHooks] | None,
        settings: WorkerSettings,
        env: Env | None = None,
    ) -> None:
        self.env_spec = env_spec
        self.env = env if env is not None else build_env(env_spec)
        self.policy = make_policy(policy_spec)
        self.hooks = hooks_factory() if hooks_factory is not None else NoHooks()
        self.settings = settings
        self.restarts = 0
        # The policy's own seed; a later lap over the tasks shifts it so repeats differ.
        self._base_policy_seed = getattr(self.policy, "seed", None)

    def tasks(self, split: str) -> list[Task]:
        return self.env.tasks(split)

    def restart_env(self) -> None:
        """Replace a crashed env with a fresh one (a new JVM / game process)."""
        try:
            self.env.close()
        except Exception:  # noqa: BLE001 - the old engine is broken; closing it is best effort
            pass
        self.env = build_env(self.env_spec)
        self.restarts += 1

    def run(self, job: EpisodeJob) -> tuple[int, Trajectory, list[RetrievalLog]]:
        """Run one episode; every failure comes back as a trajectory with ``outcome=error``."""
        if self._base_policy_seed is not None:
            self.policy.seed = self._base_policy_seed + (job.seed - self.settings.seed)  # type: ignore[attr-defined]
        t = time.perf_counter()
        try:
            traj = run_episode(
                self.env,
                self.policy,
                job.task,
                hooks=self.hooks,
                max_steps=self.settings.max_steps,
                arm=self.settings.arm,
                namespace=self.settings.namespace,
                run_id=self.settings.run_id,
                seed=job.seed,
            )
        except Exception as e:  # noqa: BLE001 - one bad episode must not stop the run
            log.warning("episode %s failed: %s", job.task_id, e)
            crashed = isinstance(e, EnvCrashed) or not isinstance(e, EvolveError)
            kind = "EnvCrashed" if isinstance(e, EnvCrashed) else type(e).__name__
            traj = _error_trajectory(job, self.env.name, f"{kind}: {e}", self.settings)
            traj.policy = getattr(self.policy, "name", "")
            if crashed:
                self.restart_env()
        else:
            if traj.outcome == Outcome.error and str(traj.metadata.get("error", "")).startswith("EnvCrashed"):
                self.restart_env()
        traj.metadata["wall_s"] = round(time.perf_counter() - t, 4)
        logs: list[RetrievalLog] = []
        pop = getattr(self.hooks, "pop_retrieval_logs", None)
        if callable(pop):
            # Hooks learn the trajectory id only at the end; fill it in where they left it empty.
            logs = [
                r if r.trajectory_id else r.model_copy(update={"trajectory_id": traj.id}) for r in pop() or []
            ]
        return job.index, traj, logs

    def close(self) -> None:
        self.env.close()


# The worker of a pool process: built on its first job, reused for every later one.
_WORKER: EpisodeWorker | None = None


def _pool_worker(spec: WorkerSpec) -> EpisodeWorker:
    global _WORKER
    if _WORKER is None:
        parent = spec.settings.parent_pid
        if parent:
            threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
        _WORKER = spec.build()
    return _WORKER


def _exit_with_parent(parent_pid: int, every_s: float = 2.0) -> None:
    """Pool workers wait forever for work if the collecting process is killed: leave with it."""
    while True:
        time.sleep(every_s)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            worker = _WORKER
            try:
                if worker is not None:
                    worker.close()  # stop a JVM / game process of our own
            finally:
                os._exit(1)
        except PermissionError:
            pass  # alive, owned by someone else


def _pool_tasks(spec: WorkerSpec, split: str) -> list[Task]:
    return _pool_worker(spec).tasks(split)


def _pool_run(spec: WorkerSpec, job: EpisodeJob) -> tuple[int, Trajectory, list[RetrievalLog]]:
    return _pool_worker(spec).run(job)


def _mp_context(preload: Sequence[str] = ()) -> Any:
    """forkserver (else spawn): never fork, or a child would inherit the parent's DuckDB handle,
    JVM sockets and threads. The fork server imports ``preload`` once and forks workers from it,
    so K workers do not pay K times for importing LangGraph and the benchmark."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["evolve.agents.collect", *preload])
    return ctx


def _preload_modules(env_spec: EnvSpec) -> list[str]:
    """The adapter module of a registered env and the benchmark package it wraps, when known."""
    from evolve.envs import env_factory

    if ":" in env_spec.name:
        return [env_spec.name.partition(":")[0]]
    try:
        factory = env_factory(env_spec.name)
    except EvolveError:
        return []
    module = getattr(factory, "__module__", "") or ""
    heavy = {"evolve.envs.textworld_env": "textworld", "evolve.envs.scienceworld_env": "scienceworld"}
    return [m for m in (module, heavy.get(module)) if m]


class SetupError(EvolveError):
    """A worker could not build its env, policy or hooks: nothing can run."""


# --------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar: episodes done, success so far, steps/s (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled = enabled
        self.total = total
        self.done = self.success = self.errors = self.steps = 0
        self.t0 = time.perf_counter()
        self._bar: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("success {task.fields[success]}"),
                TextColumn("{task.fields[rate]} steps/s"),
                TextColumn("{task.fields[errors]}"),
                TimeElapsedColumn(),
            )
            self._task = self._bar.add_task(label, total=total, success="-", rate="-", errors="")

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, traj: Trajectory) -> None:
        self.done += 1
        self.success += traj.outcome == Outcome.success
        self.errors += traj.outcome == Outcome.error
        self.steps += len(traj.steps)
        if self._bar is None:
            return
        rate = self.steps / max(time.perf_counter() - self.t0, 1e-9)
        self._bar.update(
            self._task,
            advance=1,
            success=f"{self.success}/{self.done} ({100 * self.success / self.done:.0f}%)",
            rate=f"{rate:.1f}",
            errors=f"[red]{self.errors} errors" if self.errors else "",
        )


# --------------------------------------------------------------------------- collect


def collect(
    env: EnvSpec | str | dict[str, Any],
    policy: PolicySpec | dict[str, Any],
    *,
    split: Split | str = Split.train,
    n_episodes: int | None = None,
    tasks: Sequence[Task | str] | None = None,
    workers: int = 1,
    store: ExperienceStore | str | Path | None = None,
    namespace: str = "default",
    run_id: str | None = None,
    max_steps: int = 50,
    hooks_factory: Callable[[], AgentHooks] | None = None,
    arm: str = "",
    seed: int = 0,
    ray_address: str | None = None,
    progress: bool = True,
    skip_done: Iterable[tuple[str, int | None]] = (),
    batch_size: int = 64,
) -> list[Trajectory]:
    """Run episodes over a task split and return their trajectories, in plan order.

    ``tasks`` (default: every task of ``split``) are shuffled with ``seed`` and cycled to
    ``n_episodes`` (default: each once); ``skip_done`` pairs ``(task_id, seed)`` are skipped (see
    :func:`done_episodes`). ``workers`` processes (or Ray actors when ``ray_address`` is given) each
    build one env and one policy; ``hooks_factory`` is a picklable zero-arg callable run in each
    worker. With ``store`` (a store or a path) trajectories are written in batches as they complete.
    """
    env_spec = EnvSpec.parse(env)
    policy_spec = PolicySpec.parse(policy)
    if policy_spec.seed is None and policy_spec.kind in ("random", "hf"):
        policy_spec = policy_spec.model_copy(update={"seed": seed})
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if ray_address is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(RAY_MISSING) from None
    run_id = run_id or new_id("run")
    settings = WorkerSettings(
        max_steps=max_steps, arm=arm, namespace=namespace, run_id=run_id, seed=seed, parent_pid=os.getpid()
    )
    spec = WorkerSpec(env_spec, policy_spec, hooks_factory, settings)
    split = Split(split)
    label = f"{env_spec.name}/{split.value} {policy_spec.name or policy_spec.kind}"
    recorder = Recorder(store, namespace, run_id, batch_size) if store is not None else None
    results: dict[int, Trajectory] = {}
    try:
        runner: _LocalRunner | _PoolRunner | _RayRunner
        if ray_address is not None:
            runner = _RayRunner(spec, workers, ray_address)
        elif workers == 1:
            runner = _LocalRunner(spec)
        else:
            runner = _PoolRunner(spec, workers)
        with runner as r:
            all_tasks = list(tasks) if tasks is not None else r.tasks(split.value)
            jobs = plan_episodes(all_tasks, n_episodes, seed, skip_done)
            with _Progress(progress, len(jobs), label) as bar:
                for index, traj, logs in r.run(jobs):
                    results[index] = traj
                    if recorder is not None:
                        recorder.add(traj, logs)
                    bar.update(traj)
    except BaseException as e:
        if recorder is not None:
            recorder.close(error=e)  # what finished is written before the error propagates
        raise
    if recorder is not None:
        recorder.close()
    return [results[i] for i in sorted(results)]


def run_missing(
    store: ExperienceStore,
    env: EnvSpec | str | dict[str, Any],
    policy: PolicySpec | dict[str, Any],
    *,
    tasks: Sequence[Task | str],
    arm: str,
    run_id: str | None = None,
    namespace: str | None = None,
    seeds: Sequence[int] = (0,),
    trials: int = 1,
    split: Split | str = Split.train,
    max_steps: int = 50,
    workers: int = 1,
    hooks_factory: Callable[[], AgentHooks] | None = None,
    retry_errors: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    batch_size: int = 1,
    announce: Callable[[int, int], None] | None = None,
) -> list[Trajectory]:
    """Run the episodes of ``arm`` that ``store`` does not hold yet; return all of them.

    The episodes are ``tasks`` x ``seeds``, each seed's pass being :func:`collect` with that seed
    and ``trials`` laps over the tasks (lap ``k`` runs seed ``s + k``). An episode is done when the
    store holds a trajectory of ``(namespace, run_id, arm)`` with its ``(task_id, seed)``; one that
    ended in ``error`` counts as done unless ``retry_errors``. ``run_id`` defaults to ``arm``.
    Each finished episode is committed at once (``batch_size`` 1), so a killed run loses at most
    the episodes in flight. ``announce(n, seed)`` is called before a pass that has ``n`` to run.
    Returned: the stored trajectories of the arm for these tasks and seeds (store order).
    """
    ns = namespace or store.namespace
    run_id = run_id or arm
    want_seeds = {s + k for s in seeds for k in range(trials)}
    done = store.done_episodes(ns, run_id=run_id, arm=arm, include_errors=not retry_errors)
    ids = [t.id if isinstance(t, Task) else t for t in tasks]
    for seed in seeds:
        todo = [(i, t) for lap in range(trials) for i, t in enumerate(ids) if (t, seed + lap) not in done]
        if not todo:
            continue
        if announce is not None:
            announce(len(todo), seed)
        collect(
            env,
            policy,
            split=split,
            tasks=list(tasks),
            n_episodes=len(ids) * trials,
            workers=workers,
            store=store,
            namespace=ns,
            run_id=run_id,
            max_steps=max_steps,
            hooks_factory=hooks_factory,
            arm=arm,
            seed=seed,
            ray_address=ray_address,
            progress=progress,
            skip_done=done,
            batch_size=batch_size,
        )
    keep = set(ids)
    return [
        t
        for t in store.trajectories(ns, run_id=run_id, arm=arm)
        if t.task_id in keep and t.seed in want_seeds
    ]


class _LocalRunner:
    """workers=1: one worker in this process (no pickling, no extra interpreter)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.worker: EpisodeWorker | None = None

    def __enter__(self) -> _LocalRunner:
        try:
            self.worker = self.spec.build()
        except EvolveError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SetupError(f"could not build the worker: {type(e).__name__}: {e}") from e
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.worker is not None:
            self.worker.close()

    def tasks(self, split: str) -> list[Task]:
        assert self.worker is not None
        return self.worker.tasks(split)

    def run(self, jobs: list[EpisodeJob]) -> Iterator[tuple[int, Trajectory, list[RetrievalLog]]]:
        assert self.worker is not None
        for job in jobs:
            yield self.worker.run(job)


class _PoolRunner:
    """K worker processes, fed so that at most 2K episodes are in flight.

    A worker process that dies (a segfault in a game engine, the OOM killer) breaks the pool: the
    pool is rebuilt and the episodes it held are retried one at a time, so the one that kills its
    worker again is recorded as an error instead of taking innocent episodes down with it.
    """

    def __init__(self, spec: WorkerSpec, workers: int) -> None:
        self.spec = spec
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.pool_restarts = 0

    def _start(self) -> None:
        ctx = _mp_context(_preload_modules(self.spec.env))
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)

    def __enter__(self) -> _PoolRunner:
        self._start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _restart(self) -> None:
        assert self.pool is not None
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool_restarts += 1
        log.warning("a collect worker process died; restarting the pool (%d)", self.pool_restarts)
        self._start()

    @staticmethod
    def _result(fut: Future) -> Any:
        try:
            return fut.result()
        except (EvolveError, BrokenProcessPool):
            raise
        except Exception as e:  # noqa: BLE001 - a worker that cannot start stops the run
            raise SetupError(f"a collect worker failed: {type(e).__name__}: {e}") from e

    def tasks(self, split: str) -> list[Task]:
        assert self.pool is not None
        return self._result(self.pool.submit(_pool_tasks, self.spec, split))

    def run(self, jobs: list[EpisodeJob]) -> Iterator[tuple[int, Trajectory, list[RetrievalLog]]]:
        queue: deque[EpisodeJob] = deque(jobs)
        suspects: deque[EpisodeJob] = deque()  # in flight when a worker died
        inflight: dict[Future, EpisodeJob] = {}
        limit = 2 * self.workers
        while queue or suspects or inflight:
            assert self.pool is not None
            if suspects and not inflight:
                job = suspects.popleft()  # alone, so a second death names the culprit
                inflight[self.pool.submit(_pool_run, self.spec, job)] = job
                isolated = True
            else:
                isolated = False
                while queue and not suspects and len(inflight) < limit:
                    job = queue.popleft()
                    inflight[self.pool.submit(_pool_run, self.spec, job)] = job
            finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                try:
                    result = self._result(fut)
                except BrokenProcessPool:
                    broken = True
                    continue
                del inflight[fut]
                yield result
            if not broken:
                continue
            # Every future of a broken pool fails; collect the ones that finished first.
            wait(list(inflight))
            lost = []
            for fut, job in list(inflight.items()):
                try:
                    result = self._result(fut)
                except BrokenProcessPool:
                    lost.append(job)
                    continue
                yield result
            inflight.clear()
            self._restart()
            if isolated:
                job = lost[0]
                msg = "WorkerDied: the worker process died twice running this episode"
                traj = _error_trajectory(job, self.spec.env.name, msg, self.spec.settings)
                yield job.index, traj, []
            else:
                suspects.extend(sorted(lost, key=lambda j: j.index))


class _RayRunner:
    """K Ray actors, each an :class:`EpisodeWorker`, fed through ``ray.util.ActorPool``."""

    def __init__(self, spec: WorkerSpec, workers: int, address: str) -> None:
        self.spec = spec
        self.workers = workers
        self.address = address
        self.actors: list[Any] = []

    def __enter__(self) -> _RayRunner:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address)
        actor_cls = ray.remote(EpisodeWorker)
        s = self.spec
        self.actors = [
            actor_cls.remote(s.env, s.policy, s.hooks_factory, s.settings) for _ in range(self.workers)
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        for a in self.actors:
            try:
                ray.get(a.close.remote())
            except Exception:  # noqa: BLE001 - an actor that died has nothing to close
                pass
            ray.kill(a)

    def tasks(self, split: str) -> list[Task]:
        import ray

        return ray.get(self.actors[0].tasks.remote(split))

    def run(self, jobs: list[EpisodeJob]) -> Iterator[tuple[int, Trajectory, list[RetrievalLog]]]:
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        yield from pool.map_unordered(lambda actor, job: actor.run.remote(job), jobs)
