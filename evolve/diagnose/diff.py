"""State diffs and state predicates: the raw material of every diagnosis."""

from __future__ import annotations

import hashlib
import json
import re

from evolve.schema import EnvState, Observation, StateDiff
from evolve.text import normalise


def _minus(a: list[str], b: list[str]) -> list[str]:
    """Items of ``a`` not in ``b``, first-occurrence order kept, duplicates dropped."""
    drop = set(b)
    out: list[str] = []
    seen: set[str] = set()
    for x in a:
        if x not in drop and x not in seen:
            seen.add(x)
            out.append(x)
    return out


def diff_states(pre: EnvState, post: EnvState) -> StateDiff:
    """What changed from ``pre`` to ``post`` (set differences in a stable order, score delta)."""
    return StateDiff(
        location_from=pre.location,
        location_to=post.location,
        inventory_added=_minus(post.inventory, pre.inventory),
        inventory_removed=_minus(pre.inventory, post.inventory),
        visible_added=_minus(post.visible, pre.visible),
        visible_removed=_minus(pre.visible, post.visible),
        facts_added=_minus(post.facts, pre.facts),
        facts_removed=_minus(pre.facts, post.facts),
        score_delta=post.score - pre.score,
    )


def is_progress(pre: EnvState, post: EnvState) -> bool:
    """A progress event: the score went up or the episode was just won (segment boundaries)."""
    return post.score > pre.score or (post.won and not pre.won)


def _atom(text: str) -> str:
    # Predicate arguments must not contain the syntax characters of the predicate itself.
    return re.sub(r"\s+", " ", text.strip().lower().replace("(", "").replace(")", "").replace(",", ""))


def state_predicates(state: EnvState) -> list[str]:
    """The env's facts when it exposes them, else ``at(location)`` and ``has(item)`` predicates."""
    if state.facts:
        return list(dict.fromkeys(state.facts))
    preds: list[str] = []
    if state.location:
        preds.append(f"at({_atom(state.location)})")
    preds.extend(f"has({_atom(item)})" for item in state.inventory if item.strip())
    return list(dict.fromkeys(preds))


def state_key(obs: Observation) -> str:
    """A short hash of what the agent's situation is, for revisit/loop detection.

    Uses the structured state (location, inventory, visible, facts, score); ``moves`` is left out
    because it changes on every step. Envs that expose no structured state fall back to the
    observation text, so that two different screens never look like the same state.
    """
    s = obs.state
    structured = bool(s.location or s.inventory or s.visible or s.facts)
    payload: list[object] = [
        s.location,
        sorted(s.inventory),
        sorted(s.visible),
        sorted(s.facts),
        s.score,
        s.won,
        s.lost,
    ]
    if not structured:
        payload.append(normalise(obs.text))
    raw = json.dumps(payload, separators=(",", ":"), default=str)
    return hashlib.sha1(raw.encode()).hexdigest()[:16]
