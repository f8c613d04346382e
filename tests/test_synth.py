"""Training examples are the policy's own prompts, byte for byte.

Real episodes run through the agent graph on a real TextWorld game with every policy kind that
renders prompts (OpenAIPolicy against a real local HTTP peer; HFPolicy in generate and rank mode
on a tiny saved model), with and without a memory block. What each policy actually sent at step
k is captured (the peer's received requests; the messages the HF policy scored or generated
from) and must equal synth's messages for step k, rebuilt from the recorded trajectory only,
after a JSON round trip like the store's. The privileged (teacher) view rendered from a stored
example must equal the layout's own rendering with the privileged block.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ChatPeer

from evolve.agents.base import NoHooks
from evolve.agents.graph import run_episode
from evolve.agents.policies.hf_policy import HFPolicy
from evolve.agents.policies.openai_policy import OpenAIPolicy
from evolve.envs import make_env
from evolve.llm.prompts import PromptOptions, add_privileged, answer_text, build_messages
from evolve.schema import (
    ExampleKind,
    FailureCause,
    Guardrail,
    MemoryContext,
    Observation,
    Outcome,
    Privileged,
    Skill,
    Step,
    Trajectory,
)
from evolve.synth import privileged_context, privileged_examples, sft_examples, step_example_messages

STEPS = 4
# Small caps so that the history summary and the ranked (cut) admissible list are exercised.
OPTIONS = {
    "json": PromptOptions(max_turns=2, max_actions=4),
    "command": PromptOptions(max_turns=2, max_actions=4, action_format="command"),
}
SKILL = Skill(name="light the way", description="open doors first", steps=["open door", "go east"])
GUARD = Guardrail(root_cause=FailureCause.loop, forbidden_action="xyzzy", description="nonsense")


class MemoryHooks(NoHooks):
    """Retrieves a skill, a guardrail and a note that changes every step."""

    def retrieve(self, obs: Observation, history: list[Step]) -> MemoryContext:
        return MemoryContext(
            skills=[SKILL], guardrails=[GUARD], notes=[f"step {len(history)} of the episode"]
        )


class SpyHF(HFPolicy):
    """HFPolicy recording the messages and inputs it acted on (generate or rank), unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[list[dict[str, str]]] = []
        self.inputs: list[tuple[Observation, list[Step], MemoryContext]] = []

    def messages(self, obs: Observation, history: list[Step], memory: MemoryContext) -> list[dict[str, str]]:
        msgs = super().messages(obs, history, memory)
        self.sent.append(msgs)
        self.inputs.append((obs, list(history), memory))
        return msgs


class SpyOpenAI(OpenAIPolicy):
    """OpenAIPolicy recording its act inputs (what it sent is read from the peer's requests)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: list[tuple[Observation, list[Step], MemoryContext]] = []

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Any:
        self.inputs.append((obs, list(history), memory))
        return super().act(obs, history, memory)


@pytest.fixture(scope="module")
def tw() -> Iterator[Any]:
    env = make_env("textworld", n_train=1)
    yield env
    env.close()


def _answers() -> list[tuple[int, str]]:
    cmds = ["look", "inventory", "look", "inventory", "look"]
    return [(200, json.dumps({"thought": f"try {c}", "command": c})) for c in cmds]


def _run(kind: str, memory: bool, tw: Any, tiny_model_dir: Path, chat_peer: Callable[..., ChatPeer]):
    """(trajectory after a JSON round trip, messages sent per step, act inputs per step, options)."""
    fmt = "command" if kind == "hf-rank" else "json"
    opts = OPTIONS[fmt]
    if kind == "openai":
        peer = chat_peer(_answers())
        policy: Any = SpyOpenAI("m", base_url=peer.url, response_format="none", prompt=opts)
    else:
        mode = "rank" if kind == "hf-rank" else "generate"
        policy = SpyHF(tiny_model_dir, mode=mode, max_tokens=8, device="cpu", prompt=opts)
    task = tw.tasks("train")[0]
    traj = run_episode(tw, policy, task, hooks=MemoryHooks() if memory else NoHooks(), max_steps=STEPS)
    assert len(traj.steps) == STEPS and all(s.action.text for s in traj.steps)
    sent = [r["messages"] for r in peer.requests] if kind == "openai" else policy.sent
    # Like the store: the trajectory is JSON; only what it records may go into the prompt.
    traj = Trajectory.model_validate_json(traj.model_dump_json())
    return traj, sent, policy.inputs, opts


@pytest.mark.slow
@pytest.mark.parametrize("memory", [True, False], ids=["memory", "no-memory"])
@pytest.mark.parametrize("kind", ["openai", "hf-generate", "hf-rank"])
def test_synth_messages_are_the_policy_prompts_byte_for_byte(
    kind: str, memory: bool, tw: Any, tiny_model_dir: Path, chat_peer: Callable[..., ChatPeer]
) -> None:
    traj, sent, inputs, opts = _run(kind, memory, tw, tiny_model_dir, chat_peer)
    # One prompt per step (the HF generate policy's repair prompts are not first prompts).
    assert len(sent) == STEPS
    for k in range(STEPS):
        example = step_example_messages(traj, k, opts)
        assert example[:-1] == sent[k], f"step {k}"
        assert example[-1] == {
            "role": "assistant",
            "content": answer_text(traj.steps[k].action, opts.action_format),
        }
        # The memory block shown (retrieved memory and/or the graph's replanning notes) is recorded.
        assert (f"step {k} of the episode" in traj.steps[k].memory_prompt) == memory
        assert traj.steps[k].memory_prompt in sent[k][-1]["content"]

    # The trainable steps of a successful trajectory are the SFT examples, with the same prompts.
    won = traj.model_copy(update={"outcome": Outcome.success})
    examples = sft_examples([won], options=opts)
    trainable = [k for k, s in enumerate(traj.steps) if not s.error]
    assert [e.metadata["step"] for e in examples] == trainable
    for e in examples:
        k = e.metadata["step"]
        assert e.kind == ExampleKind.sft and e.messages[:-1] == sent[k]
    if kind == "openai":
        # The JSON answer rendered for training is exactly what the model wrote.
        assert [e.messages[-1]["content"] for e in examples] == [a[1] for a in _answers()[:STEPS]]

    # Privileged examples: the student view is stored; the teacher view rendered from it equals
    # the layout's rendering of the live step inputs with the privileged block.
    gold = Privileged(gold_actions=["open door", "go east", "take key"])
    priv = privileged_examples([traj], {traj.task_id: gold}, [SKILL], options=opts)
    context = privileged_context(gold, [SKILL])
    assert len(priv) == STEPS and all(p.privileged_context == context for p in priv)
    for k, p in enumerate(priv):
        assert p.messages[:-1] == sent[k]  # the student view
        obs, history, mem = inputs[k]
        teacher = build_messages(traj.goal, obs, history, mem, opts, privileged=context)
        assert add_privileged(p.messages, context)[:-1] == teacher
        assert (
            "<privileged>" in teacher[-1]["content"]
            and "Reference solution: open door" in teacher[-1]["content"]
        )
        assert teacher[-1]["content"].endswith(
            sent[k][-1]["content"].rsplit("\n\n", 1)[1]
        )  # format line last
