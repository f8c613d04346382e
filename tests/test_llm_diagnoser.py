"""LLMDiagnoser against a real local HTTP server speaking the OpenAI chat-completions protocol.

The server is a stdlib ``http.server`` that answers with scripted content: a protocol peer for the
validation / repair / rejection / retry logic. The real ``openai`` client code runs against it.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from evolve.diagnose import diagnose_trajectory
from evolve.diagnose import llm as llm_mod
from evolve.diagnose.llm import LLMDiagnoser, extract_json_object, parse_verdict
from evolve.schema import Action, EnvState, FailureCause, Observation, Outcome, Step, Trajectory

VALID = json.dumps(
    {
        "root_cause": "The agent never looked for the key that opens the north door.",
        "causes": ["precondition_unmet", "loop"],
        "evidence": "step 0: 'The door is locked.'",
    }
)


class ChatServer:
    """Scripted OpenAI-compatible endpoint on 127.0.0.1.

    ``script`` items are consumed one per request (the last one repeats): ``(200, content)`` answers a
    completion, ``(status, "")`` an error, ``("sleep", seconds)`` stalls then answers VALID.
    ``reject_formats`` are response_format types refused with 422, as llama-cpp-python does.
    """

    def __init__(self, script: list[tuple[Any, Any]], reject_formats: tuple[str, ...] = ()) -> None:
        self.script = list(script)
        self.reject_formats = reject_formats
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                fmt = (body.get("response_format") or {}).get("type")
                if fmt in server.reject_formats:
                    self._send(422, {"detail": [{"msg": f"response_format.type {fmt!r} not permitted"}]})
                    return
                kind, arg = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if kind == "sleep":
                    time.sleep(arg)
                    kind, arg = 200, VALID
                if kind != 200:
                    self._send(kind, {"error": {"message": f"scripted {kind}", "type": "server_error"}})
                    return
                self._send(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", ""),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": arg},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # a stalled handler must not hold up the test
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[ChatServer] = []

    def start(script: list[tuple[Any, Any]], **kw: Any) -> ChatServer:
        servers.append(ChatServer(script, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def fresh_format_cache() -> Iterator[None]:
    # Detection is cached per endpoint for the process; a reused port must not inherit a verdict.
    llm_mod._FORMAT_CACHE.clear()
    yield
    llm_mod._FORMAT_CACHE.clear()


def diagnoser(url: str, **kw: Any) -> LLMDiagnoser:
    opts: dict[str, Any] = {"timeout": 5.0, "max_retries": 2, "backoff": 0.01}
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


def test_valid_json_is_accepted_and_never_removes_rule_causes(serve: Any) -> None:
    srv = serve([(200, VALID)])
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


def test_unknown_cause_names_are_repaired(serve: Any) -> None:
    content = (
        "Diagnosis follows.\n```json\n"
        '{"root_cause": "It typed gibberish.", "causes": ["Regression", "bad_planning", "loop"], '
        '"evidence": "steps 1-2"}\n```'
    )
    srv = serve([(200, content)])
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
    serve: Any, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    srv = serve([(200, content)])
    traj = failed_episode()
    with caplog.at_level(logging.WARNING, logger="evolve.diagnose.llm"):
        out = diagnoser(srv.url).refine(traj)
    assert out == rule_diagnosis(traj)
    assert out.source == "rules"
    assert "rejected" in caplog.text


def test_server_errors_are_retried(serve: Any) -> None:
    srv = serve([(500, ""), (429, ""), (503, ""), (200, VALID)])
    out = diagnoser(srv.url, max_retries=3).refine(failed_episode())
    assert out.source == "llm"
    assert len(srv.requests) == 4


def test_retries_exhausted_keeps_rule_diagnosis(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    srv = serve([(500, "")])
    traj = failed_episode()
    with caplog.at_level(logging.WARNING, logger="evolve.diagnose.llm"):
        out = diagnoser(srv.url, max_retries=2).refine(traj)
    assert out == rule_diagnosis(traj)
    assert len(srv.requests) == 3
    assert "InternalServerError" in caplog.text


def test_timeout_is_retried(serve: Any) -> None:
    srv = serve([("sleep", 1.0), (200, VALID)])
    out = diagnoser(srv.url, timeout=0.3, max_retries=1).refine(failed_episode())
    assert out.source == "llm"
    assert len(srv.requests) == 2


def test_server_down_does_not_crash(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    traj = failed_episode()
    with caplog.at_level(logging.WARNING, logger="evolve.diagnose.llm"):
        out = diagnoser(f"http://127.0.0.1:{port}/v1", max_retries=1).refine(traj)
    assert out == rule_diagnosis(traj)
    assert "unavailable" in caplog.text and "APIConnectionError" in caplog.text


def test_response_format_variant_detected_once_per_endpoint(serve: Any) -> None:
    # llama-cpp-python refuses type json_schema but takes json_object with a schema beside it.
    srv = serve([(200, VALID)], reject_formats=("json_schema",))
    d = diagnoser(srv.url)
    assert d.refine(failed_episode()).source == "llm"
    assert [r["response_format"]["type"] for r in srv.requests] == ["json_schema", "json_object"]
    assert srv.requests[1]["response_format"]["schema"]["properties"]["causes"]["items"]["enum"][0] == (
        "invalid_action"
    )
    assert d.response_format_variant == "json_object_schema"
    # A second diagnoser on the same endpoint goes straight to the detected variant.
    assert diagnoser(srv.url).refine(failed_episode()).source == "llm"
    assert [r["response_format"]["type"] for r in srv.requests[2:]] == ["json_object"]


def test_endpoint_refusing_all_formats_is_prompted_plainly(serve: Any) -> None:
    srv = serve([(200, "Answer: " + VALID)], reject_formats=("json_schema", "json_object"))
    d = diagnoser(srv.url)
    assert d.refine(failed_episode()).source == "llm"
    assert "response_format" not in srv.requests[-1]
    assert d.response_format_variant == "none"


def test_won_episode_makes_no_call_and_api_key_comes_from_env(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = serve([(200, VALID)])
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


def test_diagnose_trajectory_fills_steps_and_refines_episode(serve: Any) -> None:
    srv = serve([(200, VALID)])
    raw = failed_episode().model_copy(update={"diagnosis": None})
    for s in raw.steps:
        s.diagnosis = None
    out = diagnoser(srv.url).diagnose_trajectory(raw, step_limit=3)
    assert all(s.diagnosis is not None and s.diagnosis.source == "rules" for s in out.steps)
    assert out.diagnosis is not None and out.diagnosis.source == "llm"
    assert Trajectory.model_validate_json(out.model_dump_json()) == out
