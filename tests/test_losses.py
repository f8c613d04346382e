"""The distillation losses against direct float64 computations, their gradients, and chunked_loss's memory bound."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from evolve.errors import ConfigError
from evolve.train.losses import LOSSES, Target, chunked_loss, make_loss

N, D, V, K = 13, 6, 11, 4


def _problem(n: int = N, d: int = D, v: int = V, k: int = K, seed: int = 0, dtype=torch.float64):
    """Random student head + hidden, a teacher (logits and hidden/weight form), top-k and sampled labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(v, d, generator=g, dtype=dtype)
    bias = torch.randn(v, generator=g, dtype=dtype)
    t_hidden = torch.randn(n, d + 2, generator=g, dtype=dtype)
    t_weight = torch.randn(v, d + 2, generator=g, dtype=dtype)
    t_logits = t_hidden @ t_weight.T
    labels = torch.randint(0, v, (n,), generator=g)
    t_logp = torch.log_softmax(t_logits.double(), -1)
    top_lp, top_ids = t_logp.topk(k, dim=-1)
    tail = torch.log1p(-top_lp.exp().sum(-1))
    weights = torch.rand(n, generator=g, dtype=dtype) + 0.5
    target = Target(
        labels=labels,
        teacher_logits=t_logits,
        topk_ids=top_ids,
        topk_logprobs=top_lp.to(dtype),
        tail_logprob=tail.to(dtype),
        teacher_token_logprob=t_logp.gather(-1, labels[:, None])[:, 0].to(dtype),
        weights=weights,
    )
    return hidden, weight, bias, target, t_hidden, t_weight


# Direct, unchunked float64 references, written from the formulas (probabilities, not the losses' code).
def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def reference(name: str, kw: dict, logits: torch.Tensor, target: Target) -> torch.Tensor:
    s = logits.double()
    p_s = torch.softmax(s, -1)
    t = target.teacher_logits.double()
    p_t = torch.softmax(t, -1)
    if name == "ce":
        return -p_s.gather(-1, target.labels[:, None])[:, 0].log()
    if name == "forward_kl":
        return _kl(p_t, p_s)
    if name == "reverse_kl":
        return _kl(p_s, p_t)
    if name == "jsd":
        b = kw["beta"]
        m = b * p_t + (1 - b) * p_s
        return b * _kl(p_t, m) + (1 - b) * _kl(p_s, m)
    if name == "taid":
        tt = kw["t"]
        p_mid = torch.softmax((1 - tt) * s + tt * t, -1)
        return _kl(p_mid, p_s)
    if name == "topk_forward_kl":
        ids = target.topk_ids
        q = p_t.gather(-1, ids)
        p = p_s.gather(-1, ids)
        q_tail, p_tail = 1 - q.sum(-1), 1 - p.sum(-1)
        return (q * (q / p).log()).sum(-1) + q_tail * (q_tail / p_tail).log()
    if name == "sampled_reverse_kl":
        y = target.labels[:, None]
        return (p_s.gather(-1, y) / p_t.gather(-1, y))[:, 0].log()
    raise AssertionError(name)


CASES = [
    ("ce", {}),
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("taid", {"t": 0.6}),
    ("topk_forward_kl", {}),
    ("sampled_reverse_kl", {}),
]


def test_every_registered_loss_is_tested():
    assert {name for name, _ in CASES} == set(LOSSES)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])
@pytest.mark.parametrize(("name", "kw"), CASES, ids=[c[0] for c in CASES])
def test_matches_direct_float64(name, kw, chunk_size):
    hidden, weight, bias, target, _, _ = _problem()
    target.labels[3] = -100  # an ignored position
    got = chunked_loss(make_loss(name, **kw), hidden, weight, target, bias=bias, chunk_size=chunk_size)
    per_token = reference(
        name,
        kw,
        hidden @ weight.T + bias,
        Target(**{**target.__dict__, "labels": target.labels.clamp(min=0)}),
    )
    keep = target.labels != -100
    expected = (per_token * target.weights)[keep].sum()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "taid", "sampled_reverse_kl"])
def test_teacher_hidden_and_weight_equal_teacher_logits(name):
    hidden, weight, _, target, t_hidden, t_weight = _problem()
    loss = make_loss(name)
    by_logits = chunked_loss(
        loss, hidden, weight, Target(labels=target.labels, teacher_logits=target.teacher_logits)
    )
    by_hidden = chunked_loss(
        loss,
        hidden,
        weight,
        Target(labels=target.labels, teacher_hidden=t_hidden, teacher_weight=t_weight),
        chunk_size=3,
    )
    torch.testing.assert_close(by_hidden, by_logits, rtol=1e-10, atol=1e-10)


