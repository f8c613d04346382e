"""Generalized Jensen-Shannon divergence JSD(beta), per token (GKD).

    m        = beta * p_T + (1 - beta) * p_S
    loss_i   = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)
    beta = 0 : KL(p_T || p_S)   (forward KL)        beta = 1 : KL(p_S || p_T)   (reverse KL)

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD), ICLR, Eq. (1) with P = teacher, Q = student. Beta points *towards the teacher's
weight in the mixture* and the way TRL's ``GKDTrainer.generalized_jsd_loss`` does: small beta behaves
like forward KL (JSD(beta) / beta -> KL(p_T || p_S) as beta -> 0), beta near 1 like reverse KL
(JSD(beta) / (1 - beta) -> KL(p_S || p_T)), and, as in TRL, the endpoints 0 and 1 are defined as
those KLs themselves (the mixture formula would give 0 there). beta = 0.5 is the symmetric JSD,
bounded by log 2. Default beta = 0.5, TRL's default.

Full logits only (the mixture needs both distributions over the whole vocabulary).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from evolve.errors import ConfigError
from evolve.train.losses.base import Target


class GeneralizedJSD:
    name = "jsd"
    needs = frozenset({"teacher_logits"})

    def __init__(self, beta: float = 0.5) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
        self.beta = float(beta)

    def per_token(self, student_logits: Tensor, target: Target) -> Tensor:
        assert target.teacher_logits is not None
        log_s = F.log_softmax(student_logits, dim=-1)
        log_t = F.log_softmax(target.teacher_logits, dim=-1)
        beta = self.beta
        if beta == 0.0:
            return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
        if beta == 1.0:
            return F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
        log_m = torch.logsumexp(torch.stack([log_s + math.log1p(-beta), log_t + math.log(beta)]), dim=0)
        kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)  # KL(p_T || m)
        kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)  # KL(p_S || m)
        return beta * kl_t + (1.0 - beta) * kl_s
