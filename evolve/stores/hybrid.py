"""The one hybrid-search path: dense cosine + BM25 keyword scores, a fusion, an optional reranker.

Two callers, one set of parts:

- :meth:`ExperienceStore.search <evolve.stores.experience.ExperienceStore.search>` ranks a
  dense (FAISS) list and a keyword (BM25) list and fuses them by reciprocal rank
  (:func:`rrf_fuse`, Cormack et al., 2009): ``sum_lists 1 / (rrf_k + rank + 1)``.
- :class:`HybridScorer` (the agent's in-memory knowledge retrieval) scores every text:
  ``0.7 * clip(cosine, 0, 1) + 0.3 * bm25 / max(bm25)`` (:func:`linear_fuse`).

Either may then hand its top candidates to a :class:`Reranker` (:func:`rerank`), which reorders
them; with none, scores are exactly the fused ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from evolve.errors import StoreError
from evolve.stores.embedders import Embedder
from evolve.stores.keyword import BM25Index

DENSE_WEIGHT = 0.7
KEYWORD_WEIGHT = 0.3
RRF_K = 60
H = TypeVar("H", bound=Hashable)


@runtime_checkable
class Reranker(Protocol):
    """Scores ``texts`` for ``query``: one finite float per text, higher is better.

    The score of a text must not depend on the other texts of the call (batching-independent),
    and the same call must give the same scores (deterministic).
    """

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray: ...


def rerank(reranker: Reranker, query: str, texts: Sequence[str]) -> np.ndarray:
    """The reranker's scores of ``texts`` as float64, checked to be one finite float per text."""
    if not texts:
        return np.zeros(0)
    s = np.asarray(reranker.score(query, list(texts)), dtype=np.float64).reshape(-1)
    if s.shape[0] != len(texts) or not np.isfinite(s).all():
        raise StoreError(
            f"reranker {type(reranker).__name__} returned {s.shape[0]} scores for {len(texts)} texts "
            "(or a non-finite one); it must return one finite score per text"
        )
    return s


