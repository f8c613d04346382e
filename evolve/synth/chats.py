"""Agent trajectories as training chats, rendered by the policies' own prompt code.

One example per step: the messages of step k are *exactly* what the policy sent at step k
(:func:`evolve.llm.prompts.step_messages`: same system prompt, history layout, state line, memory
block and ranked admissible list), followed by the answer the policy format expects (a JSON
``{"thought", "command"}`` for ``action_format="json"``, the bare command for ``"command"``).
Only that last assistant turn is a training target; the history's assistant turns are context
(the trainer masks everything but the last turn). Per-step examples are what makes the prompts
identical: one multi-turn chat could not show each step's memory block and ranked action list,
which exist only in that step's last user message.

Privileged examples carry the *student* view in ``messages`` and the privileged block (gold
actions, skills) in ``privileged_context``; the teacher view is
``evolve.llm.prompts.add_privileged(messages, privileged_context)``, the same function the
policy layout uses (OPSD / pi-Distill / Skill-SD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evolve.llm.prompts import PromptOptions, answer_text, step_messages
from evolve.schema import ExampleKind, Privileged, Skill, Step, TrainingExample, Trajectory


def step_example_messages(
    traj: Trajectory, k: int, options: PromptOptions | None = None, privileged: str | None = None
) -> list[dict[str, Any]]:
    """The prompt of step ``k`` as the policy rendered it, plus the step's action as the answer."""
    opts = options or PromptOptions()
    msgs: list[dict[str, Any]] = list(step_messages(traj.goal, traj.steps, k, opts, privileged))
    msgs.append({"role": "assistant", "content": answer_text(traj.steps[k].action, opts.action_format)})
    return msgs


def _step_example(
    t: Trajectory,
    k: int,
    kind: ExampleKind,
    namespace: str | None,
    options: PromptOptions | None,
    extra: dict[str, Any],
) -> TrainingExample:
    """The training example for step ``k`` of ``t`` (id, provenance and metadata every kind shares)."""
    prefix = "sft" if kind == ExampleKind.sft else "priv"
    return TrainingExample(
        id=f"ex-{prefix}-{t.id}-{k}",
        namespace=namespace or t.namespace,
        kind=kind,
        messages=step_example_messages(t, k, options),
        provenance=[t.id],
        metadata={"task_id": t.task_id, "env": t.env, "step": k, **extra},
    )


def _trainable(step: Step) -> bool:
    """A step worth imitating: the policy acted (no error, no fallback failure) and it was not blocked."""
    return bool(step.action.text) and not step.error and not step.post_state.info.get("guardrail_blocked")


def sft_examples(
    trajs: Sequence[Trajectory], namespace: str | None = None, options: PromptOptions | None = None
) -> list[TrainingExample]:
    """One SFT example per trainable step of each successful trajectory (blocked / failed steps skipped).

    ``options`` must be the prompt options of the policy being trained (default: the JSON layout).
    """
    out = []
    for t in trajs:
        if not t.success or not t.steps:
            continue
        for k, step in enumerate(t.steps):
            if not _trainable(step):
                continue
            out.append(
                _step_example(
                    t, k, ExampleKind.sft, namespace, options, {"policy": t.policy, "steps": len(t.steps)}
                )
            )
    return out


def privileged_context(privileged: Privileged | None, skills: Sequence[Skill] = ()) -> str:
    """The privileged block's content: the reference solution and the skills ('' when neither)."""
    parts = []
    if privileged is not None and privileged.gold_actions:
        parts.append("Reference solution: " + " -> ".join(privileged.gold_actions))
    if skills:
        parts.append("Skills:\n" + "\n".join(f"- {s.text()}" for s in skills))
    return "\n".join(parts)


def privileged_examples(
    trajs: Sequence[Trajectory],
    privileged: dict[str, Privileged] | None = None,
    skills: Sequence[Skill] = (),
    namespace: str | None = None,
    options: PromptOptions | None = None,
) -> list[TrainingExample]:
    """Student-view examples, one per step, paired with a privileged context for a teacher.

    The same model conditioned on the privileged context is the teacher (OPSD / pi-Distill /
    Skill-SD); it scores the step's answer in the view ``add_privileged(messages, privileged_context)``.
    """
    out = []
    for t in trajs:
        if not t.steps:
            continue
        context = privileged_context((privileged or {}).get(t.task_id), skills)
        if not context:
            continue
        for k, step in enumerate(t.steps):
            if not step.action.text:
                continue
            ex = _step_example(t, k, ExampleKind.privileged, namespace, options, {"success": t.success})
            out.append(ex.model_copy(update={"privileged_context": context}))
    return out
