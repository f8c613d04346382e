"""Sampled-token reverse KL: the on-policy estimator of KL(p_S || p_T), one sampled token per position.

The labels are the student's *own* samples, y_i ~ p_S(. | x, y_<i) (on-policy rollouts). Per token:

    a_i      = stopgrad(log p_S(y_i) - log p_T(y_i))            (log p_T from ``teacher_token_logprob``)
    loss_i   = a_i + a_i * (log p_S(y_i) - stopgrad(log p_S(y_i)))
    value    = a_i                       an unbiased sample of KL(p_S || p_T) at position i (the "k1" estimate)
    gradient = a_i * grad log p_S(y_i)   REINFORCE with reward -a_i

Unbiased: E_{y~p_S}[(log p_S(y) - log p_T(y)) grad log p_S(y)]
        = sum_y grad p_S(y) (log p_S(y) - log p_T(y))
        = grad KL(p_S || p_T) - sum_y p_S(y) grad log p_S(y),  and the last sum is grad sum_y p_S(y) = 0.
(The test checks this by exhaustive enumeration on a tiny vocabulary.) Each token is its own
"episode" with discount 0, as in Thinking Machines' on-policy distillation (Lu & Thinking Machines
Lab 2025, "On-Policy Distillation": per-token advantage -(log p_S - log p_T) of the sampled token)
and the token-level on-policy objective of GKD (Agarwal et al. 2024) and MiniLLM (Gu et al. 2024).
It is unbiased only when the labels were sampled from the current student at temperature 1; samples
from an older policy need an importance weight, which this loss does not apply.

The teacher only scores the student's token: an API teacher's ``teacher_token_logprob`` suffices;
with full teacher logits (``teacher_logits`` or ``teacher_hidden`` + ``teacher_weight``) it is
gathered from them when ``teacher_token_logprob`` is absent.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from evolve.train.losses.base import Target


class SampledReverseKL:
    name = "sampled_reverse_kl"
    needs = frozenset({"labels", "teacher_token_logprob"})

    def per_token(self, student_logits: Tensor, target: Target) -> Tensor:
        labels = target.labels.clamp(min=0)[:, None]  # -100 rows are dropped by chunked_loss
        log_p = F.log_softmax(student_logits, dim=-1).gather(-1, labels)[:, 0]
        if target.teacher_token_logprob is not None:
            log_t = target.teacher_token_logprob.to(student_logits.dtype)
        else:
            assert target.teacher_logits is not None
            log_t = F.log_softmax(target.teacher_logits, dim=-1).gather(-1, labels)[:, 0]
        advantage = (log_p - log_t).detach()
        return advantage + advantage * (log_p - log_p.detach())
