"""Rule-based rolling summaries: the segment and episode tiers of the experience space.

Short, deterministic text (also what gets embedded), built only from schema fields.
"""

from __future__ import annotations

from collections import Counter

from evolve.diagnose.diff import is_progress
from evolve.diagnose.rules import CAUSE_ORDER, diagnose_trajectory
from evolve.schema import Diagnosis, Outcome, Segment, Trajectory
from evolve.text import one_line


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def _actions(actions: list[str], limit: int = 8) -> str:
    if len(actions) <= limit:
        return " -> ".join(actions)
    # Keep both ends: the opening moves set the context, the last ones are what made (or missed) progress.
    head, tail = actions[: limit // 2], actions[-(limit - limit // 2) :]
    return " -> ".join([*head, f"... ({len(actions) - limit} more)", *tail])


def summarize_segment(seg: Segment) -> str:
    """One line: which steps, whether the subgoal was reached, the actions and the state change."""
    status = f"reached subgoal (progress {seg.progress:+.3g})" if seg.succeeded else "no subgoal reached"
    return one_line(
        f"Segment {seg.index} (steps {seg.start}-{max(seg.start, seg.end - 1)}): {status}. "
        f"Actions: {_actions(seg.actions) or 'none'}. Changes: {seg.diff.summary()}.",
        600,
    )


def _outcome(traj: Trajectory) -> str:
    if traj.outcome != Outcome.running or not traj.steps:
        return traj.outcome.value
    last = traj.steps[-1].post_state.state
    return "success" if last.won else "failure" if last.lost else "unfinished"


def summarize_episode(traj: Trajectory) -> str:
    """Goal, outcome, score, key state changes and the main failure causes with counts."""
    if traj.diagnosis is None or any(s.diagnosis is None for s in traj.steps):
        traj = diagnose_trajectory(traj)
    last = traj.steps[-1].post_state.state if traj.steps else None
    score = traj.score or (last.score if last else 0.0)
    max_score = traj.max_score or (last.max_score if last else None)
    score_text = f"{score:g}/{max_score:g}" if max_score else f"{score:g}"
    diag = traj.diagnosis or Diagnosis(step_index=-1)
    reached = sum(is_progress(s.pre_state.state, s.post_state.state) for s in traj.steps)
    parts = [
        "Goal: " + _sentence(one_line(traj.goal, 200) or "unknown"),
        f"Outcome: {_outcome(traj)} after {len(traj.steps)} steps, score {score_text},"
        f" {reached} subgoal(s) reached.",
        "Changes: " + _sentence(one_line(diag.diff.summary(), 240)),
    ]
    counts: Counter[str] = Counter(
        c.cause.value for s in traj.steps if s.diagnosis for c in s.diagnosis.causes
    )
    counts.update(c.cause.value for c in diag.causes if c.cause.value not in counts)
    if counts:
        order = {c.value: i for i, c in enumerate(CAUSE_ORDER)}
        ranked = sorted(counts, key=lambda c: (-counts[c], order[c]))[:4]
        parts.append("Causes: " + ", ".join(f"{c} x{counts[c]}" for c in ranked) + ".")
    if diag.root_cause:
        parts.append("Root cause: " + _sentence(one_line(diag.root_cause, 200)))
    return " ".join(parts)
