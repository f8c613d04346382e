"""Diagnosis: state diffs, failure causes with evidence, stagnation/loop detection, segments, summaries.

Imports only ``evolve.schema``; the LLM diagnoser (``evolve.diagnose.llm``) is optional and loads
the ``openai`` client only when imported.
"""

from evolve.diagnose.detectors import LoopDetector, StagnationDetector
from evolve.diagnose.diff import diff_states, is_progress, state_key, state_predicates
from evolve.diagnose.rules import (
    RuleDiagnoser,
    classify_error,
    diagnose_trajectory,
    episode_diagnosis,
    episode_won,
    feedback_head,
    is_info_action,
)
from evolve.diagnose.segments import segments
from evolve.diagnose.summarize import summarize_episode, summarize_segment

__all__ = [
    "LLMDiagnoser",
    "LoopDetector",
    "RuleDiagnoser",
    "StagnationDetector",
    "classify_error",
    "diagnose_trajectory",
    "diff_states",
    "episode_diagnosis",
    "episode_won",
    "feedback_head",
    "is_info_action",
    "is_progress",
    "segments",
    "state_key",
    "state_predicates",
    "summarize_episode",
    "summarize_segment",
]


def __getattr__(name: str) -> object:
    # LLMDiagnoser pulls in the openai client; load it on first use only.
    if name == "LLMDiagnoser":
        from evolve.diagnose.llm import LLMDiagnoser

        return LLMDiagnoser
    raise AttributeError(f"module 'evolve.diagnose' has no attribute {name!r}")
