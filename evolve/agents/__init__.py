"""Agents: the LangGraph agent loop, policies, the recorder, and collection at scale.

Names load on first use, so ``import evolve.agents.base`` does not pull in LangGraph.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AgentHooks": "evolve.agents.base",
    "Decision": "evolve.agents.base",
    "NoHooks": "evolve.agents.base",
    "Policy": "evolve.agents.base",
    "PolicySpec": "evolve.agents.policies",
    "make_policy": "evolve.agents.policies",
    "AgentContext": "evolve.agents.graph",
    "AgentState": "evolve.agents.graph",
    "build_agent_graph": "evolve.agents.graph",
    "run_episode": "evolve.agents.graph",
    "EpisodeRecorder": "evolve.agents.recorder",
    "Recorder": "evolve.agents.recorder",
    "UsageCallback": "evolve.agents.recorder",
    "EnvSpec": "evolve.specs",
    "collect": "evolve.agents.collect",
    "done_episodes": "evolve.agents.collect",
    "plan_episodes": "evolve.agents.collect",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'evolve.agents' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
