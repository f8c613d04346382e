"""Agent trajectories as chat transcripts: the assistant turns are where a loss will be taken.

Observations, tool outputs and the system prompt are context only (masked by the trainer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evolve.schema import ExampleKind, Privileged, Skill, TrainingExample, Trajectory

SYSTEM = (
    "You are an agent acting in a text environment. Each turn, answer with one command from the "
    "admissible actions."
)


def _user_turn(text: str, admissible: list[str] | None, goal: str | None = None) -> str:
    parts = [f"Goal: {goal}"] if goal else []
    parts.append(text.strip())
    if admissible:
        parts.append("Admissible actions: " + ", ".join(admissible[:60]))
    return "\n".join(parts)


def trajectory_messages(traj: Trajectory, context: str | None = None) -> list[dict[str, Any]]:
    """System, then alternating user (observation) / assistant (action) turns."""
    system = SYSTEM + (f"\n\n{context}" if context else "")
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for i, s in enumerate(traj.steps):
        msgs.append(
            {
                "role": "user",
                "content": _user_turn(
                    s.pre_state.text, s.pre_state.admissible_actions, traj.goal if i == 0 else None
                ),
            }
        )
        msgs.append({"role": "assistant", "content": s.action.text})
    return msgs


def sft_examples(trajs: Sequence[Trajectory], namespace: str | None = None) -> list[TrainingExample]:
    """One SFT chat per successful trajectory, with blocked / failed-policy steps left out."""
    out = []
    for t in trajs:
        if not t.success or not t.steps:
            continue
        kept = t.model_copy(
            update={
                "steps": [
                    s for s in t.steps if not s.error and not s.post_state.info.get("guardrail_blocked")
                ]
            }
        )
        out.append(
            TrainingExample(
                id=f"ex-sft-{t.id}",
                namespace=namespace or t.namespace,
                kind=ExampleKind.sft,
                messages=trajectory_messages(kept),
                provenance=[t.id],
                metadata={"task_id": t.task_id, "env": t.env, "policy": t.policy, "steps": len(kept.steps)},
            )
        )
    return out


def privileged_examples(
    trajs: Sequence[Trajectory],
    privileged: dict[str, Privileged] | None = None,
    skills: Sequence[Skill] = (),
    namespace: str | None = None,
) -> list[TrainingExample]:
    """Student-view chats paired with a privileged context (gold actions, skills) for a teacher.

    The same model conditioned on the privileged context is the teacher (OPSD / pi-Distill / Skill-SD).
    """
    skill_text = "\n".join(f"- {s.text()}" for s in skills)
    out = []
    for t in trajs:
        if not t.steps:
            continue
        parts = []
        p = (privileged or {}).get(t.task_id)
        if p and p.gold_actions:
            parts.append("Reference solution: " + " -> ".join(p.gold_actions))
        if skill_text:
            parts.append("Skills:\n" + skill_text)
        if not parts:
            continue
        out.append(
            TrainingExample(
                id=f"ex-priv-{t.id}",
                namespace=namespace or t.namespace,
                kind=ExampleKind.privileged,
                messages=trajectory_messages(t),
                privileged_context="\n".join(parts),
                provenance=[t.id],
                metadata={"task_id": t.task_id, "env": t.env, "success": t.success},
            )
        )
    return out