def test_sampled_reverse_kl_gathers_teacher_logprob_from_full_logits():
    hidden, weight, _, target, _, _ = _problem()
    loss = make_loss("sampled_reverse_kl")
    given = chunked_loss(
        loss, hidden, weight, Target(labels=target.labels, teacher_token_logprob=target.teacher_token_logprob)
    )
    gathered = chunked_loss(
        loss, hidden, weight, Target(labels=target.labels, teacher_logits=target.teacher_logits), chunk_size=4
    )
    torch.testing.assert_close(gathered, given, rtol=1e-10, atol=1e-10)


# taid (t < 1) and sampled_reverse_kl stop gradients on purpose, so finite differences of their value are
# not their gradient; taid at t = 1 has a constant target and is checked here, the others below.
GRAD_CASES = [
    ("ce", {}),
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("taid", {"t": 1.0}),
    ("topk_forward_kl", {}),
]


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES, ids=[f"{c[0]}{c[1]}" for c in GRAD_CASES])
def test_gradcheck(name, kw):
    hidden, weight, bias, target, _, _ = _problem(n=5, d=3, v=6, k=2, seed=1)
    loss = make_loss(name, **kw)
    inputs = tuple(x.clone().requires_grad_() for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_loss(loss, h, w, target, bias=b, chunk_size=2), inputs
    )


def test_taid_gradient_is_student_minus_interpolated_target():
    hidden, weight, _, target, _, _ = _problem(n=5, d=3, v=6, seed=2)
    t = 0.35
    h = hidden.clone().requires_grad_()
    chunked_loss(make_loss("taid", t=t), h, weight, target, chunk_size=2).backward()
    s = hidden @ weight.T
    p_mid = torch.softmax((1 - t) * s + t * target.teacher_logits, -1)
    expected = (target.weights[:, None] * (torch.softmax(s, -1) - p_mid)) @ weight
    torch.testing.assert_close(h.grad, expected, rtol=1e-10, atol=1e-10)


def test_taid_schedule_and_endpoints():
    hidden, weight, _, target, _, _ = _problem()
    taid = make_loss("taid", t_start=0.2, t_end=0.8)
    assert taid.t == pytest.approx(0.2)
    taid.set_progress(0.5)
    assert taid.t == pytest.approx(0.5)
    taid.set_progress(7.0)
    assert taid.t == pytest.approx(0.8)
    fixed = make_loss("taid", t=0.3)
    fixed.set_progress(1.0)
    assert fixed.t == pytest.approx(0.3)
    full = chunked_loss(make_loss("taid", t=1.0), hidden, weight, target)
    torch.testing.assert_close(full, chunked_loss(make_loss("forward_kl"), hidden, weight, target))
    assert chunked_loss(make_loss("taid", t=0.0), hidden, weight, target).abs().item() < 1e-12


def _grads(loss, hidden, weight, target):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    value = chunked_loss(loss, h, w, target, chunk_size=2)
    value.backward()
    return value.detach(), h.grad, w.grad


def test_sampled_reverse_kl_gradient_expectation_is_the_reverse_kl_gradient():
    """Exhaustive: over every joint sample y ~ p_S (3 positions, vocabulary 3), E[value] = KL and E[grad] = grad KL."""
    n, v = 3, 3
    hidden, weight, _, target, _, _ = _problem(n=n, d=2, v=v, k=1, seed=3)
    log_p_t = torch.log_softmax(target.teacher_logits, -1)
    p_s = torch.softmax(hidden @ weight.T, -1)
    sampled = make_loss("sampled_reverse_kl")
    e_value, e_gh, e_gw = 0.0, torch.zeros_like(hidden), torch.zeros_like(weight)
    for ys in itertools.product(range(v), repeat=n):
        y = torch.tensor(ys)
        prob = p_s[torch.arange(n), y].prod()
        tgt = Target(labels=y, teacher_token_logprob=log_p_t[torch.arange(n), y])
        value, gh, gw = _grads(sampled, hidden, weight, tgt)
        e_value, e_gh, e_gw = e_value + prob * value, e_gh + prob * gh, e_gw + prob * gw
    kl, gh, gw = _grads(
        make_loss("reverse_kl"),
        hidden,
        weight,
        Target(labels=target.labels, teacher_logits=target.teacher_logits),
    )
    torch.testing.assert_close(e_value, kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e_gh, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e_gw, gw, rtol=1e-10, atol=1e-12)
    # and the estimator is not trivially the exact gradient for a single sample
    _, one_gh, _ = _grads(
        sampled,
        hidden,
        weight,
        Target(labels=torch.zeros(n, dtype=torch.long), teacher_token_logprob=log_p_t[:, 0]),
    )
    assert not torch.allclose(one_gh, gh)


