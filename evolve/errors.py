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


class LLMError(EvolveError):
    """A model endpoint failed. The message is one line naming the endpoint, the model and the fix.

    Subclasses say which kind of failure it was, so callers can decide what is fatal (a wrong key)
    and what costs only one request (a prompt the server refused).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status the endpoint answered, when it answered one."""


class LLMAuthError(LLMError):
    """HTTP 401/403: the key is missing, wrong or not allowed to use the model."""


class LLMModelNotFound(LLMError):
    """HTTP 404: no such model (or no chat endpoint) at that base_url."""


class LLMRequestError(LLMError):
    """Another 4xx: the endpoint refused this request (prompt too long, bad parameter)."""


class LLMServerError(LLMError):
    """5xx, still failing after the client's retries."""


class LLMConnectionError(LLMError):
    """No answer: connection refused/reset or timeout, still failing after the client's retries."""


class LLMAnswerError(LLMError):
    """The endpoint answered, but not with what was asked for (no JSON object, no choices)."""


class ModelLoadError(LLMError):
    """A local model could not be loaded (missing path, not a checkpoint, no chat template)."""
