"""The small protocols of the collect stage: a policy picks an action, hooks add memory and control."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

from evolve.schema import (
    Action,
    Diagnosis,
    GuardrailVerdict,
    MemoryContext,
    Observation,
    Privileged,
    Step,
    Task,
    TokenUsage,
    Trajectory,
)


class Decision(BaseModel):
    """A policy's answer for one step."""

    action: Action
    usage: TokenUsage = Field(default_factory=TokenUsage)
    latency_s: float = 0.0
    error: str | None = None
    """Set when the policy could not produce a valid action and fell back (recorded as policy_error)."""
    token_ids: list[int] | None = None
    """Token ids of the generated answer (local models; None for policies that do not see tokens)."""
    logprobs: list[float] | None = None
    """Log-prob of each generated token under the policy (on-policy distillation needs them)."""
    prompt_token_ids: list[int] | None = None
    """Token ids of the prompt the answer continues, where the policy has them at no extra cost."""


@runtime_checkable
class Policy(Protocol):
    name: str
    needs_privileged: bool
    """True for oracle teachers: the agent then passes ``Privileged`` to ``reset``."""

    def reset(self, task: Task, privileged: Privileged | None = None) -> None: ...

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision: ...


@runtime_checkable
class AgentHooks(Protocol):
    """Memory, guardrail and diagnosis hooks of the agent loop. ``NoHooks`` does nothing."""

    def on_episode_start(self, task: Task, obs: Observation) -> None: ...

    def retrieve(self, obs: Observation, history: list[Step]) -> MemoryContext: ...

    def propose(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Action | None:
        """An executable-skill macro step to take instead of asking the policy (None = ask the policy)."""
        ...

    def check_action(self, action: Action, obs: Observation, memory: MemoryContext) -> GuardrailVerdict: ...

    def diagnose(self, step: Step, history: list[Step]) -> Diagnosis | None: ...

    def on_episode_end(self, traj: Trajectory) -> None: ...


class NoHooks:
    """The loop without memory: retrieves nothing, allows everything, diagnoses nothing."""

    def on_episode_start(self, task: Task, obs: Observation) -> None:
        return None

    def retrieve(self, obs: Observation, history: list[Step]) -> MemoryContext:
        return MemoryContext()

    def propose(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Action | None:
        return None

    def check_action(self, action: Action, obs: Observation, memory: MemoryContext) -> GuardrailVerdict:
        return GuardrailVerdict()

    def diagnose(self, step: Step, history: list[Step]) -> Diagnosis | None:
        return None

    def on_episode_end(self, traj: Trajectory) -> None:
        return None
