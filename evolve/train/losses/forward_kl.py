"""Forward KL from the teacher to the student, per token (word-level knowledge distillation).

    loss_i = KL(p_T,i || p_S,i) = sum_v p_T(v) * (log p_T(v) - log p_S(v))

with p = softmax of each model's logits at position i. Hinton, Vinyals & Dean 2015, "Distilling the
Knowledge in a Neural Network" (soft targets); applied token by token to sequence models as in
Kim & Rush 2016 ("word-level KD") and as the beta = 0 end of GKD (Agarwal et al. 2024). Mode-covering:
the student is pushed to put mass wherever the teacher does. Its gradient in the student logits is
p_S - p_T.

Full logits only (``teacher_logits`` or ``teacher_hidden`` + ``teacher_weight``). With an API
teacher's top-k log-probs use ``topk_forward_kl``, which equals this loss when k = V.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from evolve.train.losses.base import Target


class ForwardKL:
    name = "forward_kl"
    needs = frozenset({"teacher_logits"})

    def per_token(self, student_logits: Tensor, target: Target) -> Tensor:
        assert target.teacher_logits is not None
        log_s = F.log_softmax(student_logits, dim=-1)
        log_t = F.log_softmax(target.teacher_logits, dim=-1)
        # F.kl_div(input, target) = sum target * (log target - input): KL(target || input).
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
