"""Reverse KL from the student to the teacher, per token, over the full vocabulary.

    loss_i = KL(p_S,i || p_T,i) = sum_v p_S(v) * (log p_S(v) - log p_T(v))

MiniLLM (Gu, Dong, Wei & Huang 2024, "MiniLLM: Knowledge Distillation of Large Language Models",
ICLR): mode-seeking, the student is not pushed to cover teacher modes it cannot fit. This is the
exact per-position divergence given the full teacher distribution at positions whose prefix is
fixed; the beta = 1 end of GKD's generalized JSD. (MiniLLM optimises the sequence-level reverse KL
with a policy gradient over the student's own samples; for that, on-policy, see
``sampled_reverse_kl``.)

Full logits only. Top-k reverse KL is not offered: restricted to the teacher's top k the student
can move its mass onto the few tokens the teacher ranked, and the loss collapses (see
``topk_forward_kl``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from evolve.train.losses.base import Target


class ReverseKL:
    name = "reverse_kl"
    needs = frozenset({"teacher_logits"})

    def per_token(self, student_logits: Tensor, target: Target) -> Tensor:
        assert target.teacher_logits is not None
        log_s = F.log_softmax(student_logits, dim=-1)
        log_t = F.log_softmax(target.teacher_logits, dim=-1)
        return F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)  # KL(p_S || p_T)
