"""BM25 keyword search over a sparse term matrix (DuckDB's fts extension cannot load offline).

score(q, d) = sum_{t in q} idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))
idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))      (Robertson & Zaragoza, 2009)

Scores are precomputed per (doc, term) so a query is one sparse row gather + sum, and a
candidate mask restricts results to the rows a metadata filter allowed.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from evolve.text import tokenize


class BM25Index:
    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.n_docs = len(texts)
        vocab: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        for i, t in enumerate(texts):
            for tok in tokenize(t):
                j = vocab.setdefault(tok, len(vocab))
                rows.append(i)
                cols.append(j)
        self.vocab = vocab
        if not rows or not self.n_docs:
            self._m = sparse.csc_matrix((self.n_docs, max(len(vocab), 1)), dtype=np.float32)
            return
        tf = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(self.n_docs, len(vocab))
        )
        tf.sum_duplicates()
        dl = np.asarray(tf.sum(axis=1)).ravel()
        avgdl = float(dl.mean()) or 1.0
        df = np.bincount(tf.indices, minlength=len(vocab)).astype(np.float32)
        idf = np.log1p((self.n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
        tf = tf.tocoo()
        norm = k1 * (1 - b + b * dl[tf.row] / avgdl)
        w = idf[tf.col] * tf.data * (k1 + 1) / (tf.data + norm)
        # CSC: a query gathers a few term columns.
        self._m = sparse.csc_matrix((w.astype(np.float32), (tf.row, tf.col)), shape=tf.shape)

    def scores(self, query: str) -> np.ndarray:
        cols = sorted({self.vocab[t] for t in tokenize(query) if t in self.vocab})
        if not cols:
            return np.zeros(self.n_docs, dtype=np.float32)
        return np.asarray(self._m[:, cols].sum(axis=1)).ravel()

    def search(self, query: str, k: int, mask: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Top-k ``(row, score)`` with score > 0, restricted to ``mask`` rows when given."""
        s = self.scores(query)
        if mask is not None:
            s = np.where(mask, s, 0.0)
        nz = np.flatnonzero(s > 0)
        if nz.size == 0:
            return []
        top = nz[np.argsort(-s[nz], kind="stable")[:k]]
        return [(int(i), float(s[i])) for i in top]
