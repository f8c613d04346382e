"""The one OpenAI-compatible chat client: policies, the LLM diagnoser, API teachers and bench helpers.

What is the ``openai`` client's and what is ours:

- **Retries follow the openai client's policy** (``max_retries``, ``timeout``): exponential
  backoff from 0.5 s (capped at 8 s, with jitter) that honours ``Retry-After``; connection errors,
  timeouts, 408, 409, 429 and 5xx are retried. The loop is ours (each attempt is the openai
  client's with ``max_retries=0``) because one call also has a **total deadline** (``deadline_s``,
  default twice ``timeout_s``): a hanging endpoint costs at most that, not ``timeout_s`` times
  every attempt, and no retry starts that could not finish in time.
- **Response-format negotiation is ours**, because servers disagree: OpenAI and vLLM take
  ``{"type": "json_schema", ...}``; llama-cpp-python answers that with HTTP 500 but takes
  ``{"type": "json_object", "schema": ...}``; some servers refuse both (plain prompting must do)
  and some accept and ignore them (``transformers serve``). The variants are tried in
  :data:`FORMAT_ORDER` on the first schema-constrained call to an endpoint and the first one
  accepted is cached per ``(base_url, model)`` for the process. While probing, a variant is sent
  without retries (a 500 there means "not this variant"); a transient failure (connection, 429,
  502-504) is then sent again through the client's own retries (the attempt spent counts).
- **One error per failure kind**: every failure surfaces as an :class:`~evolve.errors.LLMError`
  subclass with a one-line message naming the endpoint, the model and what to check.
- **Usage and cost** are summed per client; **top-k log-probs** of the generated tokens come back
  in a compact shape (:class:`TokenLogprobs`) an API teacher can cache.

The API key is read from the environment variable ``api_key_env`` when the openai client is
built; it is never stored on this object, logged or pickled.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from evolve.errors import (
    LLMAnswerError,
    LLMAuthError,
    LLMConnectionError,
    LLMError,
    LLMModelNotFound,
    LLMRequestError,
    LLMServerError,
)
from evolve.schema import TeacherLogprobs, TokenUsage
from evolve.text import extract_json_object, one_line

log = logging.getLogger(__name__)

ResponseFormat = Literal["auto", "json_schema", "json_object", "none"]

FORMAT_ORDER: tuple[str, ...] = ("json_schema", "json_object", "none")
"""The response_format variants tried, most standard first (``json_object`` carries the schema beside it)."""

# Statuses by which a server says "not this response_format" (llama-cpp-python: 500 for json_schema).
_REJECTS_FORMAT = frozenset({400, 422, 500, 501})
# Statuses the openai client retries by itself (besides connection errors and timeouts).
_TRANSIENT = frozenset({408, 409, 429})

_formats: dict[tuple[str, str], str] = {}
_formats_lock = threading.Lock()

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
_ERROR_CODE = re.compile(r"^Error code: \d+ - ")  # the openai client's prefix: the status is ours


def clear_format_cache() -> None:
    """Forget every detected response_format (tests reuse ports; a new server must be probed again)."""
    with _formats_lock:
        _formats.clear()


def response_format_for(
    variant: str, schema: dict[str, Any], name: str = "answer", strict: bool = True
) -> dict[str, Any] | None:
    """The ``response_format`` request field for a variant of :data:`FORMAT_ORDER` (None for ``none``)."""
    if variant == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}
    if variant == "json_object":
        return {"type": "json_object", "schema": schema}
    return None


@dataclass
class TokenLogprobs:
    """Log-probs of the generated tokens, and the top-k alternatives at each position.

    ``token_ids`` / ``top_ids`` are set only when the server names token ids (vLLM with
    ``extra_body={"return_tokens_as_token_ids": True}`` answers ``"token_id:123"``); OpenAI
    and llama.cpp give token strings only.
    """

    tokens: list[str]
    logprobs: list[float]
    top_tokens: list[list[str]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    token_ids: list[int] | None = None
    top_ids: list[list[int]] | None = None

    def teacher_logprobs(self, prompt_hash: str, teacher: str) -> TeacherLogprobs:
        """The compact cache record (top-k ids + log-probs + tail mass); needs token ids."""
        if self.top_ids is None:
            raise LLMAnswerError(
                f"teacher {teacher!r} returned token strings without ids; ask the server for ids "
                '(vLLM: extra_body={"return_tokens_as_token_ids": true})'
            )
        tail = []
        for lps in self.top_logprobs:
            mass = sum(math.exp(x) for x in lps)
            tail.append(math.log1p(-mass) if mass < 1.0 else float("-inf"))
        return TeacherLogprobs(
            prompt_hash=prompt_hash,
            teacher=teacher,
            token_ids=self.top_ids,
            logprobs=self.top_logprobs,
            tail_logprob=tail,
        )


@dataclass
class ChatResult:
    """One answer: its text, what it cost, how it was asked for, and log-probs when requested."""

    text: str
    usage: TokenUsage
    response_format: str
    """The response_format variant the request used (``none`` when no schema was given)."""
    finish_reason: str | None = None
    latency_s: float = 0.0
    logprobs: TokenLogprobs | None = None

    def json(self) -> dict[str, Any]:
        """The first JSON object in the answer; :class:`~evolve.errors.LLMAnswerError` when there is none."""
        obj = extract_json_object(self.text)
        if obj is None:
            raise LLMAnswerError(f"the answer holds no JSON object: {one_line(self.text, 120)!r}")
        return obj


def _backoff(attempt: int, response: Any) -> float:
    """Seconds before retry ``attempt + 1``: the server's Retry-After when it gives a short one,
    else the openai client's schedule (0.5 s doubling, capped at 8 s, minus up to 25% jitter)."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            v = float(headers.get(name)) * scale  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if 0 <= v <= 60:
            return v
    return min(0.5 * 2.0**attempt, 8.0) * (1 - 0.25 * random.random())


