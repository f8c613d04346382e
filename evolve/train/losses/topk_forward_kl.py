"""Forward KL against an API teacher's top-k log-probs, with one tail bucket for the rest.

    K        = the teacher's top-k ids at position i,   q_v = exp(topk_logprobs),  q_tail = exp(tail_logprob)
    p_v      = p_S(v) for v in K,                       p_tail = sum_{v not in K} p_S(v)
    loss_i   = sum_{v in K} q_v * (log q_v - log p_v) + q_tail * (log q_tail - log p_tail)

the forward KL (Hinton et al. 2015; per token as in Kim & Rush 2016) between the teacher and the
student after both are coarsened to k + 1 outcomes: the k ids the teacher ranked and "anything
else". This is what a top-k log-prob API allows; the tail bucket keeps the student from being
rewarded for dumping mass outside K. When ``tail_logprob`` is absent it is log(1 - sum_K q_v); when
k = V (tail empty, q_tail = 0) the loss equals full ``forward_kl``. log p_tail is computed as a
logsumexp over the student's logits outside K, not as 1 - sum p_v, so a small tail keeps its
precision. The teacher's log-probs are used as given (normalised over the full vocabulary), not
renormalised over K.

Why no top-k *reverse* KL: sum_{v in K} p_S(v) log(p_S(v)/q_v) only sees the student's mass on the
teacher's k ids, so the student can lower it by concentrating on one of them (or by leaving K, where
nothing is measured): the loss collapses, as issue 19 / DESIGN.md note (STAR; verl's review of
on-policy distillation). The unbiased on-policy alternative is ``sampled_reverse_kl``, which needs
only the teacher's log-prob of the student's own sampled token.

Top-k only: needs ``topk_ids`` and ``topk_logprobs`` (``tail_logprob`` optional), no full logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evolve.train.losses.base import Target


class TopKForwardKL:
    name = "topk_forward_kl"
    needs = frozenset({"topk_ids", "topk_logprobs"})

    def per_token(self, student_logits: Tensor, target: Target) -> Tensor:
        assert target.topk_ids is not None and target.topk_logprobs is not None
        ids = target.topk_ids.long()
        log_q = target.topk_logprobs.to(student_logits.dtype)
        log_z = torch.logsumexp(student_logits, dim=-1)
        log_p = student_logits.gather(-1, ids) - log_z[:, None]
        # Student mass outside K: logsumexp over the logits with K pushed to the dtype's minimum (finite,
        # so a row whose K is the whole vocabulary gives a finite value and a zero gradient, not NaN).
        floor = torch.finfo(student_logits.dtype).min
        outside = student_logits.scatter(-1, ids, floor)
        log_p_tail = torch.logsumexp(outside, dim=-1) - log_z

        if target.tail_logprob is not None:
            log_q_tail = target.tail_logprob.to(student_logits.dtype)
        else:
            log_q_tail = torch.log1p(-log_q.exp().sum(-1).clamp(max=1.0))
        q_tail = log_q_tail.exp()
        # k = V leaves no tail outcome: a derived tail there is rounding noise (~1e-16), not mass.
        has_tail = (q_tail > 0) & (ids.shape[-1] < student_logits.shape[-1])
        # where() on both sides: 0 * log 0 and -inf - (-inf) must never reach the sum or the gradient.
        tail_term = torch.where(
            has_tail,
            q_tail * (torch.where(has_tail, log_q_tail, 0.0) - torch.where(has_tail, log_p_tail, 0.0)),
            0.0,
        )
        return (log_q.exp() * (log_q - log_p)).sum(-1) + tail_term
