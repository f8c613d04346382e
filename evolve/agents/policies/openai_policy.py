"""A policy backed by any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, Ollama, transformers serve)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from evolve.agents.base import Decision
from evolve.agents.policies.prompting import (
    PromptOptions,
    action_schema,
    build_messages,
    fallback_command,
    parse_answer,
    repair_messages,
)
from evolve.errors import PolicyError
from evolve.schema import Action, ActionSource, MemoryContext, Observation, Privileged, Step, Task, TokenUsage

log = logging.getLogger(__name__)

ResponseFormat = Literal["auto", "json_schema", "json_object", "none"]

# Order tried when detecting what an endpoint accepts. OpenAI and vLLM take ``json_schema``;
# llama-cpp-python answers it with HTTP 500 but takes ``json_object`` with a ``schema``;
# servers that accept neither (or ignore both, like ``transformers serve``) get plain prompting.
_FORMAT_ORDER: tuple[str, ...] = ("json_schema", "json_object", "none")
# Status codes by which a server says "I do not support this response_format" (llama.cpp: 500).
_FORMAT_REJECTED = frozenset({400, 422, 500, 501})
_FATAL_STATUS = frozenset({401, 403, 404})


class _StepFailed(Exception):
    """A request the endpoint refused for this step only (e.g. context too long): fall back, go on."""


class OpenAIPolicy:
    """Chooses actions with a chat model behind an OpenAI-compatible ``base_url``.

    The answer is a JSON object ``{"thought", "command"}``; ``command`` is constrained to the
    admissible set by a JSON-schema enum when the set is small, and matched to it otherwise.
    Invalid output is repaired, retried once with an error note, and finally replaced by a
    fallback action with ``Decision.error`` set, so a run never stops on a bad answer. An
    endpoint that stays unreachable after retries raises :class:`PolicyError`.

    The API key is read from the environment variable ``api_key_env`` when the client is
    built and is never kept on the policy, logged, or pickled.
    """

    needs_privileged = False

    # Which response_format variant each endpoint accepts, detected once per process.
    _formats: ClassVar[dict[str, str]] = {}
    _formats_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 256,
        seed: int | None = None,
        response_format: ResponseFormat = "auto",
        max_retries: int = 3,
        timeout_s: float = 60.0,
        backoff_s: float = 0.5,
        cost_per_1k_prompt: float = 0.0,
        cost_per_1k_completion: float = 0.0,
        enum_limit: int = 150,
        max_failed_requests: int = 3,
        prompt: PromptOptions | None = None,
        name: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.response_format = response_format
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.cost_per_1k_prompt = cost_per_1k_prompt
        self.cost_per_1k_completion = cost_per_1k_completion
        self.enum_limit = enum_limit
        self.max_failed_requests = max_failed_requests
        self._failed_in_a_row = 0
        self.prompt = prompt or PromptOptions()
        self.name = name or f"openai:{model}"
        self.extra_body = extra_body or {}
        self.total_usage = TokenUsage()
        self.calls = 0
        self.call_latency_s = 0.0
        self._goal = ""
        self._client: Any = None

    def __repr__(self) -> str:
        return f"OpenAIPolicy(model={self.model!r}, base_url={self.base_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # The client holds the API key and a connection pool: never pickle it.
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    # ------------------------------------------------------------------ Policy protocol

    def reset(self, task: Task, privileged: Privileged | None = None) -> None:
        self._goal = task.goal

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision:
        t0 = time.perf_counter()
        admissible = obs.admissible_actions
        messages = self.messages(obs, history, memory)
        schema = action_schema(admissible, self.enum_limit)
        usage = TokenUsage()
        raw = ""
        try:
            raw, u = self._complete(messages, schema)
            usage = usage + u
            parsed = parse_answer(raw, admissible)
            if parsed.command is None:
                log.debug("invalid answer from %s (%s); retrying once", self.name, parsed.problem)
                raw2, u = self._complete(repair_messages(messages, raw, parsed.problem or "invalid"), schema)
                usage = usage + u
                retry = parse_answer(raw2, admissible)
                if retry.command is not None:
                    parsed, raw = retry, raw2
                else:
                    raw = raw2 or raw
            error = (
                None if parsed.command is not None else f"invalid model output after retry: {parsed.problem}"
            )
            self._failed_in_a_row = 0
        except _StepFailed as e:
            # One refused request is this step's problem; the same refusal step after step is a
            # configuration error (wrong model name, prompt always too long): stop the run.
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= self.max_failed_requests:
                raise PolicyError(
                    f"endpoint {self.base_url} refused {self._failed_in_a_row} requests in a row "
                    f"for model {self.model!r}: {e}"
                ) from None
            parsed, error = None, str(e)
        self.total_usage = self.total_usage + usage
        latency = time.perf_counter() - t0
        if parsed is not None and parsed.command is not None:
            action = Action(text=parsed.command, thought=parsed.thought, source=ActionSource.policy, raw=raw)
        else:
            action = Action(text=fallback_command(admissible), source=ActionSource.fallback, raw=raw or None)
        return Decision(action=action, usage=usage, latency_s=latency, error=error)

    # ------------------------------------------------------------------ pieces

    def messages(
        self, obs: Observation, history: Sequence[Step], memory: MemoryContext
    ) -> list[dict[str, str]]:
        """The chat messages this policy sends for one step."""
        return build_messages(self._goal or obs.goal, obs, history, memory, self.prompt)

    @property
    def endpoint_key(self) -> str:
        return f"{self.base_url.rstrip('/')}|{self.model}"

    @property
    def detected_format(self) -> str | None:
        """The response_format variant this endpoint accepted (None until the first call)."""
        if self.response_format != "auto":
            return self.response_format
        return self._formats.get(self.endpoint_key)

    def client(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(
                base_url=self.base_url,
                api_key=os.environ.get(self.api_key_env) or "EMPTY",
                timeout=self.timeout_s,
                max_retries=0,  # retries are ours: backoff, then a PolicyError naming the endpoint
            )
        return self._client

    def _complete(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> tuple[str, TokenUsage]:
        """One answer, with retries and exponential backoff on transient failures."""
        import openai

        attempts = self.max_retries + 1
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                return self._request_any_format(messages, schema)
            except (openai.APIConnectionError, openai.RateLimitError) as e:  # includes timeouts
                last = e
            except openai.APIStatusError as e:
                if e.status_code in _FATAL_STATUS:
                    raise PolicyError(
                        f"endpoint {self.base_url} refused model {self.model!r} "
                        f"(HTTP {e.status_code}: {_one_line(e)}); check model, base_url and ${self.api_key_env}"
                    ) from None
                if e.status_code < 500 and e.status_code != 408:
                    raise _StepFailed(
                        f"endpoint refused the request (HTTP {e.status_code}: {_one_line(e)})"
                    ) from e
                last = e
            if attempt + 1 < attempts:
                time.sleep(self.backoff_s * (2**attempt))
        raise PolicyError(
            f"OpenAI-compatible endpoint {self.base_url} failed after {attempts} attempts: "
            f"{type(last).__name__}: {_one_line(last)}"
        ) from None

    def _request_any_format(
        self, messages: list[dict[str, str]], schema: dict[str, Any]
    ) -> tuple[str, TokenUsage]:
        import openai

        fmt = self.detected_format
        if fmt is not None:
            return self._request(messages, schema, fmt)
        for variant in _FORMAT_ORDER:
            try:
                out = self._request(messages, schema, variant)
            except openai.APIStatusError as e:
                if variant == _FORMAT_ORDER[-1] or e.status_code not in _FORMAT_REJECTED:
                    raise
                log.info("%s rejected response_format=%s (HTTP %s)", self.base_url, variant, e.status_code)
                continue
            with self._formats_lock:
                self._formats[self.endpoint_key] = variant
            return out
        raise AssertionError("unreachable")

    def _request(
        self, messages: list[dict[str, str]], schema: dict[str, Any], fmt: str
    ) -> tuple[str, TokenUsage]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if fmt == "json_schema":
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "action", "schema": schema, "strict": True},
            }
        elif fmt == "json_object":
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        t0 = time.perf_counter()
        resp = self.client().chat.completions.create(**kwargs)
        self.call_latency_s += time.perf_counter() - t0
        self.calls += 1
        text = ""
        if resp.choices:
            text = resp.choices[0].message.content or ""
        return text, self._usage(resp.usage)

    def _usage(self, u: Any) -> TokenUsage:
        if u is None:
            return TokenUsage()
        p, c = int(u.prompt_tokens or 0), int(u.completion_tokens or 0)
        cost = p / 1000 * self.cost_per_1k_prompt + c / 1000 * self.cost_per_1k_completion
        return TokenUsage(prompt_tokens=p, completion_tokens=c, cost_usd=cost)


def _one_line(e: BaseException | None) -> str:
    if e is None:
        return "unknown error"
    msg = " ".join(str(e).split())
    return msg[:200] + ("..." if len(msg) > 200 else "")
