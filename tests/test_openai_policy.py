"""OpenAIPolicy against real OpenAI-compatible servers: ``transformers serve`` on a tiny model, and
the scripted :class:`conftest.ChatPeer` (a stdlib HTTP server) for what no installable server shows
on demand (llama.cpp's HTTP 500 on ``json_schema``, transient 503s, a well-formed answer).

The tiny model decodes greedily to an answer with no command in it, which is exactly what
exercises repair, retry and fallback. The server ignores ``response_format`` (it logs "Ignoring
unsupported fields"), so it also shows the "accepted but ignored" case. The real ``openai``
client code runs in every test.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ChatPeer

from evolve.agents.base import Decision, Policy
from evolve.agents.policies import make_policy
from evolve.agents.policies.openai_policy import OpenAIPolicy
from evolve.errors import PolicyError
from evolve.schema import ActionSource, EnvState, MemoryContext, Observation, Task

ACTIONS = ["look", "go north", "take apple", "open fridge", "put apple in fridge", "inventory"]
TASK = Task(id="kitchen-1", env="toy", goal="put the apple in the fridge")
GOOD = '{"thought": "the apple goes in the fridge", "command": "take apple"}'


def _obs(actions: list[str] | None = ACTIONS) -> Observation:
    return Observation(
        text="You are in the kitchen. There is a fridge and an apple.",
        state=EnvState(location="kitchen", score=0, max_score=1),
        goal=TASK.goal,
        admissible_actions=actions,
    )


def _policy(base_url: str, model: str, **kw: object) -> OpenAIPolicy:
    opts: dict = {"max_tokens": 16, "timeout_s": 30.0, "max_retries": 1}
    opts.update(kw)
    p = OpenAIPolicy(model, base_url=base_url, **opts)
    p.reset(TASK)
    return p


# --------------------------------------------------------------------------- transformers serve


@pytest.mark.slow
def test_serve_unusable_answer_is_retried_once_then_falls_back(
    serve_url: str, served_model_dir: Path
) -> None:
    # Greedy decoding of the tiny model yields no command: the answer, one retry with an error
    # note, then the fallback action, with both calls' tokens counted.
    policy = _policy(serve_url, str(served_model_dir), max_tokens=8, temperature=0.0, max_retries=0)
    assert isinstance(policy, Policy)
    d = policy.act(_obs(), [], MemoryContext(notes=["Do not repeat 'look'."]))
    assert isinstance(d, Decision)
    assert policy.calls == 2
    assert d.action.source == ActionSource.fallback and d.action.text == "look"
    assert d.error is not None and d.error.startswith("invalid model output after retry")
    assert d.usage.completion_tokens == 16 and d.usage.prompt_tokens > 0
    assert d.latency_s > 0
    assert policy.total_usage == d.usage
    assert d.token_ids is None and d.logprobs is None  # not asked for
    # The server accepted the first response_format variant (it ignores it): detected once.
    assert policy.detected_format == "json_schema"


@pytest.mark.slow
def test_serve_without_admissible_list_falls_back_to_look(serve_url: str, served_model_dir: Path) -> None:
    # No list to match against: an answer without a command is still unusable, and 'look' is the
    # fallback when nothing is known to be admissible.
    policy = _policy(serve_url, str(served_model_dir), max_tokens=8, temperature=0.0, max_retries=0)
    d = policy.act(_obs(actions=None), [], MemoryContext())
    assert policy.calls == 2
    assert d.action.text == "look" and d.action.source == ActionSource.fallback
    assert d.error is not None and "no command found" in d.error


@pytest.mark.slow
def test_serve_wrong_model_name_is_a_step_error_then_a_policy_error(serve_url: str) -> None:
    # transformers serve answers HTTP 400 when asked for a model it is not pinned to.
    policy = _policy(serve_url, "no-such-model", max_failed_requests=2)
    d = policy.act(_obs(), [], MemoryContext())
    assert d.error is not None and "HTTP 400" in d.error and d.action.text == "look"
    with pytest.raises(PolicyError, match="no-such-model"):
        policy.act(_obs(), [], MemoryContext())


@pytest.mark.slow
def test_make_policy_builds_openai_from_a_spec(serve_url: str, served_model_dir: Path) -> None:
    policy = make_policy(
        {"kind": "openai", "model": str(served_model_dir), "base_url": serve_url, "max_tokens": 8,
         "cost_per_1k_prompt": 1.0, "cost_per_1k_completion": 2.0}
    )  # fmt: skip
    policy.reset(TASK)
    d = policy.act(_obs(), [], MemoryContext())
    assert d.action.text == "look"
    assert d.usage.completion_tokens == 16
    expected = d.usage.prompt_tokens / 1000 + 2 * d.usage.completion_tokens / 1000
    assert d.usage.cost_usd == pytest.approx(expected)


# --------------------------------------------------------------------------- dead endpoint, secrets


def test_dead_endpoint_raises_one_line_policy_error(free_port: Callable[[], int]) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    policy = _policy(base_url, "m", max_retries=1, timeout_s=1.0)
    with pytest.raises(PolicyError) as info:
        policy.act(_obs(), [], MemoryContext())
    msg = str(info.value)
    assert base_url in msg and "cannot connect after 2 attempts" in msg and "\n" not in msg


def test_failing_server_is_retried_by_the_client_then_a_policy_error(
    chat_peer: Callable[..., ChatPeer],
) -> None:
    peer = chat_peer([(503, "overloaded")])
    policy = _policy(peer.url, "m", max_retries=2, response_format="none")
    with pytest.raises(PolicyError) as info:
        policy.act(_obs(), [], MemoryContext())
    assert len(peer.requests) == 3  # the first attempt and the openai client's 2 retries
    assert "HTTP 503 after 3 attempts" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("status", "hint"), [(401, "$OPENAI_API_KEY"), (404, "model name")])
def test_auth_and_unknown_model_stop_at_once(
    chat_peer: Callable[..., ChatPeer], status: int, hint: str
) -> None:
    peer = chat_peer([(status, "nope")])
    policy = _policy(peer.url, "m", max_retries=3)
    with pytest.raises(PolicyError, match=f"HTTP {status}") as info:
        policy.act(_obs(), [], MemoryContext())
    assert hint in str(info.value)
    assert len(peer.requests) == 1  # never retried, never re-negotiated


def test_api_key_is_never_pickled_or_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOLVE_TEST_KEY", "sk-very-secret")
    policy = OpenAIPolicy("m", base_url="http://127.0.0.1:9/v1", api_key_env="EVOLVE_TEST_KEY")
    assert policy.client().api_key == "sk-very-secret"
    assert b"sk-very-secret" not in pickle.dumps(policy)
    assert "sk-very-secret" not in repr(policy) + repr(policy.__dict__) + repr(policy.chat.__dict__.keys())
    clone = pickle.loads(pickle.dumps(policy))
    assert clone.client().api_key == "sk-very-secret"  # rebuilt from the env var


# --------------------------------------------------------------------------- protocol peer


def test_llama_cpp_style_endpoint_negotiates_json_object(chat_peer: Callable[..., ChatPeer]) -> None:
    peer = chat_peer([(200, GOOD)], reject_formats=("json_schema",), reject_status=500)
    policy = _policy(peer.url, "qwen", max_retries=3)
    d = policy.act(_obs(), [], MemoryContext())
    assert d.error is None and d.action.text == "take apple" and d.action.source == ActionSource.policy
    assert d.action.thought.startswith("the apple")
    assert policy.detected_format == "json_object"
    # The 500 for json_schema is a refusal of the variant, not retried: exactly two requests.
    assert [r["response_format"]["type"] for r in peer.requests] == ["json_schema", "json_object"]
    assert peer.requests[-1]["response_format"]["schema"]["properties"]["command"]["enum"] == ACTIONS
    # Detected once per endpoint: the next step (from a fresh policy too) skips json_schema.
    _policy(peer.url, "qwen").act(_obs(), [], MemoryContext())
    assert len(peer.requests) == 3 and peer.requests[-1]["response_format"]["type"] == "json_object"


def test_transient_errors_are_retried_and_bad_json_repaired(chat_peer: Callable[..., ChatPeer]) -> None:
    peer = chat_peer(
        [
            (503, "overloaded"),
            (200, "Sure! I think we should OPEN THE FRIDGE now."),  # no JSON: fuzzy/verbatim repair
        ]
    )
    policy = _policy(peer.url, "m2", response_format="none", max_retries=2)
    d = policy.act(_obs(), [], MemoryContext())
    assert d.error is None and d.action.text == "open fridge"
    assert len(peer.requests) == 2 and policy.calls == 1 and d.usage.prompt_tokens == 11

    peer.script = [
        (200, '{"thought": "x", "command": "fly to the moon"}'),
        (200, '{"command": "Go  North."}'),
    ]
    d = policy.act(_obs(), [], MemoryContext())
    assert d.error is None and d.action.text == "go north"  # retried once, then normalised
    assert "not usable" in peer.requests[-1]["messages"][-1]["content"]


def test_refused_request_is_one_step_error(chat_peer: Callable[..., ChatPeer]) -> None:
    # A 400 that is not about response_format (e.g. context too long) costs one step, not the run.
    peer = chat_peer([(400, "context length exceeded"), (200, GOOD)])
    policy = _policy(peer.url, "m", response_format="json_schema", max_failed_requests=2)
    d = policy.act(_obs(), [], MemoryContext())
    assert d.action.source == ActionSource.fallback and d.error is not None
    assert "request refused (HTTP 400: context length exceeded)" in d.error
    d = policy.act(_obs(), [], MemoryContext())
    assert d.error is None and d.action.text == "take apple"


def test_logprobs_of_the_answer_come_back_when_asked(chat_peer: Callable[..., ChatPeer]) -> None:
    peer = chat_peer([(200, GOOD)], token_ids=True)
    policy = _policy(peer.url, "m", response_format="none", top_logprobs=3)
    d = policy.act(_obs(), [], MemoryContext())
    assert peer.requests[-1]["logprobs"] is True and peer.requests[-1]["top_logprobs"] == 3
    n = len(GOOD.split())
    assert d.token_ids == list(range(100, 100 + n)) and d.logprobs == [pytest.approx(-0.5)] * n
