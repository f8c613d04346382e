"""LangGraph long-term memory on evolve's ExperienceStore: ``EvolveStore(BaseStore)``.

Items live in the store's DuckDB file (table ``langgraph_items``); the embeddings of their fields
are rows of the shared ``vectors`` table (kind ``lg_item``), so the FAISS index beside the file is
derived data that rebuilds itself when deleted. Where LangGraph's ``InMemoryStore`` and
``SqliteStore`` disagree, ``SqliteStore`` is followed (see ``EvolveStore``).
"""

from __future__ import annotations

import asyncio
import json
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from langchain_core.embeddings import Embeddings
from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    ensure_embeddings,
    get_text_at_path,
    tokenize_path,
    validate_op_namespace,
)

from evolve.errors import StoreError
from evolve.stores.embedders import Embedder
from evolve.stores.experience import ExperienceStore
from evolve.stores.hybrid import Reranker, rerank, rerank_order
from evolve.stores.vector_index import EXACT_FILTER_LIMIT

_META_KEY = "langgraph_items"
"""The ``evolve_meta`` key that says this store has the items table (no catalog probe at open)."""
KIND = "lg_item"
"""The ``vectors.kind`` of item embeddings."""
TABLE = "langgraph_items"

_DDL = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    prefix VARCHAR NOT NULL,      -- labels joined by '.', which no label may contain (as SqliteStore)
    namespace VARCHAR[] NOT NULL,
    key VARCHAR NOT NULL,
    ref_id VARCHAR NOT NULL,      -- vectors.ref_id of this item's embedded fields
    value JSON NOT NULL,
    index_spec JSON,              -- the put's `index`: null (store fields), false, or a list of paths
    created_at TIMESTAMP NOT NULL,  -- UTC
    updated_at TIMESTAMP NOT NULL,  -- UTC
    seq BIGINT NOT NULL,          -- write order: breaks updated_at ties inside one batch
    PRIMARY KEY (prefix, key))"""
_COLS = "i.namespace, i.key, i.value, i.created_at, i.updated_at"
_NUMERIC = "('BIGINT', 'UBIGINT', 'DOUBLE', 'HUGEINT')"
_CMP: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "$gt": (">", operator.gt),
    "$gte": (">=", operator.ge),
    "$lt": ("<", operator.lt),
    "$lte": ("<=", operator.le),
}
_MISSING = object()
_SMALL_BATCH = 16
"""Puts in one batch up to which rows are written with parameters, not through Arrow."""
_FEW = 256
"""Vectors in a search's scope up to which one query fetches them with their exact scores."""
"""Puts in one batch up to which rows are written with parameters, not through Arrow."""


