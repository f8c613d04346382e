"""Policies: an OpenAI-compatible endpoint, a local transformers model, the env oracle, random.

Heavy dependencies (``openai``, ``torch``) are imported only when their policy is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evolve.agents.base import Policy
from evolve.agents.policies.oracle import OraclePolicy
from evolve.agents.policies.random_policy import RandomPolicy
from evolve.specs import POLICY_KINDS, PolicySpec

if TYPE_CHECKING:
    from evolve.agents.policies.hf_policy import HFPolicy
    from evolve.agents.policies.openai_policy import OpenAIPolicy

__all__ = [
    "POLICY_KINDS",
    "HFPolicy",
    "OpenAIPolicy",
    "OraclePolicy",
    "PolicySpec",
    "RandomPolicy",
    "make_policy",
]


def __getattr__(name: str) -> Any:
    if name == "OpenAIPolicy":
        from evolve.agents.policies.openai_policy import OpenAIPolicy

        return OpenAIPolicy
    if name == "HFPolicy":
        from evolve.agents.policies.hf_policy import HFPolicy

        return HFPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_policy(spec: PolicySpec | dict[str, Any]) -> Policy:
    """Build the policy a spec describes (heavy libraries are imported only for their kind)."""
    s = PolicySpec.parse(spec)
    if s.kind == "oracle":
        return OraclePolicy(name=s.name or "oracle")
    if s.kind == "random":
        return RandomPolicy(seed=s.seed or 0, avoid_noops=s.avoid_noops, name=s.name or "random")
    from evolve.llm.prompts import PromptOptions

    if s.kind == "openai":
        from evolve.agents.policies.openai_policy import OpenAIPolicy

        return OpenAIPolicy(
            s.model or "",
            base_url=s.base_url,
            api_key_env=s.api_key_env,
            temperature=s.temperature,
            max_tokens=s.max_tokens,
            seed=s.seed,
            response_format=s.response_format,
            max_retries=s.max_retries,
            timeout_s=s.timeout_s,
            cost_per_1k_prompt=s.cost_per_1k_prompt,
            cost_per_1k_completion=s.cost_per_1k_completion,
            extra_body=dict(s.extra_body),
            prompt=PromptOptions(max_actions=s.max_actions, max_turns=s.max_turns),
            name=s.name,
        )
    from evolve.agents.policies.hf_policy import HFPolicy

    fmt = "command" if s.mode == "rank" else "json"
    return HFPolicy(
        s.path or "",
        mode=s.mode,
        device=s.device,
        dtype=s.dtype,
        temperature=s.temperature,
        max_tokens=s.max_tokens,
        seed=s.seed,
        rank_reduction=s.rank_reduction,
        max_candidates=s.max_actions,
        prompt=PromptOptions(max_actions=s.max_actions, max_turns=s.max_turns, action_format=fmt),
        name=s.name,
    )