def rerank_order(scores: np.ndarray) -> list[int]:
    """Positions by descending reranker score; ties keep the order they came in (the fused order)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def rrf_fuse(lists: Iterable[Sequence[tuple[H, float]]], rrf_k: int = RRF_K) -> dict[H, float]:
    """Reciprocal-rank fusion of ranked ``(key, score)`` lists (each best first)."""
    fused: dict[H, float] = {}
    for lst in lists:
        for rank, (key, _) in enumerate(lst):
            fused[key] = fused.get(key, 0.0) + 1.0 / (rrf_k + rank + 1)
    return fused


def linear_fuse(dense: np.ndarray, keyword: np.ndarray) -> np.ndarray:
    """``0.7 * dense + 0.3 * keyword / max(keyword)`` (keyword left as is when it is all zero)."""
    if keyword.size and keyword.max() > 0:
        keyword = keyword / keyword.max()
    return DENSE_WEIGHT * dense + KEYWORD_WEIGHT * keyword


class HybridScorer:
    """Dense cosine + BM25 over a fixed list of texts (an in-memory snapshot, e.g. a worker's skills).

    ``reranker`` (optional) reorders the top candidates in :meth:`top`; :meth:`scores` never uses it.
    """

    def __init__(
        self, texts: Sequence[str], embedder: Embedder | None = None, reranker: Reranker | None = None
    ):
        self.texts = list(texts)
        self.embedder = embedder
        self.reranker = reranker
        self.vecs = embedder.embed(self.texts) if (embedder is not None and self.texts) else None
        self.bm25 = BM25Index(self.texts) if self.texts else None

    def __len__(self) -> int:
        return len(self.texts)

    def dense(self, query: str) -> np.ndarray:
        """Cosine similarity per text, clipped to 0..1 (zeros without an embedder)."""
        dense = np.zeros(len(self.texts))
        if self.vecs is not None and self.embedder is not None:
            q = self.embedder.embed([query])[0]
            dense = np.clip(self.vecs @ q, 0.0, 1.0)
        return dense

    def keyword(self, query: str) -> np.ndarray:
        """Raw BM25 score per text."""
        return self.bm25.scores(query) if self.bm25 is not None else np.zeros(len(self.texts))

    def scores(self, query: str) -> np.ndarray:
        """The fused score per text (:func:`linear_fuse`)."""
        if not self.texts:
            return np.zeros(0)
        return linear_fuse(self.dense(query), self.keyword(query))

    def top(
        self, scores: np.ndarray, k: int, query: str | None = None, depth: int | None = None
    ) -> tuple[list[int], dict[int, float]]:
        """The ``k`` best rows and the reranker's score of each row it saw.

        Without a reranker (or a query): every row in order when there are at most ``k``, else the
        ``k`` best by ``scores``. With one: the ``depth`` best by ``scores`` (default ``4k``) are
        reranked and the ``k`` best by the reranker come back, best first.
        """
        n = len(self.texts)
        if self.reranker is None or query is None:
            if n <= k:
                return list(range(n)), {}
            return [int(i) for i in np.argsort(-scores, kind="stable")[:k]], {}
        pool = [int(i) for i in np.argsort(-scores, kind="stable")[: max(k, depth or 4 * k)]]
        rs = rerank(self.reranker, query, [self.texts[i] for i in pool])
        return [pool[j] for j in rerank_order(rs)[:k]], {r: float(s) for r, s in zip(pool, rs)}


# --------------------------------------------------------------------------- implementations


class EmbeddingReranker:
    """Cosine similarity under a (stronger) embedder than the first stage used: a bi-encoder reranker."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        q = self.embedder.embed([query])[0]
        return (self.embedder.embed(list(texts)) @ q).astype(np.float64)


CALIBRATION_FILE = "evolve_reranker.json"
"""Written next to a reranker evolve trained: Platt ``a``, ``b`` and the filtering ``threshold``."""


def reranker_query(query: str, head: int = 200, tail: int = 450) -> str:
    """The query a cross-encoder sees: repeated paragraphs dropped (the goal often opens the first
    observation too), then the head (the goal) and the tail (the latest observation) kept when long.
    Training data and scoring both go through it, so the model sees at act time what it learned on."""
    seen: set[str] = set()
    parts = []
    for para in query.replace("\r", "").split("\n"):
        key = " ".join(para.split()).lower()
        if key and key in seen:
            continue
        seen.add(key)
        parts.append(para)
    q = "\n".join(parts).strip()
    if len(q) <= head + tail:
        return q
    return q[:head] + " ... " + q[-tail:]


class CrossEncoderReranker:
    """A sentence-transformers ``CrossEncoder`` (a directory, or a loaded model).

    With a calibration (``(a, b)``, read from the directory's ``evolve_reranker.json`` when there
    is one) scores are ``sigmoid(a * logit + b)``: probabilities that the memory helps, so one
    ``threshold`` (also read from that file, default 0.5) filters irrelevant memories. Without
    one, scores are the model's own ``predict`` output. Queries go through :func:`reranker_query`.
    """

    def __init__(
        self,
        model: str | Path | Any,
        device: str | None = None,
        batch_size: int = 32,
        calibration: tuple[float, float] | None | str = "auto",
        query_chars: tuple[int, int] = (200, 450),
    ):
        self.threshold = 0.5
        self.query_chars = query_chars
        """Head and tail characters of the query kept by :func:`reranker_query` (from the file)."""
        cal: tuple[float, float] | None = None
        if isinstance(model, (str, Path)):
            p = Path(model)
            if not p.exists():
                raise StoreError(f"no cross-encoder at '{p}'; give the directory a CrossEncoder was saved to")
            meta = p / CALIBRATION_FILE
            if meta.exists():
                try:
                    m = json.loads(meta.read_text())
                    cal = (float(m["a"]), float(m["b"]))
                    self.threshold = float(m.get("threshold", 0.5))
                    self.query_chars = tuple(int(x) for x in m.get("query_chars", query_chars))  # type: ignore[assignment]
                except (ValueError, KeyError, TypeError) as e:
                    raise StoreError(f"unreadable reranker calibration '{meta}': {e}") from e
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import CrossEncoder

            try:
                model = CrossEncoder(str(p), device=device or "cpu")
            except Exception as e:  # the library raises many types for a bad dir
                raise StoreError(f"could not load a CrossEncoder from '{p}': {e}") from e
        self.model = model
        self.batch_size = batch_size
        self.calibration: tuple[float, float] | None = cal if calibration == "auto" else calibration  # type: ignore[assignment]

    def logits(self, query: str, texts: Sequence[str]) -> np.ndarray:
        """The model's raw scores (no activation)."""
        import torch

        out = self.model.predict(
            [(reranker_query(query, *self.query_chars), t) for t in texts],
            batch_size=self.batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
            activation_fn=torch.nn.Identity(),
        )
        return np.asarray(out, dtype=np.float64).reshape(len(texts), -1)[:, -1]

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        if self.calibration is None:
            out = self.model.predict(
                [(reranker_query(query, *self.query_chars), t) for t in texts],
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
            )
            return np.asarray(out, dtype=np.float64).reshape(len(texts), -1)[:, -1]
        a, b = self.calibration
        return 1.0 / (1.0 + np.exp(-(a * self.logits(query, texts) + b)))


def make_reranker(spec: str | Path | None) -> Reranker | None:
    """``None``/``""``/``"none"`` -> no reranker; ``"embedding:<embedder spec>"`` ->
    :class:`EmbeddingReranker`; otherwise a CrossEncoder directory (:class:`CrossEncoderReranker`)."""
    if spec is None or str(spec) in ("", "none"):
        return None
    s = str(spec)
    if s.startswith("embedding:"):
        from evolve.stores.embedders import make_embedder

        return EmbeddingReranker(make_embedder(s.partition(":")[2] or None))
    return CrossEncoderReranker(s)


__all__ = [
    "CALIBRATION_FILE",
    "CrossEncoderReranker",
    "DENSE_WEIGHT",
    "EmbeddingReranker",
    "HybridScorer",
    "KEYWORD_WEIGHT",
    "RRF_K",
    "Reranker",
    "linear_fuse",
    "make_reranker",
    "reranker_query",
    "rerank",
    "rerank_order",
    "rrf_fuse",
]
