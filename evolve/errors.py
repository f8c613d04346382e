"""User-facing errors: each carries a one-line message saying what was wrong and how to fix it.

The CLI prints ``EvolveError`` messages without a traceback; anything else is a bug.
"""

from __future__ import annotations


class EvolveError(Exception):
    """Base class for mistakes a user can make (bad file, bad name, bad path)."""


class ConfigError(EvolveError):
    pass


class StoreError(EvolveError):
    pass


class EnvError(EvolveError):
    pass


class UnknownEnvError(EnvError):
    pass


class UnknownTaskError(EnvError):
    pass


class EnvCrashed(EnvError):
    """The environment process died or raised mid-episode."""


class PolicyError(EvolveError):
    """The policy could not produce an action (endpoint down, malformed output after retries)."""


class EmbedderError(EvolveError):
    pass
