"""What every loss sees, and the one place that turns hidden states into logits: chunk by chunk.

A distillation loss over a vocabulary of V = 150k entries cannot afford ``[N, V]`` float32 logits for
a batch's N trained positions (N = 8k positions is 4.9 GB). :func:`chunked_loss` therefore projects
the student's final hidden states through the output layer ``chunk_size`` positions at a time,
upcasts that chunk (and the teacher's chunk) to float32, hands it to the loss's ``per_token`` and
keeps only the per-token sum. Each chunk runs under ``torch.utils.checkpoint`` (non-reentrant), so
the autograd graph keeps the chunk's *inputs* (its hidden rows and a reference to the weight), not
its logits, and the backward recomputes one chunk's logits at a time. This is torchtune's
chunked-output cross-entropy and TRL's chunked JSD, applied to every loss here.

A teacher arrives either as full logits (``teacher_logits``, any dtype, sliced per chunk) or as its
final hidden states and output weight (``teacher_hidden @ teacher_weight.T`` computed per chunk under
``no_grad``); either way the loss reads ``target.teacher_logits`` for its chunk, already upcast.

Losses return the *unweighted* per-token value; :func:`chunked_loss` applies ``weights`` and drops
positions whose label is ``-100``, in one place. The result is a sum: the trainer divides by the
number of trained tokens across its accumulated batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from evolve.errors import ConfigError

IGNORE_INDEX = -100
"""A label that takes no loss (the Hugging Face convention)."""


@dataclass
class Target:
    """Everything known at the N trained positions, flattened over the batch (row i <-> hidden row i)."""

    labels: Tensor
    """[N] long: the token to predict (the dataset's next token, or the student's own sample on-policy)."""
    teacher_logits: Tensor | None = None
    """[N, V] full teacher logits, any dtype."""
    teacher_hidden: Tensor | None = None
    """[N, d_t] teacher final hidden states; with ``teacher_weight`` [V, d_t] the logits are made per chunk."""
    teacher_weight: Tensor | None = None
    topk_ids: Tensor | None = None
    """[N, k] an API teacher's top-k token ids."""
    topk_logprobs: Tensor | None = None
    """[N, k] the teacher's log-probs of those ids (normalised over the full vocabulary)."""
    tail_logprob: Tensor | None = None
    """[N] log of the teacher's mass outside the top k (derived as log(1 - sum p_k) when absent)."""
    teacher_token_logprob: Tensor | None = None
    """[N] teacher log p(labels) (sampled-token reverse KL)."""
    weights: Tensor | None = None
    """[N] per-token weights (default 1)."""

    def chunk(self, s: slice) -> Target:
        """Rows ``s`` of every per-position field (``teacher_weight`` is shared, not sliced)."""
        changes = {
            f.name: getattr(self, f.name)[s]
            for f in dataclasses.fields(self)
            if f.name != "teacher_weight" and getattr(self, f.name) is not None
        }
        return dataclasses.replace(self, **changes)

    def teacher_logits_chunk(self, s: slice, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The teacher's logits at rows ``s`` as ``dtype``, detached; None when there is no full-vocab teacher."""
        with torch.no_grad():
            if self.teacher_logits is not None:
                return self.teacher_logits[s].detach().to(dtype)
            if self.teacher_hidden is not None and self.teacher_weight is not None:
                return (self.teacher_hidden[s] @ self.teacher_weight.T).to(dtype)
        return None

    def has(self, name: str) -> bool:
        """Whether field ``name`` is available, counting what can be derived from a full-vocab teacher."""
        full_teacher = self.teacher_logits is not None or (
            self.teacher_hidden is not None and self.teacher_weight is not None
        )
        if name == "teacher_logits":
            return full_teacher
        if name == "teacher_token_logprob":
            return self.teacher_token_logprob is not None or full_teacher
        return getattr(self, name) is not None


class Loss(Protocol):
    name: str
    needs: frozenset[str]
    """Which Target fields it requires (checked by :func:`check_target` with a one-line error)."""

    def per_token(self, student_logits: Tensor, target: Target) -> Tensor:
        """[n] unweighted loss per position, from upcast student logits [n, V] and the chunk's target."""
        ...


def check_target(loss: Loss, target: Target, n: int, vocab: int) -> None:
    """One-line ConfigError when ``target`` lacks what ``loss`` needs or disagrees on N or the vocabulary."""
    alternatives = {
        "teacher_logits": " (or teacher_hidden + teacher_weight)",
        "teacher_token_logprob": " (or teacher_logits, or teacher_hidden + teacher_weight)",
    }
    for name in sorted(loss.needs):
        if not target.has(name):
            raise ConfigError(
                f"loss {loss.name!r} needs Target.{name}{alternatives.get(name, '')}, but it is None"
            )
    if target.labels.shape != (n,):
        raise ConfigError(
            f"Target.labels has shape {tuple(target.labels.shape)}, expected ({n},): one per hidden row"
        )
    teacher_vocab = None
    if target.teacher_logits is not None:
        teacher_vocab = target.teacher_logits.shape[-1]
    elif target.teacher_weight is not None:
        teacher_vocab = target.teacher_weight.shape[0]
    if "teacher_logits" in loss.needs and teacher_vocab is not None and teacher_vocab != vocab:
        raise ConfigError(
            f"teacher vocabulary ({teacher_vocab}) != student vocabulary ({vocab}): "
            "distill only between models that share a tokenizer"
        )


def chunked_loss(
    loss: Loss,
    hidden: Tensor,
    weight: Tensor,
    target: Target,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 256,
    checkpoint_chunks: bool = True,
) -> Tensor:
    """Sum over the N positions of ``weights * loss.per_token``, never holding more than one chunk's logits.

    ``hidden`` [N, d] are the student's final hidden states at the trained positions, ``weight`` [V, d]
    (and ``bias`` [V]) its output layer. Student logits ``hidden[s] @ weight.T`` are computed in the
    model's dtype and upcast to at least float32 per chunk; the teacher's likewise, under ``no_grad``.
    Gradient flows to ``hidden``, ``weight`` and ``bias``. Positions labelled ``-100`` contribute 0.
    ``checkpoint_chunks=False`` keeps every chunk's logits for the backward (faster, more memory).
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    n, vocab = hidden.shape[0], weight.shape[0]
    check_target(loss, target, n, vocab)
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    teacher_wanted = "teacher_logits" in loss.needs or (
        "teacher_token_logprob" in loss.needs and target.teacher_token_logprob is None
    )

    def chunk_sum(h: Tensor, w: Tensor, b: Tensor | None, s: slice) -> Tensor:
        logits = h @ w.T
        if b is not None:
            logits = logits + b
        logits = logits.to(compute_dtype)
        part = target.chunk(s)
        if teacher_wanted:
            part = dataclasses.replace(
                part,
                teacher_logits=target.teacher_logits_chunk(s, compute_dtype),
                teacher_hidden=None,
                teacher_weight=None,
            )
        values = loss.per_token(logits, part)
        keep = part.labels != IGNORE_INDEX
        if part.weights is not None:
            values = values * part.weights.to(compute_dtype)
        return torch.where(keep, values, torch.zeros_like(values)).sum()

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if n == 0:
        return (hidden.sum() * 0).to(compute_dtype)  # a zero that still has a grad path
    total = hidden.new_zeros((), dtype=compute_dtype)
    for start in range(0, n, chunk_size):
        s = slice(start, min(start + chunk_size, n))
        if needs_grad and checkpoint_chunks:
            total = total + checkpoint(chunk_sum, hidden[s], weight, bias, s, use_reentrant=False)
        else:
            total = total + chunk_sum(hidden[s], weight, bias, s)
    return total
