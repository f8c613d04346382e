"""LLMDiagnoser against a real local HTTP server speaking the OpenAI chat-completions protocol.

The server is :class:`conftest.ChatPeer`, a stdlib ``http.server`` answering scripted content: a
protocol peer for the validation / repair / rejection / retry logic. The real ``openai`` client
code (and its own retries) runs against it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from evolve.diagnose import diagnose_trajectory
from evolve.diagnose.llm import LLMDiagnoser, parse_verdict
from evolve.schema import Action, EnvState, FailureCause, Observation, Outcome, Step, Trajectory
from evolve.text import extract_json_object

VALID = json.dumps(
    {
        "root_cause": "The agent never looked for the key that opens the north door.",
        "causes": ["precondition_unmet", "loop"],
        "evidence": "step 0: 'The door is locked.'",
    }
)


def diagnoser(url: str, **kw: Any) -> LLMDiagnoser:
    opts: dict[str, Any] = {"timeout": 5.0, "max_retries": 2}
    opts.update(kw)
    return LLMDiagnoser("test-model", url, **opts)


def failed_episode() -> Trajectory:
    """Locked door, then gibberish twice in the same state: precondition, invalid actions, a loop."""
    s = Observation(text="You are in a hall. A door leads north.", state=EnvState(location="hall"))

    def step(i: int, action: str, text: str) -> Step:
        post = s.model_copy(update={"text": text})
        return Step(index=i, pre_state=s, action=Action(text=action), post_state=post)

    steps = [
        step(0, "go north", "The door is locked."),
        step(1, "xyzzy", "I don't understand that."),
        step(2, "xyzzy", "I don't understand that."),
    ]
    traj = Trajectory(
        task_id="t1", env="textworld", goal="Go north.", outcome=Outcome.step_limit, steps=steps
    )
    return diagnose_trajectory(traj, step_limit=3)


def rule_diagnosis(traj: Trajectory):  # noqa: ANN201 - Diagnosis
    assert traj.diagnosis is not None
    return traj.diagnosis


# --------------------------------------------------------------------------- parsing (no server)


def test_parse_verdict_strict_repair_and_reject() -> None:
    v = parse_verdict(VALID)
    assert v is not None and v.causes == [FailureCause.precondition_unmet, FailureCause.loop]
    prose = 'Here you go:\n```json\n{"root_cause": "x", "causes": ["Invalid Action", "made_up"], "evidence": "e"}\n```'
    r = parse_verdict(prose)
    assert r is not None and r.root_cause == "x" and r.causes == [FailureCause.invalid_action]
    assert parse_verdict("the agent was confused") is None
    assert parse_verdict('{"causes": ["loop"], "evidence": "no root cause"}') is None
    assert parse_verdict('{"root_cause": "", "causes": [], "evidence": ""}') is None
    assert extract_json_object('noise {"a": {"b": 1}} {"c": 2}') == {"a": {"b": 1}}


# --------------------------------------------------------------------------- against the server


def test_valid_json_is_accepted_and_never_removes_rule_causes(chat_peer: Callable[..., Any]) -> None:
    srv = chat_peer([(200, VALID)])
    traj = failed_episode()
    rule = rule_diagnosis(traj)
    assert rule.cause_names() == ["invalid_action", "precondition_unmet", "loop", "step_limit"]
    out = diagnoser(srv.url).refine(traj)
    assert out.source == "llm"
    assert out.root_cause == "The agent never looked for the key that opens the north door."
    # Both LLM causes were already found by the rules: nothing added, nothing removed.
    assert out.causes == rule.causes
    assert rule.source == "rules" and rule.root_cause != out.root_cause  # the input was not mutated
    req = srv.requests[0]
    assert req["model"] == "test-model"
    assert req["response_format"]["type"] == "json_schema"
    assert req["response_format"]["json_schema"]["schema"]["required"] == ["root_cause", "causes", "evidence"]
    assert [m["role"] for m in req["messages"]] == ["system", "user"]
    assert "Goal: Go north." in req["messages"][1]["content"]
    assert "> xyzzy" in req["messages"][1]["content"]


def test_unknown_cause_names_are_repaired(chat_peer: Callable[..., Any]) -> None:
    content = (
        "Diagnosis follows.\n```json\n"
        '{"root_cause": "It typed gibberish.", "causes": ["Regression", "bad_planning", "loop"], '
        '"evidence": "steps 1-2"}\n```'
    )
    srv = chat_peer([(200, content)])
    traj = failed_episode()
    out = diagnoser(srv.url).refine(traj)
    assert out.source == "llm" and out.root_cause == "It typed gibberish."
    assert out.cause_names() == rule_diagnosis(traj).cause_names() + ["regression"]
    assert out.causes[-1].evidence == "llm: steps 1-2"


@pytest.mark.parametrize(
    "content",
    [
        "I think the agent was confused by the door.",
        '{"causes": ["loop"], "evidence": "no root cause given"}',
        '{"root_cause": 42, "causes": "loop"',
        "",
    ],
)
def test_garbage_is_rejected_and_rule_diagnosis_kept(
    chat_peer: Callable[..., Any], caplog: pytest.LogCaptureFixture, content: str
) -> None:
    srv = chat_peer([(200, content)])
    traj = failed_episode()
    with caplog.at_level(logging.WARNING, logger="evolve.diagnose.llm"):
        out = diagnoser(srv.url).refine(traj)
    assert out == rule_diagnosis(traj)
    assert out.source == "rules"
    assert "rejected" in caplog.text


def test_server_errors_are_retried(chat_peer: Callable[..., Any]) -> None:
    # The first (probing) request fails transiently; the openai client's own retries take over.
    srv = chat_peer([(503, ""), (429, ""), (502, ""), (200, VALID)])
    d = diagnoser(srv.url, max_retries=3)
    assert d.refine(failed_episode()).source == "llm"
    assert len(srv.requests) == 4
    assert d.response_format_variant == "json_schema"  # a 503 is not a refusal of the variant


def test_retries_exhausted_keeps_rule_diagnosis(
    chat_peer: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    srv = chat_peer([(503, "")])
    traj = failed_episode()
    with caplog.at_level(logging.WARNING, logger="evolve.diagnose.llm"):
        out = diagnoser(srv.url, max_retries=2).refine(traj)
    assert out == rule_diagnosis(traj)
    assert len(srv.requests) == 3
    assert "LLMServerError" in caplog.text and "HTTP 503 after 3 attempts" in caplog.text


def test_timeout_is_retried(chat_peer: Callable[..., Any]) -> None:
    srv = chat_peer([("sleep", 1.0, VALID), (200, VALID)])
    out = diagnoser(srv.url, timeout=0.3, max_retries=1).refine(failed_episode())
    assert out.source == "llm"
    assert len(srv.requests) == 2


def test_server_down_does_not_crash(free_port: Callable[[], int], caplog: pytest.LogCaptureFixture) -> None:
    traj = failed_episode()
    with caplog.at_level(logging.WARNING, logger="evolve.diagnose.llm"):
        out = diagnoser(f"http://127.0.0.1:{free_port()}/v1", max_retries=1).refine(traj)
    assert out == rule_diagnosis(traj)
    assert "unavailable" in caplog.text and "LLMConnectionError" in caplog.text


def test_response_format_variant_detected_once_per_endpoint(chat_peer: Callable[..., Any]) -> None:
    # llama-cpp-python refuses type json_schema but takes json_object with a schema beside it.
    srv = chat_peer([(200, VALID)], reject_formats=("json_schema",))
    d = diagnoser(srv.url)
    assert d.refine(failed_episode()).source == "llm"
    assert [r["response_format"]["type"] for r in srv.requests] == ["json_schema", "json_object"]
    assert srv.requests[1]["response_format"]["schema"]["properties"]["causes"]["items"]["enum"][0] == (
        "invalid_action"
    )
    assert d.response_format_variant == "json_object"
    # A second diagnoser on the same endpoint goes straight to the detected variant.
    assert diagnoser(srv.url).refine(failed_episode()).source == "llm"
    assert [r["response_format"]["type"] for r in srv.requests[2:]] == ["json_object"]


def test_endpoint_refusing_all_formats_is_prompted_plainly(chat_peer: Callable[..., Any]) -> None:
    srv = chat_peer([(200, "Answer: " + VALID)], reject_formats=("json_schema", "json_object"))
    d = diagnoser(srv.url)
    assert d.refine(failed_episode()).source == "llm"
    assert "response_format" not in srv.requests[-1]
    assert d.response_format_variant == "none"


def test_won_episode_makes_no_call_and_api_key_comes_from_env(
    chat_peer: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = chat_peer([(200, VALID)])
    won = failed_episode().model_copy(update={"outcome": Outcome.success})
    assert won.diagnosis is not None
    assert diagnoser(srv.url).refine(won, won.diagnosis) == won.diagnosis
    assert srv.requests == []

    monkeypatch.setenv("EVOLVE_TEST_KEY", "sk-local")
    diagnoser(srv.url, api_key_env="EVOLVE_TEST_KEY").refine(failed_episode())
    monkeypatch.delenv("EVOLVE_TEST_KEY")
    diagnoser(srv.url, api_key_env="EVOLVE_TEST_KEY").refine(failed_episode())
    auth = [h.get("Authorization") or h.get("authorization") for h in srv.headers]
    assert auth == ["Bearer sk-local", "Bearer EMPTY"]


def test_diagnose_trajectory_fills_steps_and_refines_episode(chat_peer: Callable[..., Any]) -> None:
    srv = chat_peer([(200, VALID)])
    raw = failed_episode().model_copy(update={"diagnosis": None})
    for s in raw.steps:
        s.diagnosis = None
    out = diagnoser(srv.url).diagnose_trajectory(raw, step_limit=3)
    assert all(s.diagnosis is not None and s.diagnosis.source == "rules" for s in out.steps)
    assert out.diagnosis is not None and out.diagnosis.source == "llm"
    assert Trajectory.model_validate_json(out.model_dump_json()) == out
