"""Skills and guardrails: dual-track distillation, dedup/merge, probation, retrieval, enforcement.

The loop, end to end::

    skills, guards = distill_knowledge(train_trajs, store=store)       # candidates, merged + versioned
    run_probation(store, [*skills, *guards], runner, dev_tasks)         # candidate -> active | retired
    hooks = EvolveMemory.from_store(store)                              # retrieve, propose, enforce
    traj = run_episode(env, policy, task, hooks=hooks)

``GuardrailEnforcer`` is the one place that decides whether a guardrail refuses an action;
``RawTrajectoryMemory`` is the static raw-trajectory retrieval baseline.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from evolve.schema import Guardrail, Knowledge, KnowledgeStatus, Skill, Trajectory
from evolve.skills.baselines import RawTrajectoryMemory
from evolve.skills.distill import (
    DistillResult,
    compact_chain,
    distill,
    distill_guardrails,
    distill_skills,
    harmful_reason,
    needed_steps,
)
from evolve.skills.enforce import GuardrailEnforcer
from evolve.skills.memory import EvolveMemory, EvolveMemoryFactory, MemoryConfig, usage_from_trajectories
from evolve.skills.merge import MergeResult, apply_usage, merge_into_store, merge_knowledge
from evolve.skills.probation import paired_effect, probation, run_probation
from evolve.skills.retrieval import GoalTracker, KnowledgeIndex, RetrievalConfig
from evolve.stores import ExperienceStore
from evolve.stores.embedders import Embedder


def distill_knowledge(
    trajectories: Iterable[Trajectory | dict[str, Any] | str],
    store: ExperienceStore | None = None,
    namespace: str | None = None,
    *,
    env: str | None = None,
    min_support: int = 1,
    macros: bool = True,
    embedder: Embedder | None = None,
    threshold: float = 0.8,
) -> tuple[list[Skill], list[Guardrail]]:
    """Distill skills and guardrails from ``trajectories`` and merge them into ``store``.

    Returns the knowledge that needs probation: new or changed items still ``candidate``
    (re-discoveries of active items only bump their version; of retired items, stay retired).
    Malformed trajectories are skipped with a warning; nothing is written for them.
    """
    ns = namespace or (store.namespace if store is not None else "default")
    r = distill(trajectories, namespace=ns, env=env, min_support=min_support, macros=macros)
    items: list[Knowledge] = [*r.skills, *r.guardrails]
    if store is None:
        res = merge_knowledge([], items, embedder=embedder, threshold=threshold)
    else:
        res = merge_into_store(store, items, namespace=ns, embedder=embedder, threshold=threshold)
    cands = res.candidates
    return [k for k in cands if isinstance(k, Skill)], [k for k in cands if isinstance(k, Guardrail)]


def distill_snapshot(
    trajectories: Iterable[Trajectory | dict[str, Any] | str],
    store: ExperienceStore | None = None,
    namespace: str | None = None,
    **kwargs: Any,
) -> list[Knowledge]:
    """Knowledge distilled from ``trajectories`` alone, ready to use (status active), written nowhere.

    Items the store has retired (same signature) are left out: probation already found them harmful.
    """
    ns = namespace or (store.namespace if store is not None else "default")
    r = distill(
        trajectories,
        namespace=ns,
        min_support=kwargs.pop("min_support", 1),
        macros=kwargs.pop("macros", True),
    )
    res = merge_knowledge([], [*r.skills, *r.guardrails], **kwargs)
    retired: set[str] = set()
    if store is not None:
        retired = {
            k.signature
            for k in [*store.skills(ns, status="retired"), *store.guardrails(ns, status="retired")]
        }
    return [
        k.model_copy(update={"status": KnowledgeStatus.active})
        for k in res.items
        if k.signature not in retired
    ]


def knowledge_of(
    store: ExperienceStore, namespace: str | None = None, statuses: Sequence[str] = ("active",)
) -> list[Knowledge]:
    """The namespace's skills and guardrails with one of ``statuses``."""
    ns = namespace or store.namespace
    return [*store.skills(ns, status=list(statuses)), *store.guardrails(ns, status=list(statuses))]


__all__ = [
    "DistillResult",
    "EvolveMemory",
    "EvolveMemoryFactory",
    "GoalTracker",
    "GuardrailEnforcer",
    "KnowledgeIndex",
    "MemoryConfig",
    "MergeResult",
    "RawTrajectoryMemory",
    "RetrievalConfig",
    "apply_usage",
    "compact_chain",
    "distill",
    "distill_guardrails",
    "distill_knowledge",
    "distill_skills",
    "distill_snapshot",
    "harmful_reason",
    "knowledge_of",
    "merge_into_store",
    "merge_knowledge",
    "needed_steps",
    "paired_effect",
    "probation",
    "run_probation",
    "usage_from_trajectories",
]
