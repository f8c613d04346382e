"""ChatClient against a real local HTTP peer speaking the OpenAI protocol (the real openai client runs)."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import pytest
from conftest import ChatPeer

from evolve.errors import (
    LLMAnswerError,
    LLMAuthError,
    LLMConnectionError,
    LLMModelNotFound,
    LLMRequestError,
    LLMServerError,
)
from evolve.llm.client import ChatClient

MSGS = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}


def test_usage_cost_and_plain_requests(chat_peer: Callable[..., ChatPeer]) -> None:
    peer = chat_peer([(200, 'Here: {"a": "x"}')], usage=(1000, 500))
    chat = ChatClient("m", base_url=peer.url, cost_per_1k_prompt=1.0, cost_per_1k_completion=4.0)
    out = chat.complete(MSGS, temperature=0.0, max_tokens=5, seed=3)
    assert out.text == 'Here: {"a": "x"}' and out.json() == {"a": "x"}
    assert out.usage.prompt_tokens == 1000 and out.usage.cost_usd == pytest.approx(3.0)
    assert out.response_format == "none" and out.logprobs is None
    body = peer.requests[-1]
    assert "response_format" not in body and body["seed"] == 3 and body["max_tokens"] == 5
    assert chat.detected_format is None  # no schema asked: nothing negotiated
    chat.complete(MSGS)
    assert chat.calls == 2 and chat.total_usage.cost_usd == pytest.approx(6.0)
    peer.script = [(200, "no json here")]
    with pytest.raises(LLMAnswerError, match="no JSON object"):
        chat.complete(MSGS).json()


def test_negotiation_falls_through_to_plain_prompting_and_is_cached(
    chat_peer: Callable[..., ChatPeer],
) -> None:
    peer = chat_peer([(200, '{"a": "x"}')], reject_formats=("json_schema", "json_object"))
    chat = ChatClient("m", base_url=peer.url)
    assert chat.complete(MSGS, schema=SCHEMA).response_format == "none"
    assert [(r.get("response_format") or {}).get("type") for r in peer.requests] == [
        "json_schema",
        "json_object",
        None,
    ]
    assert ChatClient("m", base_url=peer.url).detected_format == "none"  # per endpoint, for the process
    assert ChatClient("other", base_url=peer.url).detected_format is None  # per model too
    chat.complete(MSGS, schema=SCHEMA)
    assert len(peer.requests) == 4


def test_top_logprobs_with_token_ids_make_a_teacher_record(chat_peer: Callable[..., ChatPeer]) -> None:
    peer = chat_peer([(200, "open the door")], token_ids=True)
    out = ChatClient("m", base_url=peer.url).complete(MSGS, top_logprobs=2)
    assert peer.requests[-1]["logprobs"] is True and peer.requests[-1]["top_logprobs"] == 2
    lp = out.logprobs
    assert (
        lp is not None
        and lp.token_ids == [100, 101, 102]
        and lp.top_ids == [[100, 101], [101, 102], [102, 103]]
    )
    rec = lp.teacher_logprobs("h1", "m@peer")
    assert rec.token_ids == lp.top_ids and rec.logprobs[0] == pytest.approx([-0.5, -1.5])
    assert rec.tail_logprob[0] == pytest.approx(math.log1p(-(math.exp(-0.5) + math.exp(-1.5))))

    peer.token_ids = False  # token strings only (OpenAI, llama.cpp): no ids, no cache record
    lp = ChatClient("m", base_url=peer.url).complete(MSGS, top_logprobs=2).logprobs
    assert lp is not None and lp.tokens == ["open", "the", "door"] and lp.token_ids is None
    with pytest.raises(LLMAnswerError, match="without ids"):
        lp.teacher_logprobs("h1", "m@peer")


@pytest.mark.parametrize(
    ("status", "kind", "needle"),
    [
        (401, LLMAuthError, "check $OPENAI_API_KEY"),
        (403, LLMAuthError, "HTTP 403"),
        (404, LLMModelNotFound, "check the model name and base_url"),
        (400, LLMRequestError, "request refused (HTTP 400: scripted 400)"),
        (503, LLMServerError, "HTTP 503 after 2 attempts"),
    ],
)
def test_each_failure_kind_is_one_line(
    chat_peer: Callable[..., ChatPeer], status: int, kind: type, needle: str
) -> None:
    peer = chat_peer([(status, "")])
    chat = ChatClient("m", base_url=peer.url, max_retries=1)
    with pytest.raises(kind) as info:
        chat.complete(MSGS)
    msg = str(info.value)
    assert needle in msg and peer.url in msg and "'m'" in msg and "\n" not in msg
    assert info.value.status == status
    assert len(peer.requests) == (2 if status >= 500 else 1)  # only 5xx is retried


def test_unreachable_and_timeout_are_connection_errors(
    chat_peer: Callable[..., ChatPeer], free_port: Callable[[], int]
) -> None:
    with pytest.raises(LLMConnectionError, match="cannot connect after 1 attempts"):
        ChatClient("m", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0).complete(MSGS)
    peer = chat_peer([("sleep", 1.0, "late")])
    with pytest.raises(LLMConnectionError, match="no answer within 0.2 s after 1 attempts"):
        ChatClient("m", base_url=peer.url, timeout_s=0.2, max_retries=0).complete(MSGS)


def test_probe_tells_obeyed_from_ignored(chat_peer: Callable[..., ChatPeer]) -> None:
    obeys = chat_peer([(200, '{"color": "zqx-violet"}')], reject_formats=("json_schema",), reject_status=500)
    assert ChatClient("m", base_url=obeys.url).probe_response_format() == "json_object"
    assert ChatClient("m", base_url=obeys.url).detected_format == "json_object"
    ignores = chat_peer([(200, '{"color": "blue"}')])  # accepts every variant, obeys none
    assert ChatClient("m", base_url=ignores.url).probe_response_format() == "none"


def test_key_is_read_from_env_and_never_pickled(
    chat_peer: Callable[..., ChatPeer], monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = chat_peer([(200, "ok")])
    monkeypatch.setenv("EVOLVE_TEST_KEY", "sk-secret-1")
    chat = ChatClient("m", base_url=peer.url, api_key_env="EVOLVE_TEST_KEY")
    chat.complete(MSGS)
    assert b"sk-secret-1" not in pickle.dumps(chat)
    pickle.loads(pickle.dumps(chat)).complete(MSGS)
    assert [h.get("Authorization") or h.get("authorization") for h in peer.headers] == [
        "Bearer sk-secret-1"
    ] * 2
