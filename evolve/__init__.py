"""evolve: make LLM agents better from their own experience.

The short public API; heavier pieces load on first use so `import evolve` stays cheap.
"""

from __future__ import annotations

from typing import Any

from evolve.schema import (
    Action,
    Diagnosis,
    Guardrail,
    MemoryContext,
    Observation,
    Skill,
    Step,
    Task,
    TrainingExample,
    Trajectory,
)

__version__ = "0.1.0"

_LAZY = {
    "ExperienceStore": "evolve.stores",
    "EvolveStore": "evolve.stores.langgraph_store",
    "make_env": "evolve.envs",
    "make_policy": "evolve.agents.policies",
    "PolicySpec": "evolve.agents.policies",
    "run_episode": "evolve.agents.graph",
    "collect": "evolve.agents.collect",
    "Recorder": "evolve.agents.recorder",
    "EvolveMemory": "evolve.skills",
    "RuleDiagnoser": "evolve.diagnose",
    "diagnose_trajectory": "evolve.diagnose",
    "load_job": "evolve.config",
    "run_job": "evolve.pipeline",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'evolve' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)


__all__ = [
    "Action",
    "Diagnosis",
    "Guardrail",
    "MemoryContext",
    "Observation",
    "Skill",
    "Step",
    "Task",
    "TrainingExample",
    "Trajectory",
    "__version__",
    *_LAZY,
]
