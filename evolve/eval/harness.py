"""The evaluation harness: arms on the same held-out tasks and seeds, the learning curve, the
probation runner and the write-back of usage. ADAPT is in :mod:`evolve.eval.adapt`.

The harness runs episodes (through :func:`evolve.agents.collect.run_missing`: resumable, each
finished episode committed) and measures them; it never builds memory itself. The recipe that
uses it (``evolve run``, ``evolve eval``, ``bench/evolution.py``) hands it a :class:`Memory`:
how to turn knowledge or raw trajectories into hooks, how to distil a snapshot, how to count
usage. So ``eval`` depends on agents, envs and stores only, never on ``skills`` or the recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evolve.agents.base import AgentHooks
from evolve.agents.collect import run_missing
from evolve.envs import build_env
from evolve.errors import ConfigError
from evolve.eval.metrics import Comparison, bootstrap, compare
from evolve.eval.report import CurvePoint
from evolve.schema import Knowledge, Split, Task, Trajectory
from evolve.specs import EnvSpec, PolicySpec
from evolve.stores import ExperienceStore

HooksFactory = Callable[[], AgentHooks]
Usage = Mapping[str, tuple[int, int, int]]

ARMS = ("no_memory", "raw_retrieval", "evolve", "evolve_context", "raw_exemplars", "oracle")
"""``no_memory`` the base policy alone; ``raw_retrieval`` retrieval of raw past trajectories;
``evolve`` skills + guardrails + replanning; ``oracle`` the env's oracle policy (a ceiling).

The two ablations say where a memory's gain comes from: ``evolve_context`` is evolve's memory as
context only (skills and guardrails shown, guardrails and the loop guard enforced, no skill step
executed by the memory), ``raw_exemplars`` raw retrieval as exemplars only (excerpts shown, no
replayed action), the way exemplar-based agents use it. Both full memory arms also *act* (they
execute skill steps / replay actions without asking the policy), so without these two a reader
cannot tell what the memory says to the model from what it does for it."""

CONTEXT_ARMS = ("evolve_context", "raw_exemplars")
"""Arms whose memory never takes a step itself: every action comes from the policy."""


@dataclass(frozen=True)
class Memory:
    """How the recipe's memory is built: what the harness receives instead of importing it.

    ``evolve(knowledge)`` and ``raw(trajectories)`` return picklable zero-argument hooks factories
    (they run in worker processes); ``distill(trajectories)`` returns knowledge ready to use,
    written nowhere (learning curve, ADAPT); ``usage(trajectories)`` returns ``(uses, successes,
    failures)`` per knowledge id, read from the trajectories.
    """

    evolve: Callable[[Sequence[Knowledge]], HooksFactory]
    raw: Callable[[Sequence[Trajectory]], HooksFactory] | None = None
    distill: Callable[[Sequence[Trajectory]], list[Knowledge]] | None = None
    usage: Callable[[Sequence[Trajectory]], Usage] | None = None
    evolve_context: Callable[[Sequence[Knowledge]], HooksFactory] | None = None
    """``evolve`` without macro execution (the ``evolve_context`` arm)."""
    raw_exemplars: Callable[[Sequence[Trajectory]], HooksFactory] | None = None
    """``raw`` without replayed actions (the ``raw_exemplars`` arm)."""


@dataclass
class Episodes:
    """Runs the missing episodes of an arm with one store, env and base policy.

    An arm's episodes are recorded under ``(namespace, run_id, arm)``; ``run_id=None`` gives each
    arm its own run id (its label). ``seeds`` x ``trials`` laps: see :func:`run_missing`.
    """

    store: ExperienceStore
    env: EnvSpec
    policy: PolicySpec | dict[str, Any]
    namespace: str | None = None
    run_id: str | None = None
    split: Split | str = Split.test
    seeds: Sequence[int] = (0,)
    trials: int = 1
    max_steps: int = 40
    workers: int = 1
    retry_errors: bool = False
    progress: bool = True
    ray_address: str | None = None
    announce: Callable[[str, int, int], None] | None = None
    """``announce(arm, n, seed)`` before a pass that runs ``n`` episodes."""

    @property
    def ns(self) -> str:
        return self.namespace or self.store.namespace

    def run(
        self,
        arm: str,
        tasks: Sequence[Task | str],
        *,
        hooks: HooksFactory | None = None,
        policy: PolicySpec | dict[str, Any] | None = None,
        seeds: Sequence[int] | None = None,
        trials: int | None = None,
    ) -> list[Trajectory]:
        """The arm's trajectories on ``tasks`` (running only those the store does not hold)."""
        announce = self.announce
        return run_missing(
            self.store,
            self.env,
            policy if policy is not None else self.policy,
            tasks=tasks,
            arm=arm,
            run_id=self.run_id,
            namespace=self.ns,
            seeds=self.seeds if seeds is None else seeds,
            trials=self.trials if trials is None else trials,
            split=self.split,
            max_steps=self.max_steps,
            workers=self.workers,
            hooks_factory=hooks,
            retry_errors=self.retry_errors,
            ray_address=self.ray_address,
            progress=self.progress,
            announce=None if announce is None else (lambda n, seed: announce(arm, n, seed)),
        )