def test_bf16_inputs_give_float32_close_to_float32_reference():
    hidden, weight, bias, target, _, _ = _problem(n=40, d=32, v=100, k=8, seed=4, dtype=torch.float32)
    hidden, weight = hidden / 4, weight / 4
    target.teacher_logits = target.teacher_logits.to(torch.bfloat16)
    for name, kw in CASES:
        loss = make_loss(name, **kw)
        h16 = hidden.to(torch.bfloat16).requires_grad_()
        got = chunked_loss(loss, h16, weight.to(torch.bfloat16), target, chunk_size=7)
        assert got.dtype == torch.float32, name
        ref = chunked_loss(
            loss, hidden.to(torch.bfloat16).float(), weight.to(torch.bfloat16).float(), target, chunk_size=40
        )
        torch.testing.assert_close(got.detach(), ref, rtol=2e-2, atol=2e-2, msg=name)
        got.backward()
        assert h16.grad is not None and h16.grad.dtype == torch.bfloat16 and torch.isfinite(h16.grad).all()


class _ShapeRecorder(TorchDispatchMode):
    """Every aten op's output shapes (forward and backward), and the row count of every matmul."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []
        self.matmul_rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.shape[-1] == self.vocab:
            self.matmul_rows.append(out.shape[0])
        return out


@pytest.mark.parametrize("name", ["forward_kl", "topk_forward_kl", "ce"])
def test_never_materialises_more_than_one_chunk_of_logits(name):
    n, d, v, chunk = 64, 4, 50, 8  # N*V = 3200 while every other tensor is <= chunk*V = 400
    hidden, weight, _, target, t_hidden, t_weight = _problem(n=n, d=d, v=v, k=5, seed=5, dtype=torch.float32)
    target.teacher_logits = None
    target.teacher_hidden, target.teacher_weight = t_hidden[:, :d], t_weight[:, :d]

    def run(chunk_size):
        rec = _ShapeRecorder()
        rec.vocab = v
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with rec:
            chunked_loss(make_loss(name), h, w, target, chunk_size=chunk_size).backward()
        return rec

    rec = run(chunk)
    assert max(rec.numels) == chunk * v
    assert rec.matmul_rows and max(rec.matmul_rows) == chunk
    # the recorder does see full-size logits when the chunk is the whole batch
    assert max(run(n).numels) == n * v


def test_backward_keeps_no_chunk_logits_alive():
    """Tensors saved for the backward outside the per-chunk checkpoints: no [chunk, V] logits among them."""
    n, d, v, chunk = 64, 4, 50, 8
    hidden, weight, _, target, _, _ = _problem(n=n, d=d, v=v, seed=6, dtype=torch.float32)

    def saved_numels(checkpoint_chunks):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = chunked_loss(
                make_loss("forward_kl"), h, w, target, chunk_size=chunk, checkpoint_chunks=checkpoint_chunks
            )
        out.backward()
        return sizes

    assert all(size < chunk * v for size in saved_numels(True))
    without = saved_numels(False)
    assert sum(size for size in without if size >= chunk * v) >= n * v  # every chunk's logits kept


@pytest.mark.parametrize(("name", "kw"), CASES, ids=[c[0] for c in CASES])
def test_weights_and_ignored_labels(name, kw):
    hidden, weight, _, target, _, _ = _problem(seed=7)
    loss = make_loss(name, **kw)
    drop = torch.tensor([1, 4, 9])
    keep = torch.ones(N, dtype=torch.bool)
    keep[drop] = False

    zero_weighted = Target(**{**target.__dict__, "weights": target.weights.clone().index_fill(0, drop, 0.0)})
    ignored = Target(**{**target.__dict__, "labels": target.labels.clone().index_fill(0, drop, -100)})
    subset = Target(
        **{k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in target.__dict__.items()}
    )
    expected = chunked_loss(loss, hidden[keep], weight, subset, chunk_size=3)
    torch.testing.assert_close(chunked_loss(loss, hidden, weight, zero_weighted, chunk_size=4), expected)
    torch.testing.assert_close(chunked_loss(loss, hidden, weight, ignored, chunk_size=4), expected)
    doubled = Target(**{**target.__dict__, "weights": target.weights * 2})
    torch.testing.assert_close(
        chunked_loss(loss, hidden, weight, doubled), 2 * chunked_loss(loss, hidden, weight, target)
    )
    unweighted = Target(**{**target.__dict__, "weights": None})
    ones = Target(**{**target.__dict__, "weights": torch.ones(N, dtype=torch.float64)})
    torch.testing.assert_close(
        chunked_loss(loss, hidden, weight, unweighted), chunked_loss(loss, hidden, weight, ones)
    )


@pytest.mark.parametrize("tail", ["given", "derived"])
def test_topk_with_k_equal_vocab_is_full_forward_kl(tail):
    hidden, weight, _, target, _, _ = _problem(k=V, seed=8)
    if tail == "given":
        target.tail_logprob = torch.full((N,), -math.inf, dtype=torch.float64)
    else:
        target.tail_logprob = None
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    topk = chunked_loss(make_loss("topk_forward_kl"), h1, weight, target, chunk_size=5)
    full = chunked_loss(make_loss("forward_kl"), h2, weight, target, chunk_size=5)
    torch.testing.assert_close(topk, full, rtol=1e-8, atol=1e-10)
    topk.backward()
    full.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-10)


def test_topk_derived_tail_equals_given_tail():
    hidden, weight, _, target, _, _ = _problem(seed=9)
    given = chunked_loss(make_loss("topk_forward_kl"), hidden, weight, target)
    derived = chunked_loss(
        make_loss("topk_forward_kl"), hidden, weight, Target(**{**target.__dict__, "tail_logprob": None})
    )
    torch.testing.assert_close(derived, given, rtol=1e-10, atol=1e-10)


def test_jsd_endpoints_relate_to_the_kls_as_in_gkd():
    hidden, weight, _, target, _, _ = _problem(seed=10)

    def value(name, **kw):
        return chunked_loss(make_loss(name, **kw), hidden, weight, target).item()

    fkl, rkl = value("forward_kl"), value("reverse_kl")
    assert fkl != pytest.approx(rkl, rel=1e-3)
    assert value("jsd", beta=0.0) == pytest.approx(fkl, rel=1e-12)
    assert value("jsd", beta=1.0) == pytest.approx(rkl, rel=1e-12)
    eps = 1e-7  # JSD(beta) / beta -> forward KL as beta -> 0; JSD / (1 - beta) -> reverse KL as beta -> 1
    assert value("jsd", beta=eps) / eps == pytest.approx(fkl, rel=1e-3)
    assert value("jsd", beta=1 - eps) / (1 - (1 - eps)) == pytest.approx(rkl, rel=1e-3)
    assert 0 < value("jsd", beta=0.5) <= math.log(2) * target.weights.sum().item()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_matches_trl_generalized_jsd_loss(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    hidden, weight, _, target, _, _ = _problem(seed=11)
    ours = chunked_loss(
        make_loss("jsd", beta=beta),
        hidden,
        weight,
        Target(labels=target.labels, teacher_logits=target.teacher_logits),
    )
    trl = gkd.GKDTrainer.generalized_jsd_loss(
        (hidden @ weight.T)[None], target.teacher_logits[None], beta=beta, reduction="sum"
    )
    torch.testing.assert_close(ours, trl, rtol=1e-10, atol=1e-10)


def test_make_loss_errors_are_one_line():
    with pytest.raises(ConfigError, match="unknown loss 'kld'; known: ce, forward_kl") as e:
        make_loss("kld")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="loss 'ce'.*no arguments"):
        make_loss("ce", beta=0.5)
    with pytest.raises(ConfigError, match=r"jsd beta must be in \[0, 1\], got 1.5"):
        make_loss("jsd", beta=1.5)
    with pytest.raises(ConfigError, match="taid t_start"):
        make_loss("taid", t_start=0.9, t_end=0.5)


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("forward_kl", "teacher_logits"),
        ("taid", "teacher_logits"),
        ("topk_forward_kl", "topk_ids"),
        ("sampled_reverse_kl", "teacher_token_logprob"),
    ],
)
def test_missing_target_field_is_named(name, missing):
    hidden, weight, _, target, _, _ = _problem()
    with pytest.raises(ConfigError, match=f"loss '{name}' needs Target.{missing}") as e:
        chunked_loss(make_loss(name), hidden, weight, Target(labels=target.labels))
    assert "\n" not in str(e.value)


def test_vocabulary_and_length_mismatches_are_refused():
    hidden, weight, _, target, _, _ = _problem()
    with pytest.raises(ConfigError, match=r"teacher vocabulary \(12\) != student vocabulary \(11\)"):
        chunked_loss(
            make_loss("forward_kl"),
            hidden,
            weight,
            Target(labels=target.labels, teacher_logits=torch.zeros(N, 12)),
        )
    with pytest.raises(ConfigError, match="Target.labels has shape"):
        chunked_loss(make_loss("ce"), hidden, weight, Target(labels=target.labels[:-1]))


def test_no_positions_gives_a_differentiable_zero():
    hidden, weight, _, _, _, _ = _problem()
    h = hidden[:0].clone().requires_grad_()
    out = chunked_loss(make_loss("ce"), h, weight, Target(labels=torch.zeros(0, dtype=torch.long)))
    out.backward()
    assert out.item() == 0.0 and h.grad.shape == (0, D)