def _token_id(token: str) -> int | None:
    m = _TOKEN_ID.match(token)
    return int(m.group(1)) if m else None


def parse_logprobs(choice_logprobs: Any) -> TokenLogprobs | None:
    """A chat choice's ``logprobs`` field as :class:`TokenLogprobs` (None when the server gave none)."""
    content = getattr(choice_logprobs, "content", None) if choice_logprobs is not None else None
    if not content:
        return None
    tokens = [c.token for c in content]
    out = TokenLogprobs(
        tokens=tokens,
        logprobs=[float(c.logprob) for c in content],
        top_tokens=[[t.token for t in (c.top_logprobs or [])] for c in content],
        top_logprobs=[[float(t.logprob) for t in (c.top_logprobs or [])] for c in content],
    )
    ids = [_token_id(t) for t in tokens]
    top_ids = [[_token_id(t) for t in row] for row in out.top_tokens]
    if all(i is not None for i in ids) and all(i is not None for row in top_ids for i in row):
        out.token_ids = [int(i) for i in ids]  # type: ignore[arg-type]
        out.top_ids = [[int(i) for i in row] for row in top_ids]  # type: ignore[arg-type]
    return out


class ChatClient:
    """Chat completions from one model behind an OpenAI-compatible ``base_url``.

    ``complete(messages, schema=...)`` returns a :class:`ChatResult`; failures raise an
    :class:`~evolve.errors.LLMError` subclass (see the module docstring for what retries).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        response_format: ResponseFormat = "auto",
        cost_per_1k_prompt: float = 0.0,
        cost_per_1k_completion: float = 0.0,
        extra_body: dict[str, Any] | None = None,
        deadline_s: float | None = None,
    ) -> None:
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip(
            "/"
        )
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.deadline_s = deadline_s if deadline_s is not None else 2 * timeout_s
        """Seconds one :meth:`complete` may take in all: attempts, backoff and format probing."""
        self.response_format = response_format
        self.cost_per_1k_prompt = cost_per_1k_prompt
        self.cost_per_1k_completion = cost_per_1k_completion
        self.extra_body = dict(extra_body or {})
        self.total_usage = TokenUsage()
        self.calls = 0
        """Completed requests (answers received; the client's internal retries are not counted)."""
        self.latency_s = 0.0
        self._client: Any = None

    def __repr__(self) -> str:
        return f"ChatClient(model={self.model!r}, base_url={self.base_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # The openai client holds the API key and a connection pool: never pickle it.
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    # ------------------------------------------------------------------ plumbing

    def openai(self) -> Any:
        """The underlying ``openai.OpenAI`` client (built on first use; the key read from the env)."""
        if self._client is None:
            import openai

            self._client = openai.OpenAI(
                base_url=self.base_url,
                # Local servers need no key, but the client refuses an empty one.
                api_key=os.environ.get(self.api_key_env) or "EMPTY",
                timeout=self.timeout_s,
                max_retries=self.max_retries,
            )
        return self._client

    @property
    def endpoint(self) -> tuple[str, str]:
        return (self.base_url, self.model)

    @property
    def detected_format(self) -> str | None:
        """The response_format variant in use: the forced one, else the detected one (None before)."""
        if self.response_format != "auto":
            return self.response_format
        with _formats_lock:
            return _formats.get(self.endpoint)

    def usage_of(self, u: Any) -> TokenUsage:
        """Token counts of a response's ``usage`` field, priced with this client's rates."""
        if u is None:
            return TokenUsage()
        p, c = int(u.prompt_tokens or 0), int(u.completion_tokens or 0)
        cost = p / 1000 * self.cost_per_1k_prompt + c / 1000 * self.cost_per_1k_completion
        return TokenUsage(prompt_tokens=p, completion_tokens=c, cost_usd=cost)

    # ------------------------------------------------------------------ requests

    def complete(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        schema: dict[str, Any] | None = None,
        schema_name: str = "answer",
        strict: bool = True,
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        top_logprobs: int | None = None,
        **extra: Any,
    ) -> ChatResult:
        """One chat answer. With ``schema`` the answer is constrained by the negotiated response_format.

        ``top_logprobs=k`` asks for the log-probs of the generated tokens and their top-k
        alternatives (``k=0``: the generated tokens' only). ``extra`` goes to the request as is.
        """
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "messages": list(messages), **extra}
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if seed is not None:
            kwargs["seed"] = seed
        if top_logprobs is not None:
            kwargs["logprobs"] = True
            if top_logprobs > 0:
                kwargs["top_logprobs"] = top_logprobs
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        self._deadline = time.monotonic() + self.deadline_s
        try:
            if schema is None:
                return self._send(kwargs, "none", None, schema_name, strict)
            fmt = self.detected_format
            if fmt is not None:
                return self._send(kwargs, fmt, schema, schema_name, strict)
            return self._negotiate(kwargs, schema, schema_name, strict)
        except openai.APIError as e:
            raise self._error(e) from None

    def _negotiate(
        self, kwargs: dict[str, Any], schema: dict[str, Any], schema_name: str, strict: bool
    ) -> ChatResult:
        import openai

        for variant in FORMAT_ORDER:
            last = variant == FORMAT_ORDER[-1]
            probing = not last and self.max_retries > 0
            try:
                out = self._send(kwargs, variant, schema, schema_name, strict, retries=0 if probing else None)
            except openai.APIStatusError as e:
                if not last and e.status_code in _REJECTS_FORMAT:
                    log.info("%s refused response_format=%s (HTTP %s)", self.base_url, variant, e.status_code)
                    continue
                if not (probing and (e.status_code in _TRANSIENT or e.status_code >= 500)):
                    raise
                # Transient: the client's own retries, less the attempt already spent.
                out = self._after_probe(kwargs, variant, schema, schema_name, strict)
            except openai.APIConnectionError:  # includes timeouts
                if not probing:
                    raise
                out = self._after_probe(kwargs, variant, schema, schema_name, strict)
            with _formats_lock:
                _formats[self.endpoint] = variant
            return out
        raise AssertionError("unreachable: the last variant returns or raises")

    def _after_probe(
        self, kwargs: dict[str, Any], variant: str, schema: dict[str, Any], schema_name: str, strict: bool
    ) -> ChatResult:
        """The retries left after a probe failed transiently; a failure counts the probe's attempt."""
        import openai

        try:
            return self._send(kwargs, variant, schema, schema_name, strict, retries=self.max_retries - 1)
        except openai.APIError as e:
            e.evolve_attempts = getattr(e, "evolve_attempts", 1) + 1  # type: ignore[attr-defined]
            raise

    def _send(
        self,
        kwargs: dict[str, Any],
        variant: str,
        schema: dict[str, Any] | None,
        schema_name: str,
        strict: bool,
        retries: int | None = None,
    ) -> ChatResult:
        """One request; ``retries`` overrides the client's ``max_retries`` for it."""
        req = dict(kwargs)
        rf = response_format_for(variant, schema, schema_name, strict) if schema is not None else None
        if rf is not None:
            req["response_format"] = rf
        t0 = time.perf_counter()
        resp = self._attempts(req, self.max_retries if retries is None else retries)
        latency = time.perf_counter() - t0
        if not getattr(resp, "choices", None):
            # A web page, a proxy's error text or JSON of another API: not a chat completion.
            got = one_line(str(resp), 80)
            raise LLMAnswerError(
                f"{self.base_url} (model {self.model!r}): the answer is not a chat completion ({got!r}); "
                "is base_url an OpenAI-compatible endpoint ending in /v1?"
            )
        usage = self.usage_of(getattr(resp, "usage", None))
        self.calls += 1
        self.latency_s += latency
        self.total_usage = self.total_usage + usage
        text, finish, lps = "", None, None
        if resp.choices:
            choice = resp.choices[0]
            text = choice.message.content or ""
            finish = choice.finish_reason
            lps = parse_logprobs(getattr(choice, "logprobs", None))
        return ChatResult(
            text=text,
            usage=usage,
            response_format=variant if schema is not None else "none",
            finish_reason=finish,
            latency_s=latency,
            logprobs=lps,
        )

    def _attempts(self, req: dict[str, Any], retries: int) -> Any:
        """The request, retried as the openai client would, within this call's deadline."""
        import openai

        deadline = getattr(self, "_deadline", None) or time.monotonic() + self.deadline_s
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            client = self.openai().with_options(
                max_retries=0, timeout=max(0.001, min(self.timeout_s, remaining))
            )
            try:
                return client.chat.completions.create(**req)
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                status = getattr(e, "status_code", None)
                transient = status is None or status in _TRANSIENT or status >= 500
                wait = _backoff(attempt, getattr(e, "response", None))
                out_of_time = time.monotonic() + wait >= deadline - 0.001
                e.evolve_attempts = attempt + 1  # type: ignore[union-attr]
                e.evolve_deadline = transient and attempt < retries and out_of_time  # type: ignore[union-attr]
                if not transient or attempt >= retries or out_of_time:
                    if isinstance(e, openai.APITimeoutError) and remaining < self.timeout_s:
                        e.evolve_deadline = True  # type: ignore[attr-defined]
                    raise
                log.info("%s: %s, retry %d in %.2f s", self.base_url, type(e).__name__, attempt + 1, wait)
                time.sleep(wait)
                attempt += 1

    def _error(self, e: Exception) -> LLMError:
        """The one-line error for an openai exception (after the retries)."""
        import openai

        where = f"{self.base_url} (model {self.model!r})"
        n = getattr(e, "evolve_attempts", self.max_retries + 1)
        attempts = f"after {n} attempts"
        if getattr(e, "evolve_deadline", False):
            attempts += f" (the {self.deadline_s:g} s deadline of one call; deadline_s)"
        detail = one_line(_ERROR_CODE.sub("", getattr(e, "message", None) or str(e)), 200)
        if isinstance(e, openai.APITimeoutError):
            return LLMConnectionError(
                f"{where}: no answer within {self.timeout_s:g} s {attempts}; raise timeout_s"
            )
        if isinstance(e, openai.APIConnectionError):
            return LLMConnectionError(f"{where}: cannot connect {attempts} ({detail}); is the server up?")
        if isinstance(e, openai.APIStatusError):
            s = e.status_code
            if s in (401, 403):
                return LLMAuthError(f"{where}: HTTP {s} ({detail}); check ${self.api_key_env}", status=s)
            if s == 404:
                return LLMModelNotFound(
                    f"{where}: HTTP 404 ({detail}); check the model name and base_url", status=s
                )
            if s >= 500 or s in _TRANSIENT:
                return LLMServerError(f"{where}: HTTP {s} {attempts} ({detail})", status=s)
            return LLMRequestError(f"{where}: request refused (HTTP {s}: {detail})", status=s)
        return LLMError(f"{where}: {type(e).__name__}: {detail}")

    # ------------------------------------------------------------------ probing

    def probe_response_format(self) -> str:
        """Which variant the model actually *obeys*, judged by a schema it would not guess unaided.

        Stricter than the negotiation inside :meth:`complete` (which only learns what is
        refused): ``transformers serve`` accepts and ignores every variant, and is probed as
        ``none`` here. The result replaces the cached variant for this endpoint.
        """
        schema = {
            "type": "object",
            "properties": {"color": {"type": "string", "enum": ["zqx-violet"]}},
            "required": ["color"],
            "additionalProperties": False,
        }
        messages = [
            {"role": "user", "content": 'What is your favourite colour? Answer as JSON: {"color": "..."}'}
        ]
        kind = "none"
        for variant in FORMAT_ORDER[:-1]:
            probe = ChatClient(
                self.model,
                base_url=self.base_url,
                api_key_env=self.api_key_env,
                timeout_s=self.timeout_s,
                max_retries=0,
                response_format=variant,  # type: ignore[arg-type]
            )
            try:
                out = probe.complete(
                    messages, schema=schema, schema_name="probe", max_tokens=24, temperature=0
                )
            except (LLMRequestError, LLMServerError):
                continue
            if (extract_json_object(out.text) or {}).get("color") == "zqx-violet":
                kind = variant
                break
        with _formats_lock:
            _formats[self.endpoint] = kind
        return kind


__all__ = [
    "FORMAT_ORDER",
    "ChatClient",
    "ChatResult",
    "ResponseFormat",
    "TokenLogprobs",
    "clear_format_cache",
    "parse_logprobs",
    "response_format_for",
]
