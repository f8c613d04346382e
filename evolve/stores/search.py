"""Vectors (in DuckDB), the FAISS indexes derived from them, BM25, and the store's hybrid search.

DuckDB's ``vectors`` table is the truth; a FAISS index per kind is rebuilt or extended from it
whenever a commit on the file changed it (so losing an index file loses nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from evolve.errors import StoreError
from evolve.schema import SearchHit
from evolve.stores import tables as T
from evolve.stores._part import Part
from evolve.stores.hybrid import Reranker, rerank, rerank_order, rrf_fuse
from evolve.stores.keyword import BM25Index
from evolve.stores.vector_index import VectorIndex

if TYPE_CHECKING:
    from evolve.stores.experience import ExperienceStore

# Kinds whose text is derived from a source table and embedded lazily.
SOURCES: dict[str, tuple[str, str]] = {
    "trajectory": ("trajectories", "summary"),
    "skill": ("skills", "text"),
    "guardrail": ("guardrails", "text"),
}
# Columns a metadata filter may name, per kind (anything else is a user error).
FILTERABLE: dict[str, set[str]] = {
    "trajectory": {"env", "split", "policy", "arm", "outcome", "task_id", "run_id"},
    "skill": {"env", "status", "signature", "name"},
    "guardrail": {"env", "status", "signature", "root_cause", "scope"},
}


class VectorSearch(Part):
    """Vectors of every kind, their FAISS indexes and BM25 indexes (caches valid for one generation)."""

    def __init__(self, store: ExperienceStore):
        super().__init__(store)
        self._indexes: dict[str, VectorIndex] = {}
        self._bm25: dict[str, tuple[_Meta, BM25Index]] = {}
        self._fresh: dict[str, int] = {}
        self._meta: dict[str, _Meta] = {}
        self._allowed: dict[str, dict[str, tuple[np.ndarray | None, np.ndarray | None]]] = {}

    # ------------------------------------------------------------------ writing vectors
    def write(
        self,
        kind: str,
        rows: Sequence[tuple[str, str, str]],
        vecs: np.ndarray,
        model: str | None = None,
        replace: bool = True,
    ) -> None:
        vecs = np.asarray(vecs, dtype=np.float32)
        model = model or self.store.embedder.name
        n = len(rows)
        if n == 0:
            return
        if n <= 8:
            with self.store.transaction():
                # A few rows: parameters in one statement (Arrow's setup costs more than this).
                if replace:
                    self.conn.execute(
                        "DELETE FROM vectors WHERE kind = ? AND list_contains(?::VARCHAR[], ref_id)",
                        [kind, list(dict.fromkeys(r[0] for r in rows))],
                    )
                values = ", ".join(["(nextval('vid_seq'), ?, ?, ?, ?, ?, ?::FLOAT[])"] * n)
                params: list[Any] = []
                for (ref_id, ns, text), vec in zip(rows, vecs):
                    params += [kind, ref_id, ns, model, text, vec.tolist()]
                self.conn.execute(f"INSERT INTO vectors VALUES {values}", params)
            self.invalidate(kind)
            return
        with self.store.transaction():
            # The drawn values themselves, not min()+arange: another connection may draw concurrently.
            vids = np.sort(
                self.conn.execute("SELECT nextval('vid_seq') AS v FROM range(?)", [n]).fetchnumpy()["v"]
            ).astype(np.int64)
            ref_ids = [r[0] for r in rows]
            self.conn.register("_ids", pa.table({"id": ref_ids}))
            try:
                self.conn.execute(
                    "DELETE FROM vectors WHERE kind = ? AND ref_id IN (SELECT id FROM _ids)", [kind]
                )
            finally:
                self.conn.unregister("_ids")
            flat = pa.array(vecs.reshape(-1), type=pa.float32())
            lists = pa.ListArray.from_arrays(
                pa.array(np.arange(0, (n + 1) * vecs.shape[1], vecs.shape[1], dtype=np.int32)), flat
            )
            cols = {
                "vid": pa.array(vids),
                "kind": [kind] * n,
                "ref_id": ref_ids,
                "namespace": [r[1] for r in rows],
                "model": [model] * n,
                "text": [r[2] for r in rows],
                "vec": lists,
            }
            self.append(T.VECTORS, T.VECTORS.arrow(cols))
        self.invalidate(kind)

    def delete(
        self, kind: str, ref_ids: Sequence[str] | None = None, *, other_than_model: str | None = None
    ) -> None:
        """Drop the vectors of ``ref_ids`` of ``kind`` (all of them when None), or of another model."""
        where, params = ["kind = ?"], [kind]
        if ref_ids is not None:
            where.append("ref_id IN (SELECT unnest(?::VARCHAR[]))")
            params.append(list(ref_ids))
        if other_than_model is not None:
            where.append("model <> ?")
            params.append(other_than_model)
        with self.store.transaction():
            self.conn.execute(f"DELETE FROM vectors WHERE {' AND '.join(where)}", params)
        self.invalidate(kind)

    def invalidate(self, kind: str | None = None) -> None:
        for k in [kind] if kind else list(self._bm25):
            self._bm25.pop(k, None)

    def sync(self, kind: str) -> int:
        """Embed source rows of ``kind`` that have no (or an outdated) vector. Returns how many."""
        if kind not in SOURCES or self.store.read_only:
            return 0
        table, col = SOURCES[kind]
        embedder = self.store.embedder
        model = embedder.name
        todo = self.conn.execute(
            f"""SELECT s.id, s.namespace, s.{col} FROM {table} s LEFT JOIN vectors v
                ON v.kind = ? AND v.ref_id = s.id AND v.model = ? AND v.text = s.{col}
                WHERE v.vid IS NULL ORDER BY s.id""",
            [kind, model],
        ).fetchall()
        if not todo:
            return 0
        for i in range(0, len(todo), 1024):
            chunk = [(r[0], r[1], r[2] or "") for r in todo[i : i + 1024]]
            self.write(kind, chunk, embedder.embed([r[2] for r in chunk]))
        # Rows of another model are dropped together with the new ones' replacements.
        self.delete(kind, other_than_model=model)
        return len(todo)

    # ------------------------------------------------------------------ FAISS
    def _db_index_state(self, kind: str) -> tuple[int, int, int]:
        row = self.one(
            "SELECT count(*), coalesce(max(vid), -1), coalesce(sum(vid), 0) FROM vectors WHERE kind = ?",
            [kind],
        )
        assert row is not None
        n, mx, sm = row
        return int(n), int(mx), int(sm) % (1 << 61)

    def _dims(self, kind: str) -> int | None:
        row = self.one("SELECT len(vec) FROM vectors WHERE kind = ? LIMIT 1", [kind])
        return int(row[0]) if row else None

    def vector_index(self, kind: str, rebuild: bool = False) -> VectorIndex:
        """The FAISS index of ``kind``, loaded, extended or rebuilt so that it matches DuckDB."""
        store = self.store
        with store.locked():
            idx = None if rebuild else self._indexes.get(kind)
            # Fast path: no transaction committed on this file since the index was last checked.
            if idx is not None and self._fresh.get(kind) == store.generation():
                return idx
            self.sync(kind)
            gen = store.generation()
            n, mx, sm = self._db_index_state(kind)
            dim = self._dims(kind) or getattr(store._embedder, "dim", None) or 384
            meta = self._meta.get(kind) if idx is not None else None
            path = store.index_dir / f"{kind}.index" if store.index_dir else None
            if idx is None and path is not None and not rebuild:
                idx = VectorIndex.load(path, store.hnsw_threshold, store.partition_min)
            if idx is not None and idx.dim != dim:
                idx = None  # dimension mismatch: the embedder changed
            changed = False
            if idx is not None and (idx.count, idx.max_vid, idx.checksum) != (n, mx, sm):
                # Only appended rows: extend. Anything else (deletes, replaced rows): rebuild.
                newer = self.one(
                    "SELECT count(*), coalesce(sum(vid), 0) FROM vectors WHERE kind = ? AND vid > ?",
                    [kind, idx.max_vid],
                )
                assert newer is not None
                if idx.count + int(newer[0]) == n and (idx.checksum + int(newer[1])) % (1 << 61) == sm:
                    start = idx.max_vid + 1
                    vids, vecs, nss = self._load_vectors(kind, min_vid=start)
                    idx.add(vids, vecs, nss)
                    if meta is not None:
                        meta = meta.extend(self._load_meta(kind, min_vid=start))
                    changed = True
                else:
                    idx = None
            if idx is None:
                idx = VectorIndex(dim, store.hnsw_threshold, store.partition_min)
                vids, vecs, nss = self._load_vectors(kind)
                idx.build(vids, vecs, nss)
                meta = None
                changed = True
            if meta is None or len(meta) != idx.count:
                meta = self._load_meta(kind)
            if path is not None and (changed or not path.exists()):
                idx.save(path)
            self._indexes[kind] = idx
            if self._meta.get(kind) is not meta:
                self._meta[kind] = meta
                self._allowed.pop(kind, None)
            self._fresh[kind] = gen
            return idx

    def _load_vectors(self, kind: str, min_vid: int = 0) -> tuple[np.ndarray, np.ndarray, pa.ChunkedArray]:
        """``(vids, vectors, namespaces)`` of ``kind`` from ``min_vid`` on, in vid order."""
        # sql(), not execute(): Arrow from a relation is not copied twice.
        tbl = self.conn.sql(
            "SELECT vid, namespace, vec FROM vectors WHERE kind = ? AND vid >= ? ORDER BY vid",
            params=[kind, min_vid],
        ).to_arrow_table()
        vids = tbl.column("vid").to_numpy().astype(np.int64)
        if len(vids) == 0:
            return vids, np.zeros((0, self._dims(kind) or 1), dtype=np.float32), tbl.column("namespace")
        col = tbl.column("vec").combine_chunks()
        # A view of Arrow's float32 buffer, not a copy: at 1M 384-d vectors a copy is 1.5 GB more.
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return vids, flat.reshape(len(vids), -1), tbl.column("namespace")

    def _load_meta(self, kind: str, min_vid: int = 0) -> _Meta:
        tbl = self.conn.sql(
            "SELECT vid, ref_id, namespace, text FROM vectors WHERE kind = ? AND vid >= ? ORDER BY vid",
            params=[kind, min_vid],
        ).to_arrow_table()
        return _Meta(tbl)

    def _keyword(self, kind: str, meta: _Meta) -> BM25Index:
        cached = self._bm25.get(kind)
        if cached and cached[0] is meta:
            return cached[1]
        bm = BM25Index(meta.texts())
        self._bm25[kind] = (meta, bm)
        return bm

    def _allowed_vids(
        self, kind: str, ns: str, filters: dict[str, Any] | None, meta: _Meta
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(vids, row mask over meta or None)`` a search may return; ``(None, None)``: all rows may."""
        filters = {k: v for k, v in (filters or {}).items() if v is not None}
        bad = set(filters) - FILTERABLE.get(kind, set())
        if bad:
            allowed = ", ".join(sorted(FILTERABLE.get(kind, set()))) or "none"
            raise StoreError(f"cannot filter {kind} on {', '.join(sorted(bad))}; filterable: {allowed}")
        if not filters:
            # Namespace only: answered from the in-memory metadata, cached until the index changes.
            per_ns = self._allowed.setdefault(kind, {})
            if ns not in per_ns:
                mask = meta.namespace_mask(ns)
                per_ns[ns] = (None, None) if mask.all() else (meta.vids[mask], mask)
            return per_ns[ns]
        where, params = ["v.kind = ?", "v.namespace = ?"], [kind, ns]
        table = SOURCES[kind][0]
        join = f" JOIN {table} s ON s.id = v.ref_id"
        for col, val in filters.items():
            vals = T.as_list(val.value if hasattr(val, "value") else val) or []
            vals = [x.value if hasattr(x, "value") else x for x in vals]
            where.append(f"s.{col} IN (" + ",".join("?" * len(vals)) + ")")
            params += vals
        rows = self.conn.execute(
            f"SELECT v.vid FROM vectors v{join} WHERE {' AND '.join(where)} ORDER BY v.vid", params
        ).fetchnumpy()
        return np.asarray(rows["vid"], dtype=np.int64), None  # the mask only if keyword search needs it

    # ------------------------------------------------------------------ search
    def search(
        self,
        kind: str,
        k: int,
        ns: str,
        filters: dict[str, Any] | None,
        mode: str,
        q: np.ndarray | None,
        query: str,
        rrf_k: int,
        reranker: Reranker | None = None,
        rerank_depth: int | None = None,
    ) -> list[SearchHit]:
        store = self.store
        with store.locked():  # FAISS must not search an index that another thread is extending
            idx = self.vector_index(kind)
            meta = self._meta[kind]
            # Vectors written with add_vectors may name a namespace no other row has.
            if ns not in store._known_namespaces() and not meta.has_namespace(ns):
                store._check_namespace(ns)
            allowed, mask = self._allowed_vids(kind, ns, filters, meta)
            if allowed is not None and len(allowed) == 0:
                return []
            # A reranker sees more candidates than it returns.
            want = max(k, rerank_depth or max(k * 4, 20)) if reranker is not None else k
            depth = want if mode == "dense" else max(want * 4, 20)
            dense: list[tuple[int, float]] = []
            kw: list[tuple[int, float]] = []
            if q is not None:
                if q.shape[0] != idx.dim:
                    raise StoreError(
                        f"the {kind} vectors are {idx.dim}-d but the query vector is {q.shape[0]}-d "
                        f"(embedder '{getattr(store._embedder, 'name', '?')}'); search with the embedder that wrote them"
                    )
                # Namespace isolation is exact: only allowed vids can come back.
                dense = idx.search(q, depth, allowed=allowed, namespaces=(ns,))
            if mode in ("hybrid", "keyword"):
                bm = self._keyword(kind, meta)
                if mask is None and allowed is not None:
                    mask = np.isin(meta.vids, allowed, assume_unique=True)
                kw = [(int(meta.vids[i]), s) for i, s in bm.search(query, depth, mask=mask)]
            if mode == "dense":
                fused = dict(dense)
            elif mode == "keyword":
                fused = dict(kw)
            else:
                fused = rrf_fuse((dense, kw), rrf_k)
            top = sorted(fused.items(), key=lambda x: -x[1])[:want]
            dmap, kmap = dict(dense), dict(kw)
            hits = []
            for (vid, score), (ref_id, hit_ns, text) in zip(top, meta.rows([v for v, _ in top])):
                if ref_id is None:
                    continue
                hits.append(
                    SearchHit(
                        id=ref_id,
                        kind=kind,
                        namespace=hit_ns,
                        score=score,
                        text=text or "",
                        dense_score=dmap.get(vid),
                        keyword_score=kmap.get(vid),
                    )
                )
        if reranker is not None and hits:
            # The reranker's score becomes the hit's score; dense/keyword scores stay as they were.
            rs = rerank(reranker, query, [h.text for h in hits])
            hits = [hits[j].model_copy(update={"score": float(rs[j])}) for j in rerank_order(rs)]
        return hits[:k]

    def rebuild(self, kinds: Iterable[str] | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        if kinds is None:
            stored = [r[0] for r in self.conn.execute("SELECT DISTINCT kind FROM vectors").fetchall()]
            kinds = stored + list(SOURCES)
        for kind in kinds:
            if kind not in out:
                out[kind] = self.vector_index(kind, rebuild=True).count
        return out


class _Meta:
    """``vid, ref_id, namespace, text`` of one kind's vectors, sorted by vid, kept beside its index.

    Turning FAISS hits into results and namespaces into id filters then needs no query: at 1M
    vectors a DuckDB point lookup by vid scans the table (no index on vid) and costs ~10 ms.
    """

    def __init__(self, table: pa.Table):
        self.table = table.combine_chunks()
        self.vids = self.table.column("vid").to_numpy().astype(np.int64)
        self._ns: pa.DictionaryArray | None = None

    def __len__(self) -> int:
        return len(self.vids)

    def extend(self, more: _Meta) -> _Meta:
        return _Meta(pa.concat_tables([self.table, more.table]))

    def texts(self) -> list[str]:
        return [t or "" for t in self.table.column("text").to_pylist()]

    def _namespaces(self) -> pa.DictionaryArray:
        if self._ns is None:
            self._ns = self.table.column("namespace").combine_chunks().dictionary_encode()
        return self._ns

    def has_namespace(self, ns: str) -> bool:
        return ns in self._namespaces().dictionary.to_pylist()

    def namespace_mask(self, ns: str) -> np.ndarray:
        d = self._namespaces().dictionary.to_pylist()
        if ns not in d:
            return np.zeros(len(self), dtype=bool)
        return self._namespaces().indices.to_numpy(zero_copy_only=False) == d.index(ns)

    def rows(self, vids: list[int]) -> list[tuple[str | None, str, str | None]]:
        """``(ref_id, namespace, text)`` per vid; ``ref_id`` None for a vid it does not hold."""
        if not vids:
            return []
        pos = np.searchsorted(self.vids, vids)
        pos = np.minimum(pos, len(self.vids) - 1)
        got = self.table.take(pa.array(pos)).to_pydict()
        return [
            (got["ref_id"][i], got["namespace"][i], got["text"][i]) if self.vids[p] == v else (None, "", None)
            for i, (p, v) in enumerate(zip(pos, vids))
        ]
