"""TAID: temporally adaptive interpolated distillation, per token.

    p_t    = softmax((1 - t) * stopgrad(z_S) + t * z_T)       (z = logits at position i)
    loss_i = KL(p_t || p_S) = sum_v p_t(v) * (log p_t(v) - log p_S(v))

Shing, Misaki, Bao, Yokoi & Akiba 2025, "TAID: Temporally Adaptive Interpolated Distillation for
Efficient Knowledge Transfer in Language Models", ICLR. The target moves from the (detached) student
towards the teacher as t grows, so a small student is never asked to jump straight to a far larger
teacher's distribution; t = 1 is forward KL, t = 0 is no loss. The gradient in the student logits
is p_S - p_t (the target is a constant).

Schedule: ``t`` fixed by the constructor, or ``set_progress(p)`` with p in [0, 1] the share of
training done (the trainer calls it each step): t = t_start + (t_end - t_start) * p. This is the
linear schedule that the paper's adaptive update uses as its lower bound; the defaults
t_start = 0.4, t_end = 1.0 are the authors'. The momentum-based adaptive increase of t from the
relative change of the objective is not implemented.

Full logits only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from evolve.errors import ConfigError
from evolve.train.losses.base import Target


class TAID:
    name = "taid"
    needs = frozenset({"teacher_logits"})

    def __init__(self, t: float | None = None, t_start: float = 0.4, t_end: float = 1.0) -> None:
        for label, value in (("t", t), ("t_start", t_start), ("t_end", t_end)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"taid {label} must be in [0, 1], got {value}")
        if t_start > t_end:
            raise ConfigError(f"taid t_start ({t_start}) must not exceed t_end ({t_end})")
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.fixed = t is not None
        self.t = float(t) if t is not None else self.t_start

    def set_progress(self, progress: float) -> None:
        """Share of training done, in [0, 1]; moves t linearly from t_start to t_end (unless t was fixed)."""
        if not self.fixed:
            p = min(max(float(progress), 0.0), 1.0)
            self.t = self.t_start + (self.t_end - self.t_start) * p

    def per_token(self, student_logits: Tensor, target: Target) -> Tensor:
        assert target.teacher_logits is not None
        mixed = (1.0 - self.t) * student_logits.detach() + self.t * target.teacher_logits
        log_p_t = F.log_softmax(mixed, dim=-1)
        log_s = F.log_softmax(student_logits, dim=-1)
        return F.kl_div(log_s, log_p_t, reduction="none", log_target=True).sum(-1)  # KL(p_t || p_S)