def task_ids(env: EnvSpec, split: Split | str, limit: int | None = None) -> list[str]:
    """The ids of ``env``'s tasks in ``split``, the first ``limit`` of them (a clear error if none)."""
    e = build_env(env)
    try:
        ids = [t.id for t in e.tasks(Split(split))]
    finally:
        e.close()
    if limit is not None:
        ids = ids[:limit]
    if not ids:
        raise ConfigError(f"env '{env.name}' has no tasks in split '{Split(split).value}'; check env.kwargs")
    return ids


# ------------------------------------------------------------------------------------ arms


def arm_hooks(
    arm: str, memory: Memory, knowledge: Sequence[Knowledge], train: Sequence[Trajectory]
) -> HooksFactory | None:
    """The hooks an arm runs with: none, raw trajectories (``train``), or the ``knowledge``."""
    if arm in ("no_memory", "oracle"):
        return None
    if arm == "raw_retrieval":
        if memory.raw is None:
            raise ConfigError("arm 'raw_retrieval' needs a raw-trajectory memory (Memory.raw)")
        return memory.raw(train)
    if arm == "evolve":
        return memory.evolve(knowledge)
    if arm == "evolve_context":
        if memory.evolve_context is None:
            raise ConfigError("arm 'evolve_context' needs a context-only memory (Memory.evolve_context)")
        return memory.evolve_context(knowledge)
    if arm == "raw_exemplars":
        if memory.raw_exemplars is None:
            raise ConfigError("arm 'raw_exemplars' needs an exemplar-only memory (Memory.raw_exemplars)")
        return memory.raw_exemplars(train)
    raise ConfigError(f"unknown arm {arm!r}; arms are: {', '.join(ARMS)}")


def run_arms(
    episodes: Episodes,
    memory: Memory,
    arms: Sequence[str],
    tasks: Sequence[Task | str],
    *,
    knowledge: Sequence[Knowledge],
    train: Sequence[Trajectory],
    policies: Mapping[str, PolicySpec | dict[str, Any]] | None = None,
    label: Callable[[str], str] = lambda arm: f"eval:{arm}",
    after: Callable[[str, list[Trajectory]], None] | None = None,
) -> dict[str, list[Trajectory]]:
    """Every arm on the same ``tasks`` and seeds. ``policies`` overrides an arm's policy (the
    ``oracle`` arm runs only when it names one); ``after(arm, trajectories)`` follows each arm."""
    policies = policies or {}
    out: dict[str, list[Trajectory]] = {}
    for arm in arms:
        if arm == "oracle" and "oracle" not in policies:
            continue
        hooks = arm_hooks(arm, memory, knowledge, train)
        out[arm] = episodes.run(label(arm), tasks, hooks=hooks, policy=policies.get(arm))
        if after is not None:
            after(arm, out[arm])
    return out


COMPARISONS = (
    ("evolve", "no_memory"),
    ("evolve", "raw_retrieval"),
    ("evolve", "evolve_context"),
    ("evolve_context", "no_memory"),
    ("evolve_context", "raw_exemplars"),
    ("raw_retrieval", "raw_exemplars"),
    ("raw_exemplars", "no_memory"),
)
"""Paired differences reported when both arms ran: the headline (evolve against both baselines),
then the decomposition: what executing adds to the context (``evolve - evolve_context``,
``raw_retrieval - raw_exemplars``) and what the context alone adds (``... - no_memory``)."""


def compare_arms(results: Mapping[str, Sequence[Trajectory]], n_boot: int = 2000) -> list[Comparison]:
    """The :data:`COMPARISONS` whose two arms both ran, paired on (task, seed, trial)."""
    return [
        compare(a, results[a], b, results[b], n_boot) for a, b in COMPARISONS if a in results and b in results
    ]


# -------------------------------------------------------------------------- learning curve


