"""Training losses, one per file (formula and paper in each docstring), all computed by ``chunked_loss``.

``make_loss("jsd", beta=0.1)`` builds one by name; ``LOSSES`` lists them.
"""

from __future__ import annotations

from typing import Any

from evolve.errors import ConfigError
from evolve.train.losses.base import IGNORE_INDEX, Loss, Target, check_target, chunked_loss
from evolve.train.losses.ce import CrossEntropy
from evolve.train.losses.forward_kl import ForwardKL
from evolve.train.losses.jsd import GeneralizedJSD
from evolve.train.losses.reverse_kl import ReverseKL
from evolve.train.losses.sampled_reverse_kl import SampledReverseKL
from evolve.train.losses.taid import TAID
from evolve.train.losses.topk_forward_kl import TopKForwardKL

LOSSES: dict[str, type] = {
    cls.name: cls
    for cls in (CrossEntropy, ForwardKL, ReverseKL, GeneralizedJSD, TAID, TopKForwardKL, SampledReverseKL)
}


def make_loss(name: str, **kwargs: Any) -> Loss:
    """The loss called ``name``, built with ``kwargs``; a one-line ConfigError for a bad name or argument."""
    cls = LOSSES.get(name)
    if cls is None:
        raise ConfigError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"loss {name!r}: {e}".replace(f"{cls.__name__}.__init__() ", "")) from None


__all__ = ["IGNORE_INDEX", "LOSSES", "Loss", "Target", "check_target", "chunked_loss", "make_loss"]
