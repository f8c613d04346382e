"""A policy backed by any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, Ollama, transformers serve)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from evolve.agents.base import Decision
from evolve.errors import LLMError, LLMRequestError, PolicyError
from evolve.llm.client import ChatClient, ChatResult, ResponseFormat
from evolve.llm.prompts import (
    PromptOptions,
    action_schema,
    allowed_actions,
    build_messages,
    fallback_command,
    parse_answer,
    repair_messages,
)
from evolve.schema import Action, ActionSource, MemoryContext, Observation, Privileged, Step, Task, TokenUsage

log = logging.getLogger(__name__)


class _StepFailed(Exception):
    """A request the endpoint refused for this step only (e.g. context too long): fall back, go on."""


class OpenAIPolicy:
    """Chooses actions with a chat model behind an OpenAI-compatible ``base_url``.

    The answer is a JSON object ``{"thought", "command"}``; ``command`` is constrained to the
    admissible set by a JSON-schema enum when the set is small, and matched to it otherwise.
    Invalid output is repaired, retried once with an error note, and finally replaced by a
    fallback action with ``Decision.error`` set, so a run never stops on a bad answer. Requests go
    through :class:`~evolve.llm.client.ChatClient` (the openai client's retries, response-format
    negotiation); an endpoint that stays unreachable, or refuses the key or the model, raises
    :class:`PolicyError`.

    The API key is read from the environment variable ``api_key_env`` when the client is
    built and is never kept on the policy, logged, or pickled.
    """

    needs_privileged = False

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
        cost_per_1k_prompt: float = 0.0,
        cost_per_1k_completion: float = 0.0,
        enum_limit: int = 150,
        max_failed_requests: int = 3,
        top_logprobs: int | None = None,
        prompt: PromptOptions | None = None,
        name: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.chat = ChatClient(
            model,
            base_url=base_url,
            api_key_env=api_key_env,
            timeout_s=timeout_s,
            max_retries=max_retries,
            response_format=response_format,
            cost_per_1k_prompt=cost_per_1k_prompt,
            cost_per_1k_completion=cost_per_1k_completion,
            extra_body=extra_body,
        )
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.enum_limit = enum_limit
        self.max_failed_requests = max_failed_requests
        self.top_logprobs = top_logprobs
        """When set, ask for the generated tokens' log-probs (``Decision.logprobs``)."""
        self._failed_in_a_row = 0
        self.prompt = prompt or PromptOptions()
        self.name = name or f"openai:{model}"
        self.total_usage = TokenUsage()
        self._goal = ""

    def __repr__(self) -> str:
        return f"OpenAIPolicy(model={self.model!r}, base_url={self.base_url!r})"

    @property
    def base_url(self) -> str:
        return self.chat.base_url

    @property
    def calls(self) -> int:
        """Answers received from the endpoint."""
        return self.chat.calls

    @property
    def detected_format(self) -> str | None:
        """The response_format variant this endpoint accepted (None until the first call)."""
        return self.chat.detected_format

    def client(self) -> Any:
        """The underlying ``openai.OpenAI`` client."""
        return self.chat.openai()

    # ------------------------------------------------------------------ Policy protocol

    def reset(self, task: Task, privileged: Privileged | None = None) -> None:
        self._goal = task.goal

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision:
        t0 = time.perf_counter()
        # Actions refused in this state (a guardrail or loop guard, on a re-ask) are neither listed
        # nor in the enum, so a constrained decoder cannot produce them again.
        admissible = allowed_actions(obs.admissible_actions, memory)
        messages = self.messages(obs, history, memory)
        schema = action_schema(admissible, self.enum_limit)
        usage = TokenUsage()
        raw = ""
        answer: ChatResult | None = None
        try:
            answer = self._complete(messages, schema)
            raw, usage = answer.text, usage + answer.usage
            parsed = parse_answer(raw, admissible)
            if parsed.command is None:
                log.debug("invalid answer from %s (%s); retrying once", self.name, parsed.problem)
                again = self._complete(repair_messages(messages, raw, parsed.problem or "invalid"), schema)
                usage = usage + again.usage
                retry = parse_answer(again.text, admissible)
                if retry.command is not None:
                    parsed, raw, answer = retry, again.text, again
                else:
                    raw = again.text or raw
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
        lps = answer.logprobs if answer is not None and error is None else None
        return Decision(
            action=action,
            usage=usage,
            latency_s=latency,
            error=error,
            token_ids=lps.token_ids if lps is not None else None,
            logprobs=lps.logprobs if lps is not None else None,
        )

    # ------------------------------------------------------------------ pieces

    def messages(
        self, obs: Observation, history: Sequence[Step], memory: MemoryContext
    ) -> list[dict[str, str]]:
        """The chat messages this policy sends for one step."""
        return build_messages(self._goal or obs.goal, obs, history, memory, self.prompt)

    def _complete(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> ChatResult:
        """One answer; a request refused for this step only becomes :class:`_StepFailed`."""
        try:
            return self.chat.complete(
                messages,
                schema=schema,
                schema_name="action",
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                seed=self.seed,
                top_logprobs=self.top_logprobs,
            )
        except LLMRequestError as e:
            raise _StepFailed(str(e)) from e
        except LLMError as e:  # auth, unknown model, server down after retries: the run cannot go on
            raise PolicyError(str(e)) from None
