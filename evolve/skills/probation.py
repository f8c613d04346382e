"""Probation: new knowledge becomes ``active`` only after it did no harm on held-out tasks.

Candidates are replayed on held-out (dev) tasks with the same seeds, once with the current active
knowledge only ("without") and once with the candidates added ("with"). The metric per episode is
``0.5 * success + 0.5 * score / max_score``; the effect is the paired mean difference.

Batching keeps it affordable: all candidates are evaluated together first. When the joint effect
is not negative, every candidate that was actually used in those episodes is promoted. When it is
negative, the used candidates are split in halves and each half is evaluated on its own (group
testing) until the harmful ones are isolated and retired; a budget of evaluations bounds the
search, and whatever is still undecided when it runs out stays ``candidate``. Candidates that were
never used (never injected into the planner's context, executed, or refusing an action) have shown nothing and stay
``candidate`` unless ``require_use=False``.

The runner is any callable ``runner(knowledge, tasks[, arm])`` that runs the base policy with an
:class:`~evolve.skills.memory.EvolveMemory` over ``knowledge`` (every item to be used as active)
on ``tasks`` and returns the trajectories; so probation works with any env and any policy.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evolve.schema import Guardrail, Knowledge, KnowledgeStatus, Skill, Task, Trajectory
from evolve.stores import ExperienceStore

log = logging.getLogger(__name__)

Runner = Callable[..., list[Trajectory]]


def episode_value(t: Trajectory) -> float:
    """0.5 x success + 0.5 x normalised score, in [0, 1]."""
    frac = 1.0 if t.success else (max(0.0, min(1.0, t.score / t.max_score)) if t.max_score else 0.0)
    return 0.5 * (1.0 if t.success else 0.0) + 0.5 * frac


def _key(t: Trajectory) -> tuple[str, Any, Any]:
    return (t.task_id, t.seed, t.metadata.get("trial", 0))


def paired_effect(with_: Sequence[Trajectory], without: Sequence[Trajectory]) -> float:
    """Mean of (value with - value without) over the episodes both runs share."""
    base = {_key(t): episode_value(t) for t in without}
    diffs = [episode_value(t) - base[_key(t)] for t in with_ if _key(t) in base]
    if not diffs:
        return 0.0
    return sum(diffs) / len(diffs)


def _used_ids(trajs: Sequence[Trajectory]) -> set[str]:
    """Knowledge that took part: executed, refusing, or injected into the planner's context."""
    out: set[str] = set()
    for t in trajs:
        meta = t.metadata.get("evolve") or {}
        out.update((meta.get("used") or {}).keys())
        out.update(meta.get("injected") or [])
        out.update(s.action.skill_id for s in t.steps if s.action.skill_id)
        out.update(
            str(s.post_state.info["guardrail_id"]) for s in t.steps if s.post_state.info.get("guardrail_id")
        )
    return out


def _as_active(items: Sequence[Knowledge]) -> list[Knowledge]:
    return [k.model_copy(update={"status": KnowledgeStatus.active}) for k in items]


@dataclass
class ProbationResult:
    promoted: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    evaluations: int = 0
    effect_all: float | None = None
    effects: dict[str, float] = field(default_factory=dict)
    """Effect measured for each decided id (the effect of the group it was decided in)."""

    def summary(self) -> dict[str, Any]:
        return {
            "promoted": len(self.promoted),
            "retired": len(self.retired),
            "kept_candidate": len(self.kept),
            "evaluations": self.evaluations,
            "effect_all": None if self.effect_all is None else round(self.effect_all, 4),
            "retired_ids": list(self.retired),
        }


def _call(
    runner: Runner, knowledge: list[Knowledge], tasks: Sequence[Task | str], arm: str
) -> list[Trajectory]:
    # The arm label names the knowledge it ran with, so a resumable runner never mistakes the
    # episodes of an earlier probation (other candidates) for these.
    digest = hashlib.sha1(",".join(sorted(k.id for k in knowledge)).encode()).hexdigest()[:8]
    arm = f"{arm}-{digest}"
    try:
        params = inspect.signature(runner).parameters
        takes_arm = (
            "arm" in params or len(params) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params.values())
        )
    except (TypeError, ValueError):
        takes_arm = False
    ids = [t.id if isinstance(t, Task) else t for t in tasks] if takes_arm else list(tasks)
    return runner(knowledge, ids, arm) if takes_arm else runner(knowledge, list(tasks))


