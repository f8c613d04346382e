"""Preference pairs: a successful and a failed action from the same state (DPO, REDI).

**Same state** means the *identical rendered prompt*: the messages the policy saw at that step
(:func:`evolve.llm.prompts.step_messages` with the given prompt options), compared byte for
byte. So the task, the goal, the observation, the state line, the admissible list, the history
shown (commands and observations) and the memory block all match; the chosen and the rejected
answer share one prompt, which is what a preference loss needs. Two runs that saw different
memory blocks are different states (pair runs of the same arm, or runs without memory).

At each state, *chosen* answers are the trainable steps (the policy acted, no error, not blocked)
of successful trajectories; *rejected* answers are steps of failed trajectories whose command
(normalised) is none of the chosen commands at that state, so a failed run that took the winning
action there is not marked wrong for it. Answers are rendered in the policy's format
(:func:`evolve.llm.prompts.answer_text`); pairs are distinct by (chosen command, rejected command),
at most ``max_pairs_per_state`` per state, in the order the trajectories come.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from evolve.llm.prompts import PromptOptions, answer_text, step_messages
from evolve.schema import ExampleKind, Step, TrainingExample, Trajectory
from evolve.text import normalise_command


def state_key(messages: Sequence[dict[str, Any]]) -> str:
    """A hash of a rendered prompt: equal keys = the same state (see the module docstring)."""
    text = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _acted(step: Step) -> bool:
    return bool(step.action.text)


def _trainable(step: Step) -> bool:
    return _acted(step) and not step.error and not step.post_state.info.get("guardrail_blocked")


def preference_examples(
    trajs: Sequence[Trajectory],
    namespace: str | None = None,
    options: PromptOptions | None = None,
    *,
    max_pairs_per_state: int = 4,
) -> list[TrainingExample]:
    """Preference examples: ``messages`` = the shared prompt (no answer), ``chosen`` / ``rejected``
    = assistant answers from a successful / a failed trajectory at the same state."""
    opts = options or PromptOptions()
    states: dict[str, dict[str, Any]] = {}
    for t in trajs:
        for k, step in enumerate(t.steps):
            good = t.success and _trainable(step)
            if not (good or (not t.success and _acted(step))):
                continue
            prompt = step_messages(t.goal, t.steps, k, opts)
            key = state_key(prompt)
            s = states.setdefault(key, {"prompt": prompt, "chosen": {}, "rejected": {}})
            side = "chosen" if good else "rejected"
            s[side].setdefault(normalise_command(step.action.text), (t, k))

    out = []
    for key, s in states.items():
        chosen, rejected = s["chosen"], s["rejected"]
        pairs = [(c, r) for c in chosen for r in rejected if r not in chosen][:max_pairs_per_state]
        for c, r in pairs:
            (ct, ck), (rt, rk) = chosen[c], rejected[r]
            pair_id = hashlib.sha256(f"{key}|{c}|{r}".encode()).hexdigest()[:16]
            out.append(
                TrainingExample(
                    id=f"ex-pref-{pair_id}",
                    namespace=namespace or ct.namespace,
                    kind=ExampleKind.preference,
                    messages=[dict(m) for m in s["prompt"]],
                    chosen=answer_text(ct.steps[ck].action, opts.action_format),
                    rejected=answer_text(rt.steps[rk].action, opts.action_format),
                    provenance=[ct.id, rt.id],
                    metadata={
                        "task_id": ct.task_id,
                        "env": ct.env,
                        "state": key,
                        "step": ck,
                        "rejected_step": rk,
                        "chosen_policy": ct.policy,
                        "rejected_policy": rt.policy,
                    },
                )
            )
    return out
