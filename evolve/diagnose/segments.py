"""Subgoal segmentation: an episode cut at its progress events (score up or won).

Each successful segment is a candidate skill (pre_facts = preconditions, actions = steps,
diff = verification); the unsucceeded tail is where guardrails come from.
"""

from __future__ import annotations

from evolve.diagnose.diff import diff_states, is_progress, state_predicates
from evolve.diagnose.summarize import summarize_segment
from evolve.schema import Segment, Step, Trajectory


def _segment(traj: Trajectory, index: int, steps: list[Step], start: int) -> Segment:
    first, last = steps[0].pre_state.state, steps[-1].post_state.state
    diff = diff_states(first, last)
    max_score = traj.max_score or last.max_score or first.max_score
    seg = Segment(
        trajectory_id=traj.id,
        index=index,
        start=start,
        end=start + len(steps),
        actions=[s.action.text for s in steps],
        pre_facts=state_predicates(first),
        post_facts=state_predicates(last),
        diff=diff,
        progress=diff.score_delta / max_score if max_score else diff.score_delta,
        succeeded=is_progress(steps[-1].pre_state.state, last),
    )
    seg.summary = summarize_segment(seg)
    return seg


def segments(traj: Trajectory) -> list[Segment]:
    """Cut ``traj`` after every progress event; a non-empty tail after the last one is unsucceeded.

    ``start``/``end`` are positions in ``traj.steps`` (end exclusive), matching ``Diagnosis.segment``
    of the rule diagnoser: the step that makes progress closes its segment.
    """
    out: list[Segment] = []
    start = 0
    for i, step in enumerate(traj.steps):
        if is_progress(step.pre_state.state, step.post_state.state):
            out.append(_segment(traj, len(out), traj.steps[start : i + 1], start))
            start = i + 1
    if start < len(traj.steps):
        out.append(_segment(traj, len(out), traj.steps[start:], start))
    return out
