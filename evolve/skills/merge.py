"""Dedup and merge of knowledge, versions through the store, confidence from usage.

Two skills merge when they have the same signature (same templated preconditions and goal type)
and their texts are close (embedding cosine above a threshold) and their steps *anti-unify*:
same number of steps and words, differing only in non-verb words, which become lexical slots
(``go east`` + ``go west`` -> ``go {w1}`` with ``w1 in {east, west}``). The merged item keeps the
existing id and ``parent_id``, gets ``version + 1``, the union of provenance, slot values and goal
cues. Knowledge that was retired absorbs its re-discoveries and stays retired, so a harmful skill
that probation retired is not re-learned from the next batch of experience.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from evolve.schema import Guardrail, Knowledge, KnowledgeStats, KnowledgeStatus, Skill
from evolve.skills.predicates import LEXICAL_PREFIX, SLOT
from evolve.stores import ExperienceStore
from evolve.stores.embedders import Embedder, HashingEmbedder

K = TypeVar("K", Skill, Guardrail)
MAX_PROVENANCE = 500
"""Provenance is capped (newest kept) so a popular skill does not grow without bound."""
_STATUS_RANK = {KnowledgeStatus.retired: 0, KnowledgeStatus.candidate: 1, KnowledgeStatus.active: 2}


def anti_unify(
    a: Sequence[str], b: Sequence[str], slots: Mapping[str, list[str]]
) -> tuple[list[str], dict[str, set[str]]] | None:
    """Generalise two step lists into one, or None when they are not the same procedure.

    Differing words become lexical slots (never the first word: a different verb is a different
    skill); entity slots must line up exactly.
    """
    if len(a) != len(b):
        return None
    out: list[str] = []
    lex: dict[str, set[str]] = {}
    used = {m for s in (*a, *b) for m in SLOT.findall(s) if m.startswith(LEXICAL_PREFIX)}
    counter = len(used)
    for sa, sb in zip(a, b):
        ta, tb = sa.split(), sb.split()
        if len(ta) != len(tb):
            return None
        merged: list[str] = []
        for k, (x, y) in enumerate(zip(ta, tb)):
            if x == y:
                merged.append(x)
                continue
            if k == 0:
                return None
            mx, my = SLOT.fullmatch(x), SLOT.fullmatch(y)
            if mx and my:
                return None  # two different entity slots: a different procedure
            if (mx and not mx.group(1).startswith(LEXICAL_PREFIX)) or (
                my and not my.group(1).startswith(LEXICAL_PREFIX)
            ):
                return None
            if mx:  # a's lexical slot absorbs b's word
                name = mx.group(1)
                lex.setdefault(name, set(slots.get(name, []))).add(y)
                merged.append(x)
            elif my:
                name = my.group(1)
                lex.setdefault(name, set()).add(x)
                merged.append(y)
            else:
                counter += 1
                name = f"{LEXICAL_PREFIX}{counter}"
                lex[name] = {x, y}
                merged.append("{" + name + "}")
        out.append(" ".join(merged))
    return out, lex


def _cosine(embedder: Embedder | None, a: str, b: str) -> float:
    if embedder is None:
        return 1.0
    v = embedder.embed([a, b])
    return float(np.clip(v[0] @ v[1], -1.0, 1.0))


def _support_text(desc: str, n: int) -> str:
    return re.sub(r"seen in \d+ episode\(s\)", f"seen in {n} episode(s)", desc)


def _merge_stats(a: KnowledgeStats, b: KnowledgeStats) -> KnowledgeStats:
    return KnowledgeStats(
        uses=a.uses + b.uses,
        successes=a.successes + b.successes,
        failures=a.failures + b.failures,
        probation_runs=a.probation_runs + b.probation_runs,
        effect=a.effect if a.effect is not None else b.effect,
    )


def _status(a: KnowledgeStatus, b: KnowledgeStatus, changed: bool) -> KnowledgeStatus:
    if KnowledgeStatus.retired in (a, b) and a == KnowledgeStatus.retired:
        return a
    # New behaviour (generalised steps) must earn activation again; same behaviour keeps it.
    if changed:
        return min(a, b, key=lambda s: _STATUS_RANK[s]) if a != KnowledgeStatus.retired else a
    return a


def merge_skill(
    base: Skill, other: Skill, steps: list[str] | None = None, lexical: Mapping[str, set[str]] | None = None
) -> Skill:
    """``base`` absorbing ``other``: version + 1, unions of provenance, slot values and tags."""
    steps = steps if steps is not None else list(base.steps)
    changed = steps != base.steps
    slots: dict[str, set[str]] = {k: set(v) for k, v in base.slots.items()}
    for k, v in other.slots.items():
        slots.setdefault(k, set()).update(v)
    for k, v in (lexical or {}).items():
        slots.setdefault(k, set()).update(v)
    prov = list(dict.fromkeys([*base.provenance, *other.provenance]))[-MAX_PROVENANCE:]
    tags = list(dict.fromkeys([*base.tags, *other.tags]))
    name = " -> ".join(steps) if changed else base.name
    return base.model_copy(
        update={
            "steps": steps,
            "name": name[:120],
            "slots": {k: sorted(v) for k, v in slots.items()},
            "provenance": prov,
            "tags": tags,
            "description": _support_text(base.description, len(prov)),
            "version": base.version + 1,
            "stats": _merge_stats(base.stats, other.stats) if other.stats.uses else base.stats,
            "status": _status(base.status, other.status, changed),
        }
    )


def merge_guardrail(base: Guardrail, other: Guardrail) -> Guardrail:
    prov = list(dict.fromkeys([*base.provenance, *other.provenance]))[-MAX_PROVENANCE:]
    return base.model_copy(
        update={
            "provenance": prov,
            "description": re.sub(r"in \d+ episode\(s\)", f"in {len(prov)} episode(s)", base.description),
            "version": base.version + 1,
            "stats": _merge_stats(base.stats, other.stats) if other.stats.uses else base.stats,
        }
    )


def _same_content(a: Knowledge, b: Knowledge) -> bool:
    """Equal up to version and description: nothing new was learned."""
    skip = {"version", "description"}
    return a.model_dump(exclude=skip) == b.model_dump(exclude=skip)


@dataclass
class MergeResult:
    """What a merge wrote: items new to the store, items that absorbed others, and the mapping."""

    added: list[Knowledge] = field(default_factory=list)
    updated: list[Knowledge] = field(default_factory=list)
    merged_into: dict[str, str] = field(default_factory=dict)
    """incoming id -> id of the item it was merged into."""

    @property
    def items(self) -> list[Knowledge]:
        return [*self.added, *self.updated]

    @property
    def candidates(self) -> list[Knowledge]:
        """Added or updated items that still need probation (status candidate)."""
        return [k for k in self.items if k.status == KnowledgeStatus.candidate]


def merge_knowledge(
    existing: Sequence[Knowledge],
    incoming: Sequence[Knowledge],
    embedder: Embedder | None = None,
    threshold: float = 0.8,
) -> MergeResult:
    """Fold ``incoming`` into ``existing`` (and into each other); nothing is written.

    ``embedder`` defaults to a :class:`HashingEmbedder` (texts are short and templated).
    """
    embedder = embedder if embedder is not None else HashingEmbedder(512)
    pool: dict[str, Knowledge] = {k.id: k for k in existing}
    by_sig: dict[tuple[str, str], list[str]] = {}
    for k in existing:
        by_sig.setdefault((k.kind, k.signature), []).append(k.id)
    result = MergeResult()
    touched: dict[str, Knowledge] = {}
    new_ids: set[str] = set()
    for item in incoming:
        key = (item.kind, item.signature)
        target_id = None
        merged: Knowledge | None = None
        for cid in by_sig.get(key, []):
            cand = touched.get(cid, pool[cid])
            if isinstance(item, Skill) and isinstance(cand, Skill):
                if sorted(cand.verification) != sorted(item.verification):
                    continue
                au = anti_unify(cand.steps, item.steps, cand.slots)
                if au is None or _cosine(embedder, cand.text(), item.text()) < threshold:
                    continue
                merged = merge_skill(cand, item, *au)
            elif isinstance(item, Guardrail) and isinstance(cand, Guardrail):
                if cand.forbidden_action != item.forbidden_action or sorted(cand.trigger) != sorted(
                    item.trigger
                ):
                    continue
                merged = merge_guardrail(cand, item)
            if merged is not None:
                target_id = cid
                break
        if merged is None or target_id is None:
            pool[item.id] = item
            by_sig.setdefault(key, []).append(item.id)
            touched[item.id] = item
            new_ids.add(item.id)
            continue
        result.merged_into[item.id] = target_id
        before = touched.get(target_id, pool[target_id])
        if _same_content(before, merged):
            continue  # a re-discovery of what is already known (a rerun): no new version
        if target_id in new_ids:
            # Merging two new items: no version history yet, the merged item stays version 1.
            merged = merged.model_copy(update={"version": 1})
        touched[target_id] = merged
    for kid, k in touched.items():
        (result.added if kid in new_ids else result.updated).append(k)
    return result


def merge_into_store(
    store: ExperienceStore,
    incoming: Sequence[Knowledge],
    namespace: str | None = None,
    embedder: Embedder | None = None,
    threshold: float = 0.8,
) -> MergeResult:
    """Merge ``incoming`` with the namespace's knowledge (all statuses) and upsert the result.

    Upserts write version history, so :meth:`ExperienceStore.rollback` can undo a merge.
    """
    ns = namespace or store.namespace
    incoming = [k.model_copy(update={"namespace": ns}) for k in incoming]
    existing = [*store.skills(ns), *store.guardrails(ns)]
    res = merge_knowledge(existing, incoming, embedder=embedder, threshold=threshold)
    skills = [k for k in res.items if isinstance(k, Skill)]
    guards = [k for k in res.items if isinstance(k, Guardrail)]
    with store.transaction():
        store.upsert_skills(skills)
        store.upsert_guardrails(guards)
    return res


def apply_usage(
    store: ExperienceStore,
    usage: Mapping[str, tuple[int, int, int]],
    namespace: str | None = None,
    effects: Mapping[str, float] | None = None,
) -> int:
    """Add ``(uses, successes, failures)`` per knowledge id to its stats (confidence follows).

    Kept for existing callers: :meth:`ExperienceStore.record_usage` does the work (each changed
    item becomes a new version; unknown ids are skipped). Returns how many items changed.
    """
    return store.record_usage(usage, effects, namespace)