# ---------------------------------------------------------------------------------- embeddings
class _Embedding:
    """The index's embedder behind one interface: an evolve ``Embedder`` or LangChain ``Embeddings``.

    Rows come back L2-normalised float32, so an inner product is the cosine InMemoryStore computes.
    """

    def __init__(self, embed: Any, dims: int | None, fallback: Callable[[], Embedder]):
        self.dims = dims
        self._fallback = fallback if embed is None else None
        self._evolve: Embedder | None = embed if isinstance(embed, Embedder) else None
        self._lc: Embeddings | None = None
        if embed is not None and self._evolve is None:
            self._lc = ensure_embeddings(embed)  # Embeddings, a sync or async callable, or "provider:model"
        if self._evolve is not None and dims is not None and self._evolve.dim != dims:
            raise ValueError(
                f"index dims {dims} != the embedder's dim {self._evolve.dim} ({self._evolve.name})"
            )

    @property
    def evolve(self) -> Embedder | None:
        if self._evolve is None and self._fallback is not None:
            self._evolve = self._fallback()  # the store's embedder: MiniLM loads only when first needed
        return self._evolve

    @property
    def name(self) -> str:
        """Written to ``vectors.model``: vectors of another name are re-embedded (see ``reindex``)."""
        if self.evolve is not None:
            return self.evolve.name
        lc = self._lc
        ident = getattr(lc, "model", None) or getattr(lc, "model_name", None)
        if ident is None:
            func = getattr(lc, "func", None) or getattr(lc, "afunc", None)
            ident = getattr(func, "__qualname__", "") if func is not None else ""
        return f"langchain:{type(lc).__name__}:{ident}" + (f":{self.dims}" if self.dims else "")

    def _finish(self, rows: Any, n: int) -> np.ndarray:
        v = (
            np.asarray(rows, dtype=np.float32).reshape(n, -1)
            if n
            else np.zeros((0, self.dims or 1), np.float32)
        )
        if n and self.dims is not None and v.shape[1] != self.dims:
            raise ValueError(
                f"the embedder returned {v.shape[1]}-d vectors but the index says dims={self.dims}"
            )
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        return np.ascontiguousarray(v / norms, dtype=np.float32)

    def embed(self, docs: list[str], queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of ``docs`` and of ``queries``: one model call for an evolve embedder."""
        if self.evolve is not None:
            if not docs and not queries:
                return self._finish([], 0), self._finish([], 0)
            v = self._finish(self.evolve.embed(docs + queries), len(docs) + len(queries))
            return v[: len(docs)], v[len(docs) :]
        assert self._lc is not None
        # LangChain separates the two because some models embed queries differently (as InMemoryStore).
        d = self._lc.embed_documents(docs) if docs else []
        q = [self._lc.embed_query(t) for t in queries]
        return self._finish(d, len(docs)), self._finish(q, len(queries))

    async def aembed(self, docs: list[str], queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._lc is None:
            return await asyncio.to_thread(self.embed, docs, queries)
        d = await self._lc.aembed_documents(docs) if docs else []
        q = await asyncio.gather(*(self._lc.aembed_query(t) for t in queries))
        return self._finish(d, len(docs)), self._finish(list(q), len(queries))


# ---------------------------------------------------------------------------------- filters
def _pointer(key: Any) -> str:
    """A dotted filter key as a JSON pointer (``meta.kind`` -> ``/meta/kind``), bound as a parameter."""
    if not isinstance(key, str) or not key or any(not seg for seg in key.split(".")):
        raise ValueError(f"Invalid filter key: {key!r}. Use a field name or a dotted path like 'meta.kind'.")
    return "".join("/" + seg.replace("~", "~0").replace("/", "~1") for seg in key.split("."))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, str)


def _check_scalar(v: Any, key: str) -> None:
    if not (v is None or isinstance(v, str) or _is_number(v)):
        raise ValueError(
            f"filter value for {key!r} is a {type(v).__name__}; use a JSON value (str, number, bool, None, list, dict)"
        )


class _Sql:
    """SQL conditions on ``i.value`` for one filter key; booleans compare as 1/0 like SqliteStore's."""

    def __init__(self, ptr: str):
        self.ptr = ptr
        self.t = "json_type(i.value, ?)"
        self.s = "json_extract_string(i.value, ?)"
        self.num = (
            f"(CASE WHEN {self.t} IN {_NUMERIC} THEN TRY_CAST({self.s} AS DOUBLE) "
            f"WHEN {self.t} = 'BOOLEAN' THEN (CASE WHEN {self.s} = 'true' THEN 1.0 ELSE 0.0 END) END)"
        )
        self.num_params = [ptr] * 4

    def eq(self, v: Any) -> tuple[str, list[Any]]:
        if v is None:
            return f"coalesce({self.t}, 'NULL') = 'NULL'", [self.ptr]
        if isinstance(v, str):
            return f"coalesce({self.t} = 'VARCHAR' AND {self.s} = ?, false)", [self.ptr, self.ptr, v]
        return f"coalesce({self.num} = ?, false)", [*self.num_params, float(v)]

    def ne(self, v: Any) -> tuple[str, list[Any]]:
        # A missing or null field never matches $ne (SQL semantics, as SqliteStore; InMemoryStore keeps it).
        present = f"coalesce({self.t}, 'NULL') <> 'NULL'"
        if v is None:
            return present, [self.ptr]
        sql, params = self.eq(v)
        return f"({present} AND NOT {sql})", [self.ptr, *params]

    def cmp(self, sym: str, v: Any) -> tuple[str, list[Any]]:
        if isinstance(v, str):  # strings compare as strings (ISO dates work), as SqliteStore
            return f"coalesce({self.t} = 'VARCHAR' AND {self.s} {sym} ?, false)", [self.ptr, self.ptr, v]
        return f"coalesce({self.num} {sym} ?, false)", [*self.num_params, float(v)]


def _lookup(value: Any, key: str) -> Any:
    cur = value
    for seg in key.split("."):
        if isinstance(cur, dict) and seg in cur:
            cur = cur[seg]
        elif isinstance(cur, list) and seg.isdigit() and int(seg) < len(cur):
            cur = cur[int(seg)]  # JSON pointers index arrays, so the SQL path does too
        else:
            return _MISSING
    return cur


def _num(x: Any) -> float | None:
    return float(x) if _is_number(x) else None


def _eq(x: Any, v: Any) -> bool:
    if v is None:
        return x is _MISSING or x is None
    if isinstance(v, str):
        return isinstance(x, str) and x == v
    if isinstance(v, Mapping):
        return (
            isinstance(x, dict) and set(x) == set(v) and all(_eq(x[k], v[k]) for k in v)
        )  # exact, not a subset: as SqliteStore (and MongoDB)
    if isinstance(v, (list, tuple)):
        return isinstance(x, list) and len(x) == len(v) and all(_eq(a, b) for a, b in zip(x, v))
    n = _num(x)
    return n is not None and n == float(v)


def _operators(fv: Any) -> Iterable[tuple[str, Any]]:
    # As InMemoryStore: any "$" key makes the dict a set of operators, else it is a value to equal.
    if isinstance(fv, Mapping) and any(str(k).startswith("$") for k in fv):
        return fv.items()
    return [("$eq", fv)]


def matches(value: Mapping[str, Any], filter: Mapping[str, Any] | None) -> bool:
    """Whether an item's value passes a LangGraph ``filter`` with EvolveStore's semantics.

    The reference the SQL translation is tested against, and the path for list or dict operands.
    """
    for key, fv in (filter or {}).items():
        _pointer(key)
        x = _lookup(value, key)
        for op, v in _operators(fv):
            if op == "$eq":
                ok = _eq(x, v)
            elif op == "$ne":
                ok = x is not _MISSING and x is not None and not (v is not None and _eq(x, v))
            elif op in _CMP:
                _check_comparable(op, v, key)
                fn = _CMP[op][1]
                if isinstance(v, str):
                    ok = isinstance(x, str) and fn(x, v)
                else:
                    n = _num(x)
                    ok = n is not None and fn(n, float(v))
            else:
                raise ValueError(f"Unsupported operator: {op}. Use $eq, $ne, $gt, $gte, $lt or $lte.")
            if not ok:
                return False
    return True


def _check_comparable(op: str, v: Any, key: str) -> None:
    if not (isinstance(v, str) or _is_number(v)):
        raise ValueError(f"{op} on {key!r} needs a number or a string, got {type(v).__name__}")


def _compile_filter(filter: Mapping[str, Any] | None) -> tuple[list[str], list[Any], dict[str, Any]]:
    """SQL for the scalar conditions of ``filter``; what SQL cannot say exactly comes back as a residual."""
    conds: list[str] = []
    params: list[Any] = []
    residual: dict[str, Any] = {}
    if filter is not None and not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a dict, got {type(filter).__name__}")
    for key, fv in (filter or {}).items():
        sql = _Sql(_pointer(key))
        for op, v in _operators(fv):
            if op in ("$eq", "$ne") and isinstance(v, (Mapping, list, tuple)):
                # Structural equality is exact in Python; SQL would compare JSON text (key order matters).
                residual.setdefault(key, {})[op] = v
                continue
            if op == "$eq":
                _check_scalar(v, key)
                c, p = sql.eq(v)
            elif op == "$ne":
                _check_scalar(v, key)
                c, p = sql.ne(v)
            elif op in _CMP:
                _check_comparable(op, v, key)
                c, p = sql.cmp(_CMP[op][0], v)
            else:
                raise ValueError(f"Unsupported operator: {op}. Use $eq, $ne, $gt, $gte, $lt or $lte.")
            conds.append(c)
            params.extend(p)
    return conds, params, residual


# ---------------------------------------------------------------------------------- batch plan
def _namespace(ns: Any, what: str = "namespace") -> tuple[str, ...]:
    # A bare string would otherwise become a tuple of characters.
    if isinstance(ns, str):
        raise InvalidNamespaceError(
            f"{what} must be a tuple of strings, got the string {ns!r}; write ({ns!r},)"
        )
    try:
        return tuple(ns)
    except TypeError:
        raise InvalidNamespaceError(f"{what} must be a tuple of strings, got {type(ns).__name__}") from None


def _prefix(ns: tuple[str, ...]) -> str:
    return ".".join(ns)


def _ref_id(prefix: str, key: str) -> str:
    return json.dumps([prefix, key], ensure_ascii=False)


def _window(limit: Any, offset: Any) -> tuple[int, int]:
    if not isinstance(limit, int) or not isinstance(offset, int) or limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be integers >= 0, got limit={limit!r}, offset={offset!r}")
    return limit, offset


@dataclass
class _Put:
    ns: tuple[str, ...]
    key: str
    value: str | None  # JSON text; None deletes
    index_spec: str | None
    texts: list[str]


@dataclass
class _Search:
    prefix: str
    conds: list[str]
    params: list[Any]
    residual: dict[str, Any]
    query: str | None
    limit: int
    offset: int


@dataclass
class _Plan:
    n: int
    gets: list[tuple[int, tuple[str, ...], str]] = field(default_factory=list)
    searches: list[tuple[int, _Search]] = field(default_factory=list)
    lists: list[tuple[int, ListNamespacesOp]] = field(default_factory=list)
    puts: dict[tuple[tuple[str, ...], str], _Put] = field(default_factory=dict)

    def docs(self) -> list[str]:
        return list(dict.fromkeys(t for p in self.puts.values() for t in p.texts))

    def queries(self) -> list[str]:
        return list(dict.fromkeys(s.query for _, s in self.searches if s.query))


# ---------------------------------------------------------------------------------- the store
class EvolveStore(BaseStore):
    """A LangGraph ``BaseStore`` whose items persist in an evolve ``ExperienceStore`` (DuckDB + FAISS).

    ``index`` is LangGraph's ``IndexConfig``: ``{"dims": int, "embed": ..., "fields": ["$"]}``. Every
    key is optional; ``embed`` may be an evolve ``Embedder``, a LangChain ``Embeddings``, or a sync or
    async function of a list of texts (default: the store's embedder, MiniLM). Without ``index`` there
    is no semantic search, as in LangGraph.

    Semantics, following ``SqliteStore`` where ``InMemoryStore`` differs:

    - a search prefix may be a list or a tuple and matches whole labels (``("a",)`` not ``("ab",)``);
    - ``filter`` keys are dotted paths into nested values (``{"meta.kind": "x"}``); ``$ne`` and the
      comparisons never match a missing or null field; a list or dict operand must equal exactly;
    - without a query, results are the most recently updated first; with a query (and an index),
      only items with an embedded field, by their best field's cosine similarity (``item.score``);
    - ``list_namespaces`` lists namespaces that hold items (emptied ones vanish), in tuple order;
    - reads in a batch see the state before the batch's writes; writes run in one transaction with
      one embedding call; an overwrite keeps ``created_at`` and replaces all of the item's vectors.

    TTL is not supported (``put(..., ttl=...)`` raises, as BaseStore does for such stores).
    """

    supports_ttl = False

    def __init__(
        self,
        store: ExperienceStore | None = None,
        *,
        path: str | Path | None = None,
        index: IndexConfig | None = None,
        exact_search_limit: int = EXACT_FILTER_LIMIT,
        close_store: bool = True,
        reranker: Reranker | None = None,
    ) -> None:
        if store is not None and path is not None:
            raise ValueError("give either an ExperienceStore or a path, not both")
        self._owned = store is None or close_store
        self.store = store if store is not None else ExperienceStore(path if path is not None else ":memory:")
        self.index_config = dict(index) if index is not None else None
        self._embedding: _Embedding | None = None
        self._fields: list[tuple[str, list[str] | str]] = []
        if self.index_config is not None:
            self._embedding = _Embedding(
                self.index_config.get("embed"), self.index_config.get("dims"), lambda: self.store.embedder
            )
            # "text_fields" is SqliteStore's spelling of the same setting.
            paths = self.index_config.get("fields") or self.index_config.get("text_fields") or ["$"]
            self._fields = [_tokens(p) for p in ([paths] if isinstance(paths, str) else paths)]
        # Below this many candidate vectors a query search scores them exactly from DuckDB, so the
        # FAISS index (rebuilt after any overwrite or delete) is only touched for large scopes.
        self.exact_search_limit = exact_search_limit
        self.reranker = reranker
        """Optional: a query search's best ``4 x (offset + limit)`` items are reranked by it (their
        JSON values as texts); each item's ``score`` is then the reranker's."""
        self._model_checked = False
        # The next items.seq and the store generation it is valid for (see ``_next_seq``).
        self._seq: tuple[int, int] | None = None
        self._init_table()

    def _init_table(self) -> None:
        if self.store.meta.get(_META_KEY) == "1":  # the common case: known from the open's meta read
            return
        try:  # a table made before evolve_meta recorded it: one probe, recorded when writable
            self.store.conn.execute(f"SELECT 1 FROM {TABLE} LIMIT 0").fetchall()
            if not self.store.read_only:
                self.store.set_meta(_META_KEY, "1")
            return
        except duckdb.CatalogException:
            pass
        if self.store.read_only:
            raise StoreError(
                f"store '{self.store.path}' has no LangGraph items (table {TABLE}); open it writable once"
            )
        with self.store.transaction():
            self.store.conn.execute(_DDL)
            self.store.set_meta(_META_KEY, "1")

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the ExperienceStore (also one it was handed: ``EvolveStore(store)`` then owns it,
        as in ``graph.compile(store=EvolveStore(store))``), unless built with ``close_store=False``."""
        if self._owned:
            self.store.close()

    def __enter__(self) -> EvolveStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the two abstract methods
    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops``: reads first (on the state before the batch), then all writes in one transaction."""
        plan = self._plan(ops)
        docs, queries = plan.docs(), plan.queries()
        dv = qv = None
        if docs or queries:
            assert self._embedding is not None
            self._check_model()
            dv, qv = self._embedding.embed(docs, queries)
        return self._execute(plan, docs, dv, queries, qv)

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """``batch`` for asyncio: embeds with the async API, runs DuckDB work in a worker thread."""
        plan = self._plan(ops)
        docs, queries = plan.docs(), plan.queries()
        dv = qv = None
        if docs or queries:
            assert self._embedding is not None
            if not self._model_checked:
                await asyncio.to_thread(self._check_model)
            dv, qv = await self._embedding.aembed(docs, queries)
        return await asyncio.to_thread(self._execute, plan, docs, dv, queries, qv)

    # ------------------------------------------------------------------ planning (no database)
    def _plan(self, ops: Iterable[Op]) -> _Plan:
        ops = list(ops)
        plan = _Plan(len(ops))
        for i, op in enumerate(ops):
            if isinstance(op, GetOp):
                ns = _namespace(op.namespace)
                validate_op_namespace(op)
                plan.gets.append((i, ns, str(op.key)))
            elif isinstance(op, SearchOp):
                prefix = _namespace(op.namespace_prefix, "namespace_prefix")
                validate_op_namespace(op)
                conds, params, residual = _compile_filter(op.filter)
                limit, offset = _window(op.limit, op.offset)
                query = op.query if op.query and self._embedding is not None else None
                plan.searches.append(
                    (i, _Search(_prefix(prefix), conds, params, residual, query, limit, offset))
                )
            elif isinstance(op, ListNamespacesOp):
                conds = tuple(
                    MatchCondition(c.match_type, _namespace(c.path, "match path"))
                    for c in op.match_conditions or ()
                )
                for c in conds:
                    if c.match_type not in ("prefix", "suffix"):
                        raise ValueError(f"unsupported match type {c.match_type!r}; use 'prefix' or 'suffix'")
                if op.max_depth is not None and (not isinstance(op.max_depth, int) or op.max_depth < 0):
                    raise ValueError(f"max_depth must be an integer >= 0, got {op.max_depth!r}")
                validate_op_namespace(op)
                _window(op.limit, op.offset)
                plan.lists.append((i, op._replace(match_conditions=conds)))
            elif isinstance(op, PutOp):
                ns = _namespace(op.namespace)
                validate_op_namespace(op)
                key = str(op.key)
                # Last write wins, as in LangGraph's stores, and its position sets the recency order.
                plan.puts.pop((ns, key), None)
                plan.puts[(ns, key)] = self._plan_put(ns, key, op)
            else:
                raise ValueError(f"unknown operation type {type(op).__name__}")
        if plan.puts and self.store.read_only:  # refuse before any embedding work
            raise StoreError(f"store '{self.store.path}' is open read-only; open it writable to change it")
        return plan

    def _plan_put(self, ns: tuple[str, ...], key: str, op: PutOp) -> _Put:
        if op.value is None:
            return _Put(ns, key, None, None, [])
        if not ns:
            raise InvalidNamespaceError("Namespace cannot be empty.")
        # A "langgraph" root label is refused by BaseStore.put/aput only; LangGraph's own stores
        # accept it through batch (LangGraph writes there itself), and so does this one.
        if not isinstance(op.value, Mapping):
            raise ValueError(f"value of {ns}/{key!r} must be a dict, got {type(op.value).__name__}")
        value = dict(op.value)
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"value of {ns}/{key!r} is not JSON-serialisable ({e}); nothing was written"
            ) from None
        index = [op.index] if isinstance(op.index, str) else op.index
        spec = None if index is None else json.dumps(False if index is False else list(index))
        return _Put(ns, key, text, spec, self._texts(value, index))

    def _texts(self, value: dict[str, Any], index: Any) -> list[str]:
        if self._embedding is None or index is False:
            return []
        paths = self._fields if index is None else [_tokens(p) for p in index]
        texts = [t for _, toks in paths for t in get_text_at_path(value, toks)]
        return list(dict.fromkeys(texts))  # the same text twice in one item adds nothing to max-pooling

    # ------------------------------------------------------------------ execution (database)
    @contextmanager
    def _session(self, writes: bool = True) -> Iterator[None]:
        # One transaction gives the batch's reads one snapshot and makes its writes atomic. A
        # read-only store cannot begin one, so its batches only take the store's lock; so do
        # batches that only read (under the lock no other thread writes between their statements,
        # and DuckDB admits no other writing process), which saves a BEGIN/COMMIT per get or search.
        if self.store.read_only or not writes:
            with self.store.locked():
                yield
        else:
            with self.store.transaction():
                yield

    def _execute(
        self,
        plan: _Plan,
        docs: list[str],
        dv: np.ndarray | None,
        queries: list[str],
        qv: np.ndarray | None,
    ) -> list[Result]:
        results: list[Result] = [None] * plan.n
        qvec = dict(zip(queries, qv)) if qv is not None else {}
        next_seq = gen = None
        with self._session(writes=bool(plan.puts)):
            self._run_gets(plan.gets, results)
            for i, s in plan.searches:
                results[i] = self._search(s, qvec.get(s.query) if s.query else None)
            for i, op in plan.lists:
                results[i] = self._list_namespaces(op)
            if plan.puts:
                next_seq = self._write(
                    list(plan.puts.values()), dict(zip(docs, dv)) if dv is not None else {}
                )
                gen = self.store.generation()
        if next_seq is not None and gen is not None:
            # Committed: the counter holds while the file's generation is the one this commit
            # made; a commit of any other store on the file (before or after ours) moves it on.
            self._seq = (gen + 1, next_seq)
        return results

    def _next_seq(self) -> int | None:
        """The first free ``seq`` when known without a query: from this store's last commit, if
        nothing else committed on the file since."""
        if self._seq is not None and self._seq[0] == self.store.generation():
            return self._seq[1]
        return None

    def _rows(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        return self.store.conn.execute(sql, params).fetchall()

    def _run_gets(self, gets: list[tuple[int, tuple[str, ...], str]], results: list[Result]) -> None:
        if not gets:
            return
        if len(gets) == 1:  # the common case: a point lookup on the primary key
            _, ns, key = gets[0]
            rows = self._rows(
                f"SELECT {_COLS} FROM {TABLE} i WHERE i.prefix = ? AND i.key = ?", [_prefix(ns), key]
            )
        else:
            rows = self._rows(
                f"""SELECT {_COLS} FROM {TABLE} i JOIN
                    (SELECT unnest(?::VARCHAR[]) AS p, unnest(?::VARCHAR[]) AS k) g ON i.prefix = g.p AND i.key = g.k""",
                [[_prefix(ns) for _, ns, _ in gets], [k for _, _, k in gets]],
            )
        found = {(tuple(r[0]), r[1]): _item(r) for r in rows}
        for i, ns, key in gets:
            results[i] = found.get((ns, key))

    def _scope(self, s: _Search) -> tuple[str, list[Any]]:
        where, params = [], []
        if s.prefix:
            where.append("(i.prefix = ? OR starts_with(i.prefix, ?))")
            params += [s.prefix, s.prefix + "."]
        where += s.conds
        params += s.params
        return (" AND ".join(where) or "TRUE"), params

    def _search(self, s: _Search, qvec: np.ndarray | None) -> list[SearchItem]:
        where, params = self._scope(s)
        if qvec is None:
            page = "" if s.residual else " LIMIT ? OFFSET ?"
            rows = self._rows(
                f"SELECT {_COLS} FROM {TABLE} i WHERE {where} ORDER BY i.updated_at DESC, i.seq DESC{page}",
                params + ([] if s.residual else [s.limit, s.offset]),
            )
            if s.residual:
                rows = [r for r in rows if matches(json.loads(r[2]), s.residual)][
                    s.offset : s.offset + s.limit
                ]
            return [_item(r, cls=SearchItem) for r in rows]
        rr = self.reranker if s.query else None
        deep = replace(s, offset=0, limit=4 * (s.offset + s.limit)) if rr is not None else s
        ranked = self._rank(deep, where, params, qvec)
        if not ranked:
            return []
        rows = self._rows(
            f"SELECT i.ref_id, {_COLS} FROM {TABLE} i WHERE list_contains(?::VARCHAR[], i.ref_id)",
            [[r for r, _ in ranked]],
        )
        by_ref = {r[0]: r[1:] for r in rows}
        hits = [(by_ref[r], sc) for r, sc in ranked if r in by_ref]
        if rr is not None and hits:
            rs = rerank(rr, s.query or "", [str(row[2]) for row, _ in hits])  # the items' JSON values
            order = rerank_order(rs)[s.offset : s.offset + s.limit]
            hits = [(hits[j][0], float(rs[j])) for j in order]
        return [_item(row, cls=SearchItem, score=sc) for row, sc in hits]

    def _rank(self, s: _Search, where: str, params: list[Any], qvec: np.ndarray) -> list[tuple[str, float]]:
        """The page of ``(ref_id, score)``: items ranked by their best-matching field (max-pooling)."""
        want = s.offset + s.limit
        if want == 0:
            return []
        conn = self.store.conn
        simple = not s.conds and not s.residual
        scope, scope_params = "", []
        if simple:
            # Scoped by prefix alone: vectors.namespace is "lg:" + the item's prefix, so no join
            # with the items is needed (a join costs DuckDB several ms even on a few rows).
            if s.prefix:
                scope = " AND (namespace = ? OR starts_with(namespace, ?))"
                scope_params = [f"lg:{s.prefix}", f"lg:{s.prefix}."]
            if self.exact_search_limit >= _FEW:
                # Few vectors in scope (the common case): candidates and exact scores in one query.
                few = conn.execute(
                    f"SELECT vid, ref_id, list_inner_product(vec, ?::FLOAT[]) FROM vectors "
                    f"WHERE kind = ?{scope} LIMIT {_FEW + 1}",
                    [qvec.tolist(), KIND, *scope_params],
                ).fetchall()
                if len(few) <= _FEW:
                    return _best([(int(r[0]), r[1], float(r[2])) for r in few], s.offset, want)
            cand = conn.execute(
                f"SELECT vid, ref_id FROM vectors WHERE kind = ?{scope}", [KIND, *scope_params]
            ).fetchall()
        else:
            value_col = ", i.value" if s.residual else ""
            cand = conn.execute(
                f"""SELECT v.vid, v.ref_id{value_col} FROM vectors v JOIN {TABLE} i ON i.ref_id = v.ref_id
                    WHERE v.kind = ? AND {where}""",
                [KIND, *params],
            ).fetchall()
        if s.residual:
            cand = [c for c in cand if matches(json.loads(c[2]), s.residual)]
        if not cand:
            return []
        ref_of = {int(c[0]): c[1] for c in cand}
        vids = np.fromiter(ref_of, dtype=np.int64, count=len(ref_of))
        if len(vids) <= self.exact_search_limit:
            # Exact scores computed by DuckDB: fetching the vectors into Python costs far more.
            if simple:
                sql, sp = f"kind = ?{scope}", [KIND, *scope_params]
            else:
                sql, sp = "kind = ? AND vid IN (SELECT unnest(?::BIGINT[]))", [KIND, vids.tolist()]
            scored = [
                r
                for r in conn.execute(
                    f"SELECT vid, list_inner_product(vec, ?::FLOAT[]) FROM vectors WHERE {sql}",
                    [qvec.tolist(), *sp],
                ).fetchall()
                if r[0] in ref_of
            ]
            got = np.array([r[0] for r in scored], dtype=np.int64)
            scores = np.array([r[1] for r in scored], dtype=np.float32)
            order = np.argsort(-scores, kind="stable")
            hits = [(int(got[j]), float(scores[j])) for j in order]
        else:
            idx = self.store.vector_index(KIND)
            # Unscoped searches need no id filter; FAISS then searches the whole kind.
            allowed = None if len(vids) == idx.count else vids
            k = min(len(vids), max(4 * want, 64))
            while True:
                hits = idx.search(qvec, k, allowed=allowed)
                if len({ref_of.get(v) for v, _ in hits}) >= want or k >= len(vids):
                    break
                k = min(len(vids), k * 4)
        best: dict[str, float] = {}
        for vid, score in hits:
            ref = ref_of.get(vid)
            if ref is not None and ref not in best:
                best[ref] = score
        return list(best.items())[s.offset : want]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        where, params = [], []
        for c in op.match_conditions or ():
            path = c.path
            if not path:
                continue  # an empty path constrains nothing (both LangGraph stores agree)
            where.append("len(i.namespace) >= ?")
            params.append(len(path))
            for j, label in enumerate(path):
                if label == "*":
                    continue
                pos = j + 1 if c.match_type == "prefix" else j - len(path)  # DuckDB lists: 1-based, -1 = last
                where.append(f"i.namespace[{pos}] = ?")
                params.append(label)
        ns = "i.namespace" if op.max_depth is None else f"list_slice(i.namespace, 1, {int(op.max_depth)})"
        rows = self._rows(
            f"""SELECT DISTINCT {ns} AS ns FROM {TABLE} i WHERE {" AND ".join(where) or "TRUE"}
                ORDER BY ns LIMIT ? OFFSET ?""",
            [*params, op.limit, op.offset],
        )
        return [tuple(r[0]) for r in rows]

    def _write(self, puts: list[_Put], vec_of: dict[str, np.ndarray]) -> int | None:
        """Write the puts (inside the batch's transaction); returns the next free ``seq`` (None
        when only deletes)."""
        conn = self.store.conn
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        dels = [p for p in puts if p.value is None]
        ups = [p for p in puts if p.value is not None]
        # Every written item loses its old vectors, so a changed value is never found by stale text.
        # add_vectors replaces the vectors of the refs it writes; the others are dropped here.
        bare = [_ref_id(_prefix(p.ns), p.key) for p in puts if not p.texts]
        if bare:
            self.store.delete_vectors(KIND, bare)
        if dels:
            conn.execute(
                f"DELETE FROM {TABLE} WHERE ref_id IN (SELECT unnest(?::VARCHAR[]))",
                [[_ref_id(_prefix(p.ns), p.key) for p in dels]],
            )
        # New items have no vectors to replace (an item's vectors go with it): known for a few puts.
        replace, last = True, None
        if ups and len(ups) <= _SMALL_BATCH:
            replace, last = self._write_small(ups, self._next_seq(), now)
        elif ups:
            first = self._next_seq()
            if first is None:
                first = int(self._rows(f"SELECT coalesce(max(seq), 0) + 1 FROM {TABLE}", [])[0][0])
            self._write_bulk(ups, first - 1, now)
            last = first - 1 + len(ups)
        rows = [(_ref_id(_prefix(p.ns), p.key), "lg:" + _prefix(p.ns), t) for p in ups for t in p.texts]
        if rows:
            assert self._embedding is not None
            vecs = np.stack([vec_of[t] for _, _, t in rows])
            self.store.add_vectors(KIND, rows, vecs, model=self._embedding.name, replace=replace)
        return None if last is None else last + 1

    def _write_small(self, ups: list[_Put], first: int | None, now: datetime) -> tuple[bool, int]:
        """A few puts: UPDATE, else INSERT, each with parameters (DuckDB's ON CONFLICT costs
        several ms per statement, more than the whole rest of a one-item put). ``first`` is the
        first free ``seq``; None: each statement takes max(seq) + 1 itself (no query of its own).
        Returns whether any of them existed (whose vectors must then be replaced), and the last seq."""
        conn = self.store.conn
        existed = False
        seq = f"(SELECT coalesce(max(seq), 0) + 1 FROM {TABLE})" if first is None else "?"
        last = 0
        for j, p in enumerate(ups):
            prefix = _prefix(p.ns)
            given = [] if first is None else [first + j]
            found = conn.execute(
                f"""UPDATE {TABLE} SET value = ?::JSON, index_spec = ?::JSON, updated_at = ?, seq = {seq}
                    WHERE prefix = ? AND key = ? RETURNING seq""",
                [p.value, p.index_spec, now, *given, prefix, p.key],
            ).fetchall()
            if not found:
                found = conn.execute(
                    f"""INSERT INTO {TABLE} SELECT ?, ?, ?, ?, ?::JSON, ?::JSON, ?, ?, {seq} RETURNING seq""",
                    [
                        prefix,
                        list(p.ns),
                        p.key,
                        _ref_id(prefix, p.key),
                        p.value,
                        p.index_spec,
                        now,
                        now,
                        *given,
                    ],
                ).fetchall()
            else:
                existed = True
            last = int(found[0][0])
        return existed, last

    def _write_bulk(self, ups: list[_Put], seq0: int, now: datetime) -> None:
        conn = self.store.conn
        tbl = pa.table(
            {
                "prefix": pa.array([_prefix(p.ns) for p in ups], pa.string()),
                "namespace": pa.array([list(p.ns) for p in ups], pa.list_(pa.string())),
                "key": pa.array([p.key for p in ups], pa.string()),
                "ref_id": pa.array([_ref_id(_prefix(p.ns), p.key) for p in ups], pa.string()),
                "value": pa.array([p.value for p in ups], pa.string()),
                "index_spec": pa.array([p.index_spec for p in ups], pa.string()),
                "ts": pa.array([now] * len(ups), pa.timestamp("us")),
                "seq": pa.array(range(seq0 + 1, seq0 + 1 + len(ups)), pa.int64()),
            }
        )
        conn.register("_lg_put", tbl)
        try:
            conn.execute(
                f"""INSERT INTO {TABLE}
                    SELECT prefix, namespace, key, ref_id, value::JSON, index_spec::JSON, ts, ts, seq FROM _lg_put
                    ON CONFLICT (prefix, key) DO UPDATE SET value = excluded.value,
                        index_spec = excluded.index_spec, updated_at = excluded.updated_at, seq = excluded.seq"""
            )
        finally:
            conn.unregister("_lg_put")

    # ------------------------------------------------------------------ embedder changes
    def _check_model(self) -> None:
        """Re-embed everything once if the stored vectors came from another embedder."""
        if self._model_checked or self._embedding is None:
            return
        with self._session(writes=False):
            models = {r[0] for r in self._rows("SELECT DISTINCT model FROM vectors WHERE kind = ?", [KIND])}
        if models - {self._embedding.name}:
            self.reindex()
        self._model_checked = True

    def reindex(self, batch_size: int = 512) -> int:
        """Re-embed every item with the current index config (e.g. after changing the embedder).

        Each item keeps its own ``index`` choice from its put. Returns how many items were embedded.
        """
        if self._embedding is None:
            raise ValueError("this EvolveStore has no index config; nothing to embed")
        name = self._embedding.name
        with self._session():
            items = self._rows(f"SELECT ref_id, prefix, value, index_spec FROM {TABLE} ORDER BY seq", [])
        n = 0
        for start in range(0, len(items), batch_size):
            rows = []
            for ref, prefix, value, spec in items[start : start + batch_size]:
                index = None if spec is None else json.loads(spec)
                rows += [(ref, "lg:" + prefix, t) for t in self._texts(json.loads(value), index)]
            if not rows:
                continue
            uniq = list(dict.fromkeys(t for _, _, t in rows))
            dv, _ = self._embedding.embed(uniq, [])
            vec_of = dict(zip(uniq, dv))
            with self._session():
                self.store.add_vectors(KIND, rows, np.stack([vec_of[t] for _, _, t in rows]), model=name)
            n += len({r[0] for r in rows})
        with self._session():
            # Items without text now (index=False, fields gone) drop their old-model vectors here.
            self.store.delete_vectors(KIND, other_than_model=name)
        self._model_checked = True
        return n


def _best(scored: list[tuple[int, str, float]], offset: int, want: int) -> list[tuple[str, float]]:
    """``(ref_id, score)`` of the items of ``(vid, ref_id, score)`` rows, best field first (max-pooling),
    ties in row order."""
    scores = np.array([r[2] for r in scored], dtype=np.float32)
    best: dict[str, float] = {}
    for j in np.argsort(-scores, kind="stable"):
        ref = scored[j][1]
        if ref not in best:
            best[ref] = float(scores[j])
    return list(best.items())[offset:want]


def _tokens(path: str) -> tuple[str, list[str] | str]:
    # "$" is the whole value; LangGraph's stores only honour it in the config, not in a put's index.
    return (path, "$") if path == "$" else (path, tokenize_path(path))


def _item(row: tuple[Any, ...], cls: type[Item] = Item, score: float | None = None) -> Any:
    ns, key, value, created, updated = row
    kw = {
        "namespace": tuple(ns),
        "key": key,
        "value": json.loads(value),
        "created_at": created.replace(tzinfo=timezone.utc),
        "updated_at": updated.replace(tzinfo=timezone.utc),
    }
    if cls is SearchItem:
        return SearchItem(**kw, score=None if score is None or math.isnan(score) else float(score))
    return Item(**kw)


__all__ = ["EvolveStore", "KIND", "TABLE", "matches"]