def learning_curve(
    episodes: Episodes,
    memory: Memory,
    train: Sequence[Trajectory],
    sizes: Sequence[int | str],
    tasks: Sequence[Task | str],
    *,
    label: Callable[[int], str] = lambda n: f"curve:{n}",
    n_boot: int = 2000,
    log: Callable[[str], None] | None = None,
) -> list[CurvePoint]:
    """Success on ``tasks`` when knowledge is distilled from only the first N ``train`` episodes.

    ``sizes`` are counts (capped at ``len(train)``) or ``"all"``; a repeated count is measured
    once. The snapshots are unprobated (:attr:`Memory.distill`): this shows how knowledge
    accumulates, not what probation would keep.
    """
    if memory.distill is None:
        raise ConfigError("the learning curve needs Memory.distill")
    points: list[CurvePoint] = []
    for tok in sizes:
        n = len(train) if str(tok).strip() == "all" else min(int(tok), len(train))
        if any(p.train_episodes == n for p in points):
            continue
        subset = list(train[:n])
        snap = memory.distill(subset) if subset else []
        trajs = episodes.run(label(n), tasks, hooks=memory.evolve(snap))
        est = bootstrap([1.0 if t.success else 0.0 for t in trajs], n_boot)
        points.append(
            CurvePoint(
                train_episodes=n,
                train_successes=sum(t.success for t in subset),
                success=est.mean,
                lo=est.lo,
                hi=est.hi,
                skills=sum(k.kind == "skill" for k in snap),
                guardrails=sum(k.kind == "guardrail" for k in snap),
                episodes=len(trajs),
            )
        )
        if log is not None:
            log(f"curve: {n} train episodes -> {100 * est.mean:.1f}% success ({len(trajs)} episodes)")
    return points


# ------------------------------------------------------------------------------ probation


@dataclass
class ProbationRunner:
    """The runner :func:`evolve.skills.run_probation` calls: ``runner(knowledge, task_ids, arm)``
    runs the base policy with ``memory.evolve(knowledge)`` on those tasks and returns the episodes.

    Each call's episodes go under ``label(arm, knowledge)`` (resumable); every episode it returned
    is kept in :attr:`trajectories` (for the usage write-back).
    """

    episodes: Episodes
    memory: Memory
    tasks: Sequence[Task | str] = ()
    """Known tasks: ids asked for are run as these objects when listed here."""
    label: Callable[[str, Sequence[Knowledge]], str] = lambda arm, knowledge: f"probation:{arm}"
    trajectories: list[Trajectory] = field(default_factory=list)

    def __call__(
        self, knowledge: Sequence[Knowledge] | None, task_ids: Sequence[str], arm: str
    ) -> list[Trajectory]:
        by_id = {t.id if isinstance(t, Task) else t: t for t in self.tasks}
        tasks = [by_id.get(i, i) for i in task_ids]
        hooks = None if knowledge is None else self.memory.evolve(knowledge)
        trajs = self.episodes.run(self.label(arm, knowledge or []), tasks, hooks=hooks)
        self.trajectories.extend(trajs)
        return trajs


# ------------------------------------------------------------------------------ usage


def record_usage(
    store: ExperienceStore,
    memory: Memory,
    trajectories: Sequence[Trajectory],
    *,
    run_id: str,
    label: str,
    effects: Mapping[str, float] | None = None,
    namespace: str | None = None,
) -> int:
    """Write each knowledge item's uses, successes and failures in ``trajectories`` (and
    ``effects``) back to the store: a new version per changed item, so the reliability term of
    retrieval is learned from use. Returns how many items changed.

    Idempotent: the ids of the trajectories already counted under ``(run_id, label)`` are kept in
    the store (run state ``usage:<run_id>``, which ``--fresh`` leaves alone) in the same
    transaction, so a rerun or a resumed run never counts an episode twice.
    """
    if memory.usage is None:
        return 0
    key = f"usage:{run_id}"
    seen = store.stages(key).get(label, {}).get("data", {})
    counted = set(seen.get("trajectories", []))
    new = [t for t in trajectories if t.id not in counted]
    if not new and not effects:
        return 0
    usage = memory.usage(new)
    with store.transaction():
        changed = store.record_usage(usage, effects, namespace)
        data = {
            "trajectories": sorted(counted | {t.id for t in new}),
            "items": seen.get("items", 0) + changed,
        }
        store.set_stage(key, label, "done", data)
    return changed


def knowledge_counts(store: ExperienceStore, namespace: str | None = None) -> dict[str, dict[str, int]]:
    """``{"skills"|"guardrails": {status: count}}``."""
    ns = namespace or store.namespace
    statuses = ("candidate", "active", "retired")
    return {
        "skills": {s: len(store.skills(ns, status=s)) for s in statuses},
        "guardrails": {s: len(store.guardrails(ns, status=s)) for s in statuses},
    }


__all__ = [
    "ARMS",
    "COMPARISONS",
    "CONTEXT_ARMS",
    "Episodes",
    "HooksFactory",
    "Memory",
    "ProbationRunner",
    "arm_hooks",
    "compare_arms",
    "knowledge_counts",
    "learning_curve",
    "record_usage",
    "run_arms",
    "task_ids",
]
