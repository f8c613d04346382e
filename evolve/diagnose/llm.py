"""Optional LLM diagnoser: refines the rule diagnosis of a failed episode with a root-cause sentence.

Talks to any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, llama.cpp server). The model
must answer ``{"root_cause": str, "causes": [FailureCause values], "evidence": str}``. Output is
validated, repaired once (JSON pulled out of prose, unknown cause names dropped) and otherwise
rejected: the rule diagnosis is then returned unchanged. The LLM may add causes and a root cause;
it never removes a rule cause. An unreachable endpoint costs a warning, never a crash.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evolve.diagnose.rules import CAUSE_ORDER, diagnose_trajectory, episode_won
from evolve.diagnose.summarize import summarize_episode
from evolve.schema import CauseEvidence, Diagnosis, FailureCause, Trajectory

log = logging.getLogger(__name__)


class LLMVerdict(BaseModel):
    """The JSON object the model must return."""

    model_config = ConfigDict(extra="ignore")

    root_cause: str = Field(min_length=1)
    causes: list[FailureCause]
    evidence: str


VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "root_cause": {"type": "string"},
        "causes": {"type": "array", "items": {"type": "string", "enum": [c.value for c in FailureCause]}},
        "evidence": {"type": "string"},
    },
    "required": ["root_cause", "causes", "evidence"],
    "additionalProperties": False,
}

# How to ask for structured output, most standard first. OpenAI, vLLM and Ollama take json_schema;
# llama-cpp-python validates response_format.type as text|json_object and wants the schema beside it;
# some servers (transformers serve) ignore or refuse response_format, where prompting must do.
FORMAT_VARIANTS: tuple[str, ...] = ("json_schema", "json_object_schema", "none")

# Which variant each endpoint accepts, detected once per (base_url, model) for the process.
_FORMAT_CACHE: dict[tuple[str, str], str] = {}
_FORMAT_LOCK = threading.Lock()


def _response_format(variant: str) -> dict[str, Any] | None:
    if variant == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "diagnosis", "schema": VERDICT_SCHEMA}}
    if variant == "json_object_schema":
        return {"type": "json_object", "schema": VERDICT_SCHEMA}
    return None


def extract_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object embedded in ``text`` (code fences and prose around it are skipped)."""
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i >= 0:
        try:
            obj, _ = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        i = text.find("{", i + 1)
    return None


def _cause_name(value: object) -> FailureCause | None:
    name = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return FailureCause(name)
    except ValueError:
        return None


def parse_verdict(text: str) -> LLMVerdict | None:
    """Validate the model's answer; on failure try one repair; None means reject."""
    try:
        return LLMVerdict.model_validate_json(text.strip())
    except ValidationError:
        pass
    obj = extract_json_object(text)
    if obj is None:
        return None
    raw = obj.get("causes", [])
    raw = raw if isinstance(raw, list) else [raw]
    causes = list(dict.fromkeys(c for c in map(_cause_name, raw) if c is not None))
    evidence = obj.get("evidence", "")
    repaired = {
        "root_cause": obj.get("root_cause"),
        "causes": causes,
        "evidence": evidence if isinstance(evidence, str) else json.dumps(evidence),
    }
    try:
        return LLMVerdict.model_validate(repaired)
    except ValidationError:
        return None


SYSTEM_PROMPT = (
    "You diagnose why an AI agent failed a task in a text environment. Read the episode and name the "
    "root cause of the failure. Reply with exactly one JSON object and nothing else: "
    '{"root_cause": "<one sentence>", "causes": [<failure causes>], "evidence": "<the step(s) that show it>"}. '
    "Failure causes must be taken from: " + ", ".join(c.value for c in CAUSE_ORDER) + "."
)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_prompt(traj: Trajectory, diagnosis: Diagnosis, context_steps: int = 12) -> str:
    """User message: the episode summary, the rule causes and the last ``context_steps`` steps."""
    lines = [f"Goal: {traj.goal or 'unknown'}", f"Episode: {summarize_episode(traj)}", "Rule-based causes:"]
    lines += [f"- {c.cause.value}: {c.evidence}" for c in diagnosis.causes] or ["- none found"]
    lines.append(f"Last {min(context_steps, len(traj.steps))} of {len(traj.steps)} steps:")
    for step in traj.steps[-context_steps:]:
        lines.append(f"[{step.index}] > {step.action.text}")
        lines.append(f"    {_clip(step.post_state.text, 300)}")
        if step.diagnosis and step.diagnosis.causes:
            lines.append("    rule causes: " + ", ".join(step.diagnosis.cause_names()))
        if step.error:
            lines.append(f"    error: {_clip(step.error, 200)}")
    return "\n".join(lines)


