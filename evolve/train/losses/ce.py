"""Masked cross-entropy: the supervised fine-tuning loss.

    loss_i = -log p_S(y_i | x_<i) = -log softmax(z_S,i)[y_i]

the negative log-likelihood of the label under the student (maximum likelihood; for
sequence-level distillation the labels are the teacher's generations, Kim & Rush 2016,
"Sequence-Level Knowledge Distillation", EMNLP). Positions labelled -100 take no loss and
``Target.weights`` scale the rest (both applied by ``chunked_loss``). Needs only the labels, so it
works with any teacher or none; full logits only (a top-k teacher is not used).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from evolve.train.losses.base import IGNORE_INDEX, Target


class CrossEntropy:
    name = "ce"
    needs = frozenset({"labels"})

    def per_token(self, student_logits: Tensor, target: Target) -> Tensor:
        return F.cross_entropy(student_logits, target.labels, reduction="none", ignore_index=IGNORE_INDEX)
