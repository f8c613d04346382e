"""Training a student: data (masks, batching), losses (chunked), and one loop (:mod:`evolve.train.trainer`).

Names are resolved lazily, so ``python -m evolve.train.trainer`` runs the module once, and importing
this package costs nothing until a name is used (torch itself is imported when :func:`train` runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evolve.train.trainer import LoraSettings, TrainConfig, TrainError, TrainResult, train

__all__ = ["LoraSettings", "TrainConfig", "TrainError", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from evolve.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
