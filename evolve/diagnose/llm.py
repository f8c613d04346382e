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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evolve.diagnose.rules import CAUSE_ORDER, diagnose_trajectory, episode_won
from evolve.diagnose.summarize import summarize_episode
from evolve.llm.client import ChatClient
from evolve.schema import CauseEvidence, Diagnosis, FailureCause, Trajectory
from evolve.text import extract_json_object, one_line

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


def build_prompt(traj: Trajectory, diagnosis: Diagnosis, context_steps: int = 12) -> str:
    """User message: the episode summary, the rule causes and the last ``context_steps`` steps."""
    lines = [f"Goal: {traj.goal or 'unknown'}", f"Episode: {summarize_episode(traj)}", "Rule-based causes:"]
    lines += [f"- {c.cause.value}: {c.evidence}" for c in diagnosis.causes] or ["- none found"]
    lines.append(f"Last {min(context_steps, len(traj.steps))} of {len(traj.steps)} steps:")
    for step in traj.steps[-context_steps:]:
        lines.append(f"[{step.index}] > {step.action.text}")
        lines.append(f"    {one_line(step.post_state.text, 300)}")
        if step.diagnosis and step.diagnosis.causes:
            lines.append("    rule causes: " + ", ".join(step.diagnosis.cause_names()))
        if step.error:
            lines.append(f"    error: {one_line(step.error, 200)}")
    return "\n".join(lines)


class LLMDiagnoser:
    """Refines rule diagnoses of failed episodes through an OpenAI-compatible chat endpoint.

    Requests go through :class:`~evolve.llm.client.ChatClient`: the openai client's retries and
    timeout, and the response_format variant detected once per endpoint.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        temperature: float = 0.0,
        max_tokens: int = 400,
        context_steps: int = 12,
    ) -> None:
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.context_steps = context_steps
        self.chat = ChatClient(
            model, base_url=base_url, api_key_env=api_key_env, timeout_s=timeout, max_retries=max_retries
        )

    @property
    def response_format_variant(self) -> str | None:
        """The structured-output variant detected for this endpoint (None until the first call)."""
        return self.chat.detected_format

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The endpoint's answer (schema-constrained where the endpoint allows it)."""
        out = self.chat.complete(
            messages,
            schema=VERDICT_SCHEMA,
            schema_name="diagnosis",
            strict=False,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        return out.text

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
            log.warning("LLM diagnoser output rejected (not a valid verdict): %r", one_line(content, 200))
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
    out.root_cause = one_line(verdict.root_cause, 500)
    out.source = "llm"
    have = {c.cause for c in out.causes}
    evidence = "llm: " + one_line(verdict.evidence or verdict.root_cause, 500)
    for cause in verdict.causes:
        if cause not in have:
            have.add(cause)
            out.causes.append(CauseEvidence(cause=cause, evidence=evidence))
    return out
