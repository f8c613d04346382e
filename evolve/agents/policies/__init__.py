"""Policies: an OpenAI-compatible endpoint, a local transformers model, the env oracle, random.

Heavy dependencies (``openai``, ``torch``) are imported only when their policy is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evolve.agents.policies.oracle import OraclePolicy
from evolve.agents.policies.random_policy import RandomPolicy

if TYPE_CHECKING:
    from evolve.agents.policies.hf_policy import HFPolicy
    from evolve.agents.policies.openai_policy import OpenAIPolicy

__all__ = ["HFPolicy", "OpenAIPolicy", "OraclePolicy", "RandomPolicy"]


def __getattr__(name: str) -> Any:
    if name == "OpenAIPolicy":
        from evolve.agents.policies.openai_policy import OpenAIPolicy

        return OpenAIPolicy
    if name == "HFPolicy":
        from evolve.agents.policies.hf_policy import HFPolicy

        return HFPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