class LLMDiagnoser:
    """Refines rule diagnoses of failed episodes through an OpenAI-compatible chat endpoint."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 16.0,
        temperature: float = 0.0,
        max_tokens: int = 400,
        context_steps: int = 12,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.context_steps = context_steps
        # Local servers need no key, but the client refuses an empty one.
        api_key = os.environ.get(api_key_env) or "EMPTY"
        # Retries are ours (logged, with our backoff), so the client's own are switched off.
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self._key = (str(self._client.base_url), model)

    @property
    def response_format_variant(self) -> str | None:
        """The structured-output variant detected for this endpoint (None until the first call)."""
        return _FORMAT_CACHE.get(self._key)

    def _create(self, messages: list[dict[str, str]], variant: str) -> str:
        """One chat completion, retried with exponential backoff on connection errors, 429 and 5xx."""
        fmt = _response_format(variant)
        extra = {"response_format": fmt} if fmt is not None else None
        for attempt in range(self.max_retries + 1):
            try:
                resp = self._client.chat.completions.create(
                    model=self.model,
                    messages=messages,  # type: ignore[arg-type]
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    extra_body=extra,
                )
                if not resp.choices:
                    return ""
                return resp.choices[0].message.content or ""
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                if attempt >= self.max_retries:
                    raise
                delay = min(self.backoff * 2**attempt, self.max_backoff)
                log.info("LLM diagnoser: %s; retry %d/%d in %.2fs", e, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def complete(self, messages: list[dict[str, str]]) -> str:
        """Ask the endpoint, detecting once which response_format variant it accepts."""
        with _FORMAT_LOCK:
            cached = _FORMAT_CACHE.get(self._key)
        variants = (cached,) if cached else FORMAT_VARIANTS
        for variant in variants:
            try:
                content = self._create(messages, variant)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                # The endpoint refuses this response_format: try the next variant, unless none is left.
                if cached or variant == variants[-1]:
                    raise
                log.info("LLM diagnoser: %s refuses response_format %s (%s)", self._key[0], variant, e)
                continue
            with _FORMAT_LOCK:
                _FORMAT_CACHE[self._key] = variant
            return content
        raise AssertionError("unreachable")  # the last variant returns or raises

    def refine(self, traj: Trajectory, diagnosis: Diagnosis | None = None) -> Diagnosis:
        """The episode diagnosis of ``traj`` refined by the LLM, or the rule diagnosis unchanged.

        ``diagnosis`` defaults to ``traj.diagnosis`` (computed by the rules when missing). Won
        episodes are returned as they are, without a call.
        """
        if any(s.diagnosis is None for s in traj.steps) or (diagnosis is None and traj.diagnosis is None):
            traj = diagnose_trajectory(traj)
        diagnosis = diagnosis or traj.diagnosis or Diagnosis(step_index=-1)
        if episode_won(traj):
            return diagnosis
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": build_prompt(traj, diagnosis, self.context_steps)},
        ]
        try:
            content = self.complete(messages)
        except Exception as e:  # noqa: BLE001 - refinement is optional; a failing endpoint must lose nothing
            log.warning("LLM diagnoser unavailable (%s: %s); keeping the rule diagnosis", type(e).__name__, e)
            return diagnosis
        verdict = parse_verdict(content)
        if verdict is None:
            log.warning("LLM diagnoser output rejected (not a valid verdict): %r", _clip(content, 200))
            return diagnosis
        return merge_verdict(diagnosis, verdict)

    def diagnose_trajectory(self, traj: Trajectory, step_limit: int | None = None) -> Trajectory:
        """Rule diagnosis of every step, then the episode diagnosis refined by the LLM."""
        out = diagnose_trajectory(traj, step_limit=step_limit)
        out.diagnosis = self.refine(out, out.diagnosis)
        return out


def merge_verdict(diagnosis: Diagnosis, verdict: LLMVerdict) -> Diagnosis:
    """A copy of ``diagnosis`` with the LLM's root cause and any causes it adds (rule causes kept)."""
    out = diagnosis.model_copy(deep=True)
    out.root_cause = _clip(verdict.root_cause, 500)
    out.source = "llm"
    have = {c.cause for c in out.causes}
    evidence = "llm: " + _clip(verdict.evidence or verdict.root_cause, 500)
    for cause in verdict.causes:
        if cause not in have:
            have.add(cause)
            out.causes.append(CauseEvidence(cause=cause, evidence=evidence))
    return out