def run_probation(
    store: ExperienceStore | None,
    candidates: Sequence[Knowledge],
    runner: Runner,
    tasks: Sequence[Task | str],
    *,
    namespace: str | None = None,
    base_knowledge: Sequence[Knowledge] | None = None,
    min_effect: float = 0.0,
    require_use: bool = True,
    max_evaluations: int = 8,
) -> dict[str, Any]:
    """Replay ``candidates`` on ``tasks`` and promote / retire / keep them (written to ``store``).

    ``base_knowledge`` (default: the store's active knowledge) is what runs in both arms.
    Returns a JSON-friendly summary; the statuses, ``stats.effect`` and ``stats.probation_runs``
    of the candidates are updated in the store (a status change is a new version).
    """
    res = probation(
        candidates,
        runner,
        tasks,
        base_knowledge=base_knowledge
        if base_knowledge is not None
        else (_store_active(store, namespace) if store is not None else []),
        min_effect=min_effect,
        require_use=require_use,
        max_evaluations=max_evaluations,
    )
    if store is not None:
        write_decisions(store, candidates, res, namespace)
    return res.summary()


def _store_active(store: ExperienceStore, namespace: str | None) -> list[Knowledge]:
    ns = namespace or store.namespace
    return [*store.skills(ns, status="active"), *store.guardrails(ns, status="active")]


def probation(
    candidates: Sequence[Knowledge],
    runner: Runner,
    tasks: Sequence[Task | str],
    *,
    base_knowledge: Sequence[Knowledge] = (),
    min_effect: float = 0.0,
    require_use: bool = True,
    max_evaluations: int = 8,
) -> ProbationResult:
    """The decision procedure of :func:`run_probation`, without writing anything."""
    res = ProbationResult()
    cand_ids = {k.id for k in candidates}
    base = [k for k in base_knowledge if k.id not in cand_ids]
    if not candidates:
        return res
    without = _call(runner, _as_active(base), tasks, "without")
    with_all = _call(runner, _as_active([*base, *candidates]), tasks, "with")
    res.evaluations = 2
    res.effect_all = paired_effect(with_all, without)
    used = _used_ids(with_all) & cand_ids
    unused = [k for k in candidates if k.id not in used]
    used_items = [k for k in candidates if k.id in used]
    log.info(
        "probation: %d candidates, %d used, joint effect %+.3f", len(candidates), len(used), res.effect_all
    )
    if res.effect_all >= min_effect:
        for k in used_items:
            res.promoted.append(k.id)
            res.effects[k.id] = res.effect_all
    else:
        queue: list[list[Knowledge]] = _halves(used_items) if len(used_items) > 1 else [used_items]
        while queue:
            group = queue.pop(0)
            if not group:
                continue
            if len(group) == 1 and len(used_items) == 1:
                eff = res.effect_all  # the joint run already measured this single item
            elif res.evaluations >= max_evaluations:
                res.kept.extend(k.id for k in group)
                continue
            else:
                trajs = _call(runner, _as_active([*base, *group]), tasks, f"group{res.evaluations}")
                res.evaluations += 1
                eff = paired_effect(trajs, without)
            if eff >= min_effect:
                for k in group:
                    res.promoted.append(k.id)
                    res.effects[k.id] = eff
            elif len(group) == 1:
                res.retired.append(group[0].id)
                res.effects[group[0].id] = eff
            else:
                queue.extend(_halves(group))
    for k in unused:
        if require_use or res.effect_all < min_effect:
            res.kept.append(k.id)
        else:
            res.promoted.append(k.id)
            res.effects[k.id] = res.effect_all
    return res


def _halves(items: list[Knowledge]) -> list[list[Knowledge]]:
    # Guardrails and skills fail differently (refusing vs. doing): split by kind first.
    skills = [k for k in items if isinstance(k, Skill)]
    guards = [k for k in items if isinstance(k, Guardrail)]
    if skills and guards:
        return [skills, guards]
    mid = (len(items) + 1) // 2
    return [items[:mid], items[mid:]]


def write_decisions(
    store: ExperienceStore,
    candidates: Sequence[Knowledge],
    res: ProbationResult,
    namespace: str | None = None,
) -> None:
    """Apply a probation result to the stored knowledge (status, effect, probation_runs)."""
    ns = namespace or store.namespace
    decided = {**dict.fromkeys(res.kept, None)}
    decided.update(dict.fromkeys(res.promoted, KnowledgeStatus.active))
    decided.update(dict.fromkeys(res.retired, KnowledgeStatus.retired))
    skills: list[Skill] = []
    guards: list[Guardrail] = []
    for c in candidates:
        if c.id not in decided:
            continue
        try:
            k = store.get_knowledge(c.id, ns)
        except Exception:  # noqa: BLE001 - written elsewhere? fall back to the candidate itself
            k = c
        status = decided[c.id]
        stats = k.stats.model_copy(
            update={
                "probation_runs": k.stats.probation_runs + 1,
                "effect": res.effects.get(c.id, k.stats.effect),
            }
        )
        update: dict[str, Any] = {"stats": stats}
        if status is not None and status != k.status:
            update |= {"status": status, "version": k.version + 1}
        k = k.model_copy(update=update)
        (skills if isinstance(k, Skill) else guards).append(k)  # type: ignore[arg-type]
    with store.transaction():
        store.upsert_skills(skills)
        store.upsert_guardrails(guards)
