"""Benchmark environments behind one small protocol (:class:`evolve.envs.base.Env`).

Adding an env is one new file plus one line in ``_REGISTRY``. Adapters are imported only when
made, and they import their benchmark package lazily, so ``import evolve.envs`` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from evolve.envs.base import Env
from evolve.errors import ConfigError, UnknownEnvError
from evolve.specs import EnvSpec

# name -> "module:attribute" of a class (or factory) taking keyword arguments.
_REGISTRY: dict[str, str | Callable[..., Env]] = {
    "textworld": "evolve.envs.textworld_env:TextWorldEnv",
    "scienceworld": "evolve.envs.scienceworld_env:ScienceWorldEnv",
}


def available_envs() -> list[str]:
    """Names accepted by :func:`make_env`, sorted."""
    return sorted(_REGISTRY)


def register_env(name: str, factory: str | Callable[..., Env], *, overwrite: bool = False) -> None:
    """Register a user env: ``factory`` is a callable or a ``"module:attribute"`` path."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"env {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def env_factory(name: str) -> Callable[..., Env]:
    """The class or factory registered under ``name``; raises ``UnknownEnvError``."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise UnknownEnvError(f"unknown env {name!r}; available: {', '.join(available_envs())}") from None
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_env(name: str, **kwargs: Any) -> Env:
    """Build the env registered under ``name`` with adapter-specific keyword arguments."""
    return env_factory(name)(**kwargs)


def build_env(spec: EnvSpec | str | dict[str, Any]) -> Env:
    """Build the env a spec names: a registered name, or ``"package.module:Factory"`` for an
    unregistered one (what worker processes can import even when the parent registered nothing)."""
    spec = EnvSpec.parse(spec)
    if ":" in spec.name:
        module, _, attr = spec.name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"env {spec.name!r} cannot be imported: {e}") from None
        return factory(**spec.kwargs)
    return make_env(spec.name, **spec.kwargs)


__all__ = ["Env", "EnvSpec", "available_envs", "build_env", "env_factory", "make_env", "register_env"]
