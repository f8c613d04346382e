"""FAISS indexes over (vid, vector, namespace) rows that DuckDB owns. Derived data: always rebuildable.

Partitioned by namespace: a namespace that holds at least ``partition_min`` vectors has a FAISS
index of its own; the smaller ones share a pool. A search within one namespace (every
``ExperienceStore`` search) then walks only that namespace's vectors: at 1M vectors in 10
namespaces it costs what a 100k index costs, where an id filter on one shared HNSW graph starves
the graph walk (it must visit ~1/selectivity more nodes for the same recall). Each part is flat
(exact) below ``hnsw_threshold`` vectors and HNSW above. Inner product on L2-normalised vectors,
so scores are cosine similarities.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

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
# A namespace this large gets its own FAISS index. Below it, a search filtered to the namespace
# in the shared pool is exact over at most this many reconstructed vectors, which costs about
# what a search of its own flat index would; above it, an own index is what keeps it fast.
PARTITION_MIN = EXACT_FILTER_LIMIT
_FORMAT = 2
"""Version of the files beside the store (1: one index per kind, no partitions)."""


def _encode(namespaces: Sequence[str] | pa.Array | pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """``(names, codes)``: each row's namespace as an index into ``names`` (Arrow does it in C)."""
    arr = (
        namespaces
        if isinstance(namespaces, (pa.Array, pa.ChunkedArray))
        else pa.array(namespaces, pa.string())
    )
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    return arr.dictionary.to_pylist(), arr.indices.to_numpy(zero_copy_only=False).astype(np.int32)


class _Part:
    """One FAISS index (flat or HNSW) of some vectors and their ids."""

    def __init__(self, dim: int, hnsw_threshold: int):
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.index: faiss.IndexIDMap2 = self._new(0)
        self.count = 0
        self.checksum = 0
        self.dirty = True
        """Changed since it was last saved."""
        self._vids: np.ndarray | None = None
        # Per-filter work, cached for the ``allowed`` array last passed (compared by identity).
        self._sel: tuple[np.ndarray, faiss.IDSelector] | None = None
        self._exact: tuple[np.ndarray, np.ndarray] | None = None

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

    def vids(self) -> np.ndarray:
        """The ids in insertion order (ascending: rows are added in vid order)."""
        if self._vids is None or len(self._vids) != self.count:
            self._vids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return self._vids

    def add(self, vids: np.ndarray, vecs: np.ndarray) -> None:
        if len(vids) == 0:
            return
        # Crossing the threshold re-plans the index type: rebuild from what it has plus the new rows.
        if self.kind == "flat" and self.count + len(vids) >= self.hnsw_threshold:
            if self.count > 0:
                old_ids = self.vids()
                old = self.index.reconstruct_batch(old_ids)
                vids, vecs = np.concatenate([old_ids, vids]), np.concatenate([old, vecs])
            self.index, self.count, self.checksum, self._vids = self._new(len(vids)), 0, 0, None
        self.index.add_with_ids(vecs, vids)
        self.count += len(vids)
        self.checksum = (self.checksum + int(vids.sum())) % (1 << 61)
        self.dirty = True

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        """Top-k ``(vid, score)``, restricted to ``allowed`` (ids of this part) when given."""
        if allowed is None:
            scores, ids = self.index.search(q, min(k, self.count))
            return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        hnsw = self.kind == "hnsw"
        # A few allowed ids: exact over their reconstructed vectors (cached per filter), which a
        # graph walk cannot match for recall nor a flat scan of the whole part for speed.
        if len(allowed) <= EXACT_FILTER_LIMIT and (hnsw or 4 * len(allowed) < self.count):
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
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _selector(self, allowed: np.ndarray) -> faiss.IDSelector:
        # Building the id set costs O(len(allowed)); the same array again (routes are cached per
        # filter) reuses it.
        if self._sel is None or self._sel[0] is not allowed:
            self._sel = (allowed, faiss.IDSelectorBatch(allowed))
        return self._sel[1]

    def _vectors_of(self, allowed: np.ndarray) -> np.ndarray:
        # Vectors of a vid never change (a replaced row gets a new vid), so this cache stays valid.
        if self._exact is None or self._exact[0] is not allowed:
            self._exact = (allowed, self.index.reconstruct_batch(allowed))
        return self._exact[1]


