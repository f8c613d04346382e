"""Issue 18: a re-ask after a guardrail or loop-guard block neither lists nor accepts the refused
action, through the real policy paths: OpenAIPolicy against a real local OpenAI-compatible HTTP
server (:class:`conftest.ChatPeer`) inside the agent graph on a real TextWorld game, and HFPolicy
on a tiny model built from a config.

The 1.5B ScienceWorld run spent steps 11-14 of an ADAPT trial proposing an action the loop guard
had refused, because every re-ask showed it the same list (BENCHMARKS.md, ADAPT curve).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ChatPeer

from evolve.agents.graph import run_episode
from evolve.agents.policies.openai_policy import OpenAIPolicy
from evolve.diagnose import diff_states
from evolve.envs import make_env
from evolve.llm.prompts import PromptOptions, allowed_actions, blocked_actions, build_messages, step_messages
from evolve.schema import (
    BLOCKED_TITLE,
    EnvState,
    FailureCause,
    Guardrail,
    GuardrailScope,
    KnowledgeStatus,
    MemoryContext,
    Observation,
    Task,
)
from evolve.skills import EvolveMemory, MemoryConfig


@pytest.fixture(scope="module")
def tw():
    env = make_env("textworld", n_train=1, n_dev=0, n_test=0)
    yield env
    env.close()


def _enum(request: dict[str, Any]) -> list[str] | None:
    """The command enum of a request's JSON schema, whichever response_format variant carried it."""
    fmt = request.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema") or {}
    return schema.get("properties", {}).get("command", {}).get("enum")


def _listed(request: dict[str, Any]) -> list[str]:
    """The admissible actions listed in a request's prompt (the last message that lists them: a
    repair request ends with the error note)."""
    text = next(m["content"] for m in reversed(request["messages"]) if "Admissible actions" in m["content"])
    section = text.split("Admissible actions", 1)[1].split("\n\n", 1)[0]
    return [ln[2:] for ln in section.splitlines() if ln.startswith("- ")]


def _answer(command: str) -> tuple[int, str]:
    return (200, json.dumps({"thought": "test", "command": command}))


def test_blocked_section_round_trips_through_the_recorded_block() -> None:
    memory = MemoryContext(notes=["n"], blocked=["go north", "go north", "take key"])
    text = memory.prompt_text()
    assert text.endswith(f"{BLOCKED_TITLE}\n- go north\n- take key")
    assert blocked_actions(text) == blocked_actions(memory) == ["go north", "take key"]
    assert allowed_actions(["Go  North", "look", "take key"], text) == ["look"]
    # Refusing everything would leave nothing to answer with: the list is kept whole.
    assert allowed_actions(["take key"], text) == ["take key"]
    assert allowed_actions(None, text) is None
    obs = Observation(
        text="A room.", state=EnvState(location="room"), admissible_actions=["go north", "look"]
    )
    msgs = build_messages("escape", obs, [], text, PromptOptions())
    assert "- look" in msgs[-1]["content"] and "Admissible actions:\n- look\n" in msgs[-1]["content"]


def test_openai_reask_drops_the_guardrail_blocked_action(tw: Any, chat_peer: Callable[..., ChatPeer]) -> None:
    task = tw.tasks("train")[0]
    obs = tw.reset(task)
    admissible = obs.admissible_actions or []
    bad, good = "look", next(a for a in admissible if a not in ("look", "inventory"))
    assert bad in admissible
    peer = chat_peer([_answer(bad), _answer(good)])
    policy = OpenAIPolicy("peer-model", base_url=peer.url, max_tokens=32, max_retries=0, timeout_s=30.0)
    rule = Guardrail(
        root_cause=FailureCause.no_effect,
        forbidden_action="look",
        scope=GuardrailScope.subgoal,
        status=KnowledgeStatus.active,
        description="looking changes nothing",
    )
    memory = EvolveMemory([rule], config=MemoryConfig(episodic_guard=False))
    traj = run_episode(tw, policy, task, hooks=memory, max_steps=1)

    first, second = peer.requests[0], peer.requests[1]
    assert bad in _enum(first) and bad in _listed(first)
    # The re-ask: the refused action is neither offered nor allowed by the schema.
    assert bad not in _enum(second) and good in _enum(second)
    assert bad not in _listed(second)
    assert f"{BLOCKED_TITLE}\n- {bad}" in second["messages"][-1]["content"]
    assert len(peer.requests) == 2
    step = traj.steps[0]
    assert step.action.text == good
    # The recorded step re-renders the re-ask's prompt byte for byte (what synth trains on).
    assert step_messages(traj.goal, traj.steps, 0, policy.prompt) == second["messages"]


def test_openai_loop_guard_refusal_is_off_the_list_before_the_model_is_asked(
    tw: Any, chat_peer: Callable[..., ChatPeer]
) -> None:
    # The model insists on an action that changes nothing. After it failed once in a state, the
    # loop guard refuses it there; the next step's first request already lists it as refused.
    task = tw.tasks("train")[0]
    peer = chat_peer([_answer("look")])
    policy = OpenAIPolicy("peer-model", base_url=peer.url, max_tokens=32, max_retries=0, timeout_s=30.0)
    traj = run_episode(tw, policy, task, hooks=EvolveMemory([]), max_steps=2)
    assert traj.steps[0].action.text == "look"
    assert diff_states(traj.steps[0].pre_state.state, traj.steps[0].post_state.state).empty
    later = peer.requests[1:]
    assert later and all("look" not in (_enum(r) or []) and "look" not in _listed(r) for r in later)
    assert all(any(BLOCKED_TITLE in m["content"] for m in r["messages"]) for r in later)
    # Never sent to the env twice in the same state; no step was spent blocked.
    assert traj.steps[1].action.text != "look"
    assert "guardrail_blocked" not in traj.steps[1].post_state.info


def test_hf_rank_never_picks_a_refused_action(tiny_model_dir: Path) -> None:
    from evolve.agents.policies import HFPolicy

    actions = ["look", "go north", "take apple", "open fridge", "put apple in fridge", "inventory"]
    obs = Observation(
        text="You are in the kitchen.",
        state=EnvState(location="kitchen"),
        goal="put the apple in the fridge",
        admissible_actions=actions,
    )
    p = HFPolicy(tiny_model_dir, mode="rank")
    p.reset(Task(id="k", env="toy", goal=obs.goal))
    first = p.act(obs, [], MemoryContext()).action.text
    again = p.act(obs, [], MemoryContext(blocked=[first]))
    assert again.action.text in actions and again.action.text != first
    assert first not in json.loads(again.action.raw or "{}")  # not even scored
