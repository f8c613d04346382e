"""A FAISS index over (vid, vector) rows that DuckDB owns. Derived data: always rebuildable.

Flat (exact) below ``hnsw_threshold`` vectors, HNSW above it, chosen automatically. Inner
product on L2-normalised vectors, so scores are cosine similarities.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np

HNSW_THRESHOLD = 50_000
HNSW_M = 32
# Graph quality decides recall at scale: on 1M clustered 384-d vectors (bench/store.py) recall@10 at
# efSearch 96 was 0.869 with efConstruction 40 (and stayed < 0.93 even at efSearch 768) but 0.986
# with 80. Building costs ~2x that of 40; at 100k both give >= 0.99.
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96
# Below this many allowed ids a filtered search is exact over the reconstructed vectors: a
# selective filter starves HNSW's graph walk and would cost recall.
EXACT_FILTER_LIMIT = 8192


class VectorIndex:
    def __init__(self, dim: int, hnsw_threshold: int = HNSW_THRESHOLD):
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.index: faiss.IndexIDMap2 = self._new(0)
        self.max_vid = -1
        self.count = 0
        self.checksum = 0
        # Per-filter work, cached for the ``allowed`` array last passed (compared by identity).
        self._sel: tuple[np.ndarray, faiss.IDSelector] | None = None
        self._exact: tuple[np.ndarray, np.ndarray] | None = None

    # -- build
    def _new(self, n: int) -> faiss.IndexIDMap2:
        if n >= self.hnsw_threshold:
            base = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            base.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            base = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(base)

    @property
    def kind(self) -> str:
        return "hnsw" if isinstance(faiss.downcast_index(self.index.index), faiss.IndexHNSW) else "flat"

    def build(self, vids: np.ndarray, vecs: np.ndarray) -> None:
        self.index = self._new(len(vids))
        self.max_vid, self.count, self.checksum = -1, 0, 0
        self.add(vids, vecs)

    def add(self, vids: np.ndarray, vecs: np.ndarray) -> None:
        if len(vids) == 0:
            return
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vector dim {vecs.shape[1]} != index dim {self.dim}")
        vids = np.ascontiguousarray(vids, dtype=np.int64)
        # Crossing the threshold re-plans the index type: rebuild from what we have plus the new rows.
        if self.kind == "flat" and self.count + len(vids) >= self.hnsw_threshold and self.count > 0:
            old_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            old = self.index.reconstruct_batch(old_ids)
            self.build(np.concatenate([old_ids, vids]), np.concatenate([old, vecs]))
            return
        if self.kind == "flat" and self.count == 0 and len(vids) >= self.hnsw_threshold:
            self.index = self._new(len(vids))
        self.index.add_with_ids(vecs, vids)
        self.count += len(vids)
        self.max_vid = max(self.max_vid, int(vids.max()))
        self.checksum = (self.checksum + int(vids.sum())) % (1 << 61)

    # -- search
    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Top-k ``(vid, score)`` for one query vector, optionally restricted to ``allowed`` vids."""
        if self.count == 0 or k <= 0:
            return []
        # One query has nothing to split across OpenMP threads, and on a busy machine (an LLM
        # server beside the store) waking them costs ~10x the search. The setting is per thread.
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._search(q, k, allowed)
        finally:
            faiss.omp_set_num_threads(before)

    def _search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        q = np.ascontiguousarray(q, dtype=np.float32).reshape(1, -1)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if len(allowed) == 0:
                return []
            hnsw = self.kind == "hnsw"
            if hnsw and len(allowed) <= EXACT_FILTER_LIMIT:
                # FAISS's single-threaded scan, not numpy's matmul: BLAS threads stall a busy machine.
                scores, pos = faiss.knn(
                    q, self._vectors_of(allowed), min(k, len(allowed)), faiss.METRIC_INNER_PRODUCT
                )
                return [(int(allowed[i]), float(s)) for i, s in zip(pos[0], scores[0]) if i >= 0]
            # A flat index with an id selector is exact already, and cheaper than reconstructing.
            sel = self._selector(allowed)
            if hnsw:
                # The graph walk must see ~1/selectivity more nodes to fill its beam with allowed
                # ones: 10% of 100k clustered vectors gives recall@10 0.92 at efSearch 96, 0.98 at 300.
                ef = max(HNSW_EF_SEARCH, 4 * k)
                ef = int(min(max(ef, 1024), ef * np.sqrt(self.count / len(allowed))))
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
            else:
                params = faiss.SearchParameters(sel=sel)
            scores, ids = self.index.search(q, min(k, len(allowed)), params=params)
        else:
            scores, ids = self.index.search(q, min(k, self.count))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _selector(self, allowed: np.ndarray) -> faiss.IDSelector:
        # Building the id set costs O(len(allowed)); a caller that passes the same array again
        # (the store caches one per namespace) reuses it.
        if self._sel is None or self._sel[0] is not allowed:
            self._sel = (allowed, faiss.IDSelectorBatch(allowed))
        return self._sel[1]

    def _vectors_of(self, allowed: np.ndarray) -> np.ndarray:
        # Vectors of a vid never change (a replaced row gets a new vid), so this cache stays valid.
        if self._exact is None or self._exact[0] is not allowed:
            self._exact = (allowed, self.index.reconstruct_batch(allowed))
        return self._exact[1]

    # -- persistence
    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        meta = {"dim": self.dim, "count": self.count, "max_vid": self.max_vid, "checksum": self.checksum}
        mtmp = path.with_suffix(".meta.tmp")
        mtmp.write_text(json.dumps(meta))
        os.replace(mtmp, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: Path, hnsw_threshold: int = HNSW_THRESHOLD) -> VectorIndex | None:
        """The saved index, or None when it is missing or unreadable (it is then rebuilt)."""
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            raw = faiss.read_index(str(path))  # typed already; a downcast proxy would not own it
            dim, count = int(meta["dim"]), int(meta["count"])
            max_vid, checksum = int(meta["max_vid"]), int(meta["checksum"])
        except Exception:
            return None
        # A foreign or stale file (another index type, another dimension, a count that disagrees with
        # its metadata) is not ours to trust: None, and the store rebuilds it from DuckDB.
        if not isinstance(raw, faiss.IndexIDMap2) or raw.d != dim or raw.ntotal != count:
            return None
        self = cls(dim, hnsw_threshold)
        self.index = raw
        self.count, self.max_vid, self.checksum = count, max_vid, checksum
        if isinstance(faiss.downcast_index(self.index.index), faiss.IndexHNSW):
            faiss.downcast_index(self.index.index).hnsw.efSearch = HNSW_EF_SEARCH
        return self