_Route = list[tuple[_Part, np.ndarray | None]]


class VectorIndex:
    """The FAISS side of one kind of vectors: an own index per large namespace, a pool for the rest."""

    def __init__(self, dim: int, hnsw_threshold: int = HNSW_THRESHOLD, partition_min: int = PARTITION_MIN):
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.partition_min = max(1, partition_min)
        self.parts: dict[str, _Part] = {}
        """Namespaces with an index of their own."""
        self.pool = _Part(dim, hnsw_threshold)
        # The namespace of each pool row, in the pool's insertion order, as codes into pool_names.
        self.pool_names: list[str] = []
        self.pool_codes = np.zeros(0, dtype=np.int32)
        self.max_vid = -1
        self._route: tuple[Any, tuple[str, ...] | None, _Route] | None = None

    # -- what it holds
    @property
    def count(self) -> int:
        return self.pool.count + sum(p.count for p in self.parts.values())

    @property
    def checksum(self) -> int:
        """Sum of the vids mod 2**61: with count and max_vid, what says it matches DuckDB."""
        return (self.pool.checksum + sum(p.checksum for p in self.parts.values())) % (1 << 61)

    @property
    def kind(self) -> str:
        """``hnsw`` when any part is a graph, else ``flat``."""
        parts = [self.pool, *self.parts.values()]
        return "hnsw" if any(p.count and p.kind == "hnsw" for p in parts) else "flat"

    def describe(self) -> str:
        """The layout in words (benchmarks print it)."""
        own = sorted(((p.kind, p.count) for p in self.parts.values()), key=lambda x: -x[1])
        kinds = {k for k, _ in own}
        txt = f"{len(own)} namespace indexes ({'/'.join(sorted(kinds))})" if own else ""
        if self.pool.count:
            pool = f"pool {self.pool.kind} {self.pool.count:,} ({len(self._pool_counts())} ns)"
            txt = f"{txt} + {pool}" if txt else pool
        return txt or "empty"

    def _pool_counts(self) -> dict[str, int]:
        counts = np.bincount(self.pool_codes, minlength=len(self.pool_names))
        return {n: int(c) for n, c in zip(self.pool_names, counts) if c}

    # -- build
    def build(
        self, vids: np.ndarray, vecs: np.ndarray, namespaces: Sequence[str] | pa.Array | pa.ChunkedArray
    ) -> None:
        self.parts, self.pool = {}, _Part(self.dim, self.hnsw_threshold)
        self.pool_names, self.pool_codes, self.max_vid = [], np.zeros(0, dtype=np.int32), -1
        self.add(vids, vecs, namespaces)

    def add(
        self, vids: np.ndarray, vecs: np.ndarray, namespaces: Sequence[str] | pa.Array | pa.ChunkedArray
    ) -> None:
        """Add rows (vids ascending, above every vid held): to their namespace's own index, or to
        the pool; a pool namespace that reaches ``partition_min`` moves to an own index."""
        self._route = None
        if len(vids) == 0:
            return
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vector dim {vecs.shape[1]} != index dim {self.dim}")
        vids = np.ascontiguousarray(vids, dtype=np.int64)
        names, codes = _encode(namespaces)
        counts = np.bincount(codes, minlength=len(names))
        in_pool = self._pool_counts()
        graduate = [
            n
            for n, c in zip(names, counts)
            if c and n not in self.parts and in_pool.get(n, 0) + int(c) >= self.partition_min
        ]
        if graduate:
            self._graduate(graduate)
        pool_rows = np.ones(len(vids), dtype=bool)
        for c, name in enumerate(names):
            part = self.parts.get(name)
            if part is None or not counts[c]:
                continue
            rows = codes == c
            part.add(vids[rows], vecs[rows])
            pool_rows &= ~rows
        if pool_rows.any():
            self.pool.add(vids[pool_rows], vecs[pool_rows])
            lookup = {n: i for i, n in enumerate(self.pool_names)}
            for n in names:
                if n not in lookup:
                    lookup[n] = len(self.pool_names)
                    self.pool_names.append(n)
            remap = np.array([lookup[n] for n in names], dtype=np.int32)
            self.pool_codes = np.concatenate([self.pool_codes, remap[codes[pool_rows]]])
        self.max_vid = max(self.max_vid, int(vids.max()))

    def _graduate(self, names: list[str]) -> None:
        """Move ``names`` out of the pool into own indexes (the pool is rebuilt without them)."""
        moving = np.isin(self.pool_codes, [self.pool_names.index(n) for n in names if n in self.pool_names])
        for n in names:
            self.parts[n] = _Part(self.dim, self.hnsw_threshold)
        if not moving.any():
            return
        vids = self.pool.vids()
        vecs = self.pool.index.reconstruct_batch(vids)
        for n in names:
            if n in self.pool_names:
                rows = self.pool_codes == self.pool_names.index(n)
                self.parts[n].add(vids[rows], vecs[rows])
        keep = ~moving
        self.pool = _Part(self.dim, self.hnsw_threshold)
        self.pool.add(vids[keep], vecs[keep])
        self.pool_codes = self.pool_codes[keep]

    # -- search
    def search(
        self,
        q: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        namespaces: Collection[str] | None = None,
    ) -> list[tuple[int, float]]:
        """Top-k ``(vid, score)`` for one query vector among the rows of ``namespaces`` (None: all),
        restricted to the ``allowed`` vids when given."""
        if self.count == 0 or k <= 0:
            return []
        q = np.ascontiguousarray(q, dtype=np.float32).reshape(1, -1)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if len(allowed) == 0:
                return []
        route = self._plan(allowed, namespaces)
        # One query has nothing to split across OpenMP threads, and on a busy machine (an LLM
        # server beside the store) waking them costs ~10x the search. The setting is per thread.
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            found = [part.search(q, k, sub) for part, sub in route]
        finally:
            faiss.omp_set_num_threads(before)
        if len(found) == 1:
            return found[0]
        return heapq.nlargest(k, (h for hits in found for h in hits), key=lambda h: h[1])

    def _plan(self, allowed: np.ndarray | None, namespaces: Collection[str] | None) -> _Route:
        """Which parts to search, each with its share of ``allowed`` (None: all of the part);
        cached for the same ``allowed`` array and namespaces (the store passes cached arrays)."""
        key = None if namespaces is None else tuple(sorted(namespaces))
        if self._route is not None and self._route[0] is allowed and self._route[1] == key:
            return self._route[2]
        route: _Route = []
        one = key is not None and len(key) == 1  # then every allowed vid is of that namespace
        for name, part in self.parts.items():
            if key is not None and name not in key:
                continue
            if allowed is None:
                route.append((part, None))
                continue
            sub = allowed if one else _within(allowed, np.sort(part.vids()))
            if len(sub) == part.count:
                route.append((part, None))
            elif len(sub):
                route.append((part, sub))
        if self.pool.count:
            present = np.flatnonzero(np.bincount(self.pool_codes, minlength=len(self.pool_names)))
            codes = [int(i) for i in present if key is None or self.pool_names[i] in key]
            whole = len(codes) == len(present)
            if allowed is None:
                if whole:
                    route.append((self.pool, None))
                elif codes:
                    route.append((self.pool, self.pool.vids()[np.isin(self.pool_codes, codes)]))
            elif codes:
                sub = allowed if (one or not self.parts) else _within(allowed, np.sort(self.pool.vids()))
                if len(sub) == self.pool.count:
                    route.append((self.pool, None))
                elif len(sub):
                    route.append((self.pool, sub))
        self._route = (allowed, key, route)
        return route

    # -- persistence
    def save(self, path: Path) -> None:
        """``path`` is the pool's FAISS file; each own index is a file beside it, ``path``'s JSON
        lists them (written last, so a save cut short is detected at load and rebuilt)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = []
        for name, part in sorted(self.parts.items()):
            f = path.with_name(f"{path.stem}.{hashlib.sha1(name.encode()).hexdigest()[:16]}.part")
            if part.dirty or not f.exists():
                _write(part.index, f)
                part.dirty = False
            parts.append({"namespace": name, "file": f.name, "count": part.count, "checksum": part.checksum})
        if self.pool.dirty or not path.exists():
            _write(self.pool.index, path)
            self.pool.dirty = False
        codes = path.with_name(f"{path.stem}.pool.npy")
        with open(codes.with_suffix(".tmp"), "wb") as f:
            np.save(f, self.pool_codes)
        os.replace(codes.with_suffix(".tmp"), codes)
        meta = {
            "format": _FORMAT,
            "dim": self.dim,
            "count": self.count,
            "max_vid": self.max_vid,
            "checksum": self.checksum,
            "pool": {"count": self.pool.count, "checksum": self.pool.checksum, "names": self.pool_names},
            "parts": parts,
        }
        mtmp = path.with_suffix(".meta.tmp")
        mtmp.write_text(json.dumps(meta))
        os.replace(mtmp, path.with_suffix(".json"))
        # Files of namespaces that no longer have an own index (after a rebuild).
        keep = {p["file"] for p in parts}
        pattern = re.compile(re.escape(path.stem) + r"\.[0-9a-f]{16}\.part")
        for f in path.parent.iterdir():
            if pattern.fullmatch(f.name) and f.name not in keep:
                f.unlink(missing_ok=True)

    @classmethod
    def load(
        cls, path: Path, hnsw_threshold: int = HNSW_THRESHOLD, partition_min: int = PARTITION_MIN
    ) -> VectorIndex | None:
        """The saved index, or None when it is missing, unreadable, of another layout or not
        consistent with its metadata (the store then rebuilds it from DuckDB)."""
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != _FORMAT:
                return None
            self = cls(int(meta["dim"]), hnsw_threshold, partition_min)
            self.max_vid = int(meta["max_vid"])
            pool = meta["pool"]
            self.pool = _read(path, self.dim, int(pool["count"]), int(pool["checksum"]), hnsw_threshold)
            self.pool_names = [str(n) for n in pool["names"]]
            self.pool_codes = np.load(path.with_name(f"{path.stem}.pool.npy")).astype(np.int32)
            if len(self.pool_codes) != self.pool.count:
                return None
            for p in meta["parts"]:
                f = path.with_name(str(p["file"]))
                self.parts[str(p["namespace"])] = _read(
                    f, self.dim, int(p["count"]), int(p["checksum"]), hnsw_threshold
                )
            if (self.count, self.checksum) != (int(meta["count"]), int(meta["checksum"])):
                return None
        except Exception:
            return None
        return self


def _within(allowed: np.ndarray, sorted_vids: np.ndarray) -> np.ndarray:
    """The ``allowed`` vids that are in ``sorted_vids``."""
    if len(sorted_vids) == 0:
        return allowed[:0]
    pos = np.minimum(np.searchsorted(sorted_vids, allowed), len(sorted_vids) - 1)
    return allowed[sorted_vids[pos] == allowed]


def _write(index: faiss.Index, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _read(path: Path, dim: int, count: int, checksum: int, hnsw_threshold: int) -> _Part:
    """One saved part; ValueError when it is not the index its metadata describes."""
    raw = faiss.read_index(str(path))  # typed already; a downcast proxy would not own it
    # A foreign or stale file (another index type, another dimension, other ids) is not ours to trust.
    if not isinstance(raw, faiss.IndexIDMap2) or raw.d != dim or raw.ntotal != count:
        raise ValueError(f"{path} is not the index its metadata describes")
    part = _Part(dim, hnsw_threshold)
    part.index, part.count, part.dirty = raw, count, False
    part.checksum = int(part.vids().sum()) % (1 << 61) if count else 0
    if part.checksum != checksum:
        raise ValueError(f"{path} holds other ids than its metadata says")
    if isinstance(faiss.downcast_index(raw.index), faiss.IndexHNSW):
        faiss.downcast_index(raw.index).hnsw.efSearch = HNSW_EF_SEARCH
    return part
