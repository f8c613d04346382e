"""ExperienceStore: one DuckDB file is the truth; FAISS + BM25 indexes beside it are derived.

Layout on disk::

    run/store.duckdb            trajectories, steps, diagnoses, skills, guardrails, examples,
                                teacher log-probs, retrieval logs, runs, checkpoints, vectors (the embeddings,
                                so indexes rebuild without re-embedding)
    run/store.duckdb.index/     <kind>.index (the pool), <kind>.<hash>.part (one per large namespace),
                                <kind>.pool.npy, <kind>.json  (FAISS, rebuilt when missing or stale)

The class is a façade: it owns the connection, migrations, transactions and namespaces, and
hands each table family to a part (``trajectories.py``, ``knowledge.py``, ``examples.py``,
``retrieval_logs.py``, ``runs.py``, ``checkpoints.py``, ``search.py``); every table is declared once in ``tables.py``.

Ingestion is batched: a list of trajectories becomes three Arrow tables appended in one
transaction (the step JSON goes from pydantic's serializer into one Arrow buffer in one copy).
Embedding is lazy: rows are embedded (one batched call per kind) the first time a search needs
them, so ingest never waits on a model and never calls an LLM.

The stores of a process share one DuckDB instance, each attaching its file (see ``_attach``):
opening a store costs what an ATTACH costs (~0.3 ms), not a DuckDB start (~15 ms).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
import numpy as np
from pydantic import BaseModel, ValidationError

from evolve.errors import StoreError
from evolve.schema import (
    Checkpoint,
    CheckpointStatus,
    Guardrail,
    KnowledgeStatus,
    RetrievalLog,
    SearchHit,
    Skill,
    TeacherLogprobs,
    TrainingExample,
    Trajectory,
    utcnow,
)
from evolve.stores import tables as T
from evolve.stores.checkpoints import Checkpoints
from evolve.stores.embedders import Embedder, default_embedder
from evolve.stores.examples import Examples
from evolve.stores.hybrid import RRF_K, Reranker
from evolve.stores.knowledge import KnowledgeTables
from evolve.stores.retrieval_logs import RetrievalLogs
from evolve.stores.runs import Runs
from evolve.stores.search import SOURCES, VectorSearch
from evolve.stores.tables import STORE_SCHEMA_VERSION
from evolve.stores.trajectories import Trajectories
from evolve.stores.vector_index import HNSW_THRESHOLD, PARTITION_MIN, VectorIndex

APP_ID = "evolve-experience-store"
_LOCK_PID = re.compile(r"\(PID (\d+)\)")
DEFAULT_NAMESPACE = "default"
# Commits per database file in this process; a store's caches are valid for one generation.
_GENERATIONS: dict[str, int] = {}
M = TypeVar("M", bound=BaseModel)
_SINGULAR = {
    "trajectories": "trajectory",
    "skills": "skill",
    "guardrails": "guardrail",
    "examples": "example",
}
_Status = str | KnowledgeStatus | Iterable[str | KnowledgeStatus] | None


class ExperienceStore:
    """Experiences, knowledge and training examples of one or many namespaces (tenants)."""

    def __init__(
        self,
        path: str | Path = ":memory:",
        namespace: str = DEFAULT_NAMESPACE,
        embedder: Embedder | None = None,
        read_only: bool = False,
        hnsw_threshold: int = HNSW_THRESHOLD,
        reranker: Reranker | None = None,
        lock_timeout_s: float = 0.0,
        partition_min: int = PARTITION_MIN,
    ):
        self.path = str(path)
        self.lock_timeout_s = lock_timeout_s
        """How long to wait for another process that has the file open (DuckDB admits one writer)."""
        self.namespace = namespace
        self._embedder = embedder
        self.read_only = read_only
        self.hnsw_threshold = hnsw_threshold
        self.partition_min = partition_min
        """Vectors from which a namespace gets a FAISS index of its own (see ``vector_index``)."""
        self.reranker = reranker
        """Reorders :meth:`search` results when set (a search may also pass its own)."""
        self._lock = threading.RLock()
        self._txn_depth = 0
        self.schema_version = STORE_SCHEMA_VERSION
        """The schema of the open file (older than the current one only when opened read-only)."""
        # What the in-memory caches were checked against: the file's commit generation.
        self._gen_key = str(Path(self.path).resolve()) if self.path != ":memory:" else f":memory:{id(self)}"
        self._ns_cache: tuple[int, set[str]] | None = None
        self._traj = Trajectories(self)
        self._know = KnowledgeTables(self)
        self._examples = Examples(self)
        self._logs = RetrievalLogs(self)
        self._runs = Runs(self)
        self._checkpoints = Checkpoints(self)
        self._vectors = VectorSearch(self)
        self.conn = self._connect()
        try:
            self._init_schema()
        except BaseException:
            # A refused file must not stay locked by this process.
            self._release()
            raise

    # ------------------------------------------------------------------ lifecycle
    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self.path != ":memory:":
            p = Path(self.path)
            if p.is_dir():
                raise StoreError(
                    f"store path '{p}' is a directory; give a file path such as {p}/store.duckdb"
                )
            if self.read_only and not p.exists():
                raise StoreError(f"store '{p}' does not exist; run a collect stage first or check the path")
            p.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + max(0.0, self.lock_timeout_s)
        while True:
            try:
                conn, self._attachment = _attach(self.path, self.read_only)
                # Detached when this store is closed or, if it never is, collected (a DuckDB
                # connection closed its instance then too).
                self._release = weakref.finalize(self, _detach, self._attachment, conn, os.getpid())
                return conn
            except duckdb.IOException as e:
                msg = str(e).splitlines()[0]
                if "lock" not in msg.lower():
                    raise StoreError(
                        f"'{self.path}' is not a readable DuckDB file ({msg}); "
                        "point to an evolve store or a new path"
                    ) from None
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                pid = _LOCK_PID.search(msg)
                who = f"pid {pid.group(1)}" if pid else "another process"
                waited = f" (waited {self.lock_timeout_s:g} s)" if self.lock_timeout_s > 0 else ""
                raise StoreError(
                    f"store '{self.path}' is in use by {who}{waited}; let it finish, wait longer "
                    "(lock_timeout_s), or use another store path"
                ) from None
            except duckdb.Error as e:
                raise StoreError(
                    f"'{self.path}' could not be opened as a DuckDB database ({str(e).splitlines()[0]}); "
                    "point to an evolve store or a new path"
                ) from None

    def _read_meta(self) -> dict[str, str] | None:
        """``evolve_meta`` as a dict; None when the file has no such table (new, or not ours)."""
        try:
            return dict(self.conn.execute("SELECT key, value FROM evolve_meta").fetchall())
        except duckdb.CatalogException:
            return None
        except duckdb.Error as e:  # a table of that name with other columns: not ours
            raise StoreError(
                f"'{self.path}' has an evolve_meta table of another application ({str(e).splitlines()[0]}); "
                "use a new path"
            ) from None

    def _init_schema(self) -> None:
        meta = self._read_meta()
        self.meta = dict(meta or {})
        """``evolve_meta`` as read at open (layers on the store, such as the LangGraph adapter,
        record there what they created, so that opening needs no catalog probe)."""
        if meta is None:
            tables = {
                r[0]
                for r in self.conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database()"
                ).fetchall()
            }
            if tables:
                raise StoreError(
                    f"'{self.path}' is a DuckDB database but not an evolve store (tables: "
                    f"{', '.join(sorted(tables)[:5])}); use a new path so nothing of it is touched"
                )
        else:
            if meta.get("app") != APP_ID:
                raise StoreError(
                    f"'{self.path}' has an evolve_meta table of another application; use a new path"
                )
            version = int(meta.get("schema_version", "0"))
            if version > STORE_SCHEMA_VERSION:
                raise StoreError(
                    f"store '{self.path}' was written by a newer evolve (schema {version} > "
                    f"{STORE_SCHEMA_VERSION}); upgrade evolve-agents"
                )
            # The same version and table specs as this code: nothing to check (the fast path).
            current = version == STORE_SCHEMA_VERSION and meta.get("schema_hash") == T.SCHEMA_HASH
            if not self.read_only and not current:
                self._migrate(version)
                version = STORE_SCHEMA_VERSION
            # A read-only store stays as it is; the parts read what an older schema lacks as empty.
            self.schema_version = version
            return
        if self.read_only:
            raise StoreError(f"'{self.path}' is empty, not an evolve store; run a collect stage first")
        with self.transaction():
            T.create_all(self.conn)
            self.conn.executemany(
                "INSERT INTO evolve_meta VALUES (?, ?)",
                [
                    ("app", APP_ID),
                    ("schema_version", str(STORE_SCHEMA_VERSION)),
                    ("schema_hash", T.SCHEMA_HASH),
                ],
            )
            self._ensure_namespace(DEFAULT_NAMESPACE)
        self.schema_version = STORE_SCHEMA_VERSION
        self.meta = self._read_meta() or {}

    def _migrate(self, version: int) -> None:
        """Upgrade a store of an older schema in place, in one transaction.

        1 -> 2: retrieval_log gains query, rank, similarity, rerank_score (added at the end of the
        table, where ``tables.RETRIEVAL_LOG`` declares them); the teacher_logprobs table is created.
        2 -> 3: the checkpoints table is created.
        Missing tables and columns are derived from the table specs, so a later version that only
        adds columns needs no code here.
        """
        with self.transaction():
            T.migrate(self.conn)
            self.conn.executemany(
                "INSERT OR REPLACE INTO evolve_meta VALUES (?, ?)",
                [("schema_version", str(STORE_SCHEMA_VERSION)), ("schema_hash", T.SCHEMA_HASH)],
            )

    def set_meta(self, key: str, value: str) -> None:
        """Record ``key = value`` in ``evolve_meta`` (inside the caller's transaction, if any)."""
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO evolve_meta VALUES (?, ?)", [key, value])
        self.meta[key] = value

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                self._release()  # DETACH checkpoints the file and releases its lock
                self.conn = None  # type: ignore[assignment]

    def __enter__(self) -> ExperienceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> _Txn:
        """BEGIN/COMMIT around a block (ROLLBACK on error); nested uses join the outer one."""
        return _Txn(self)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (no other thread uses the connection) without a transaction:
        what a read-only store's readers use, since a read-only file cannot begin one."""
        with self._lock:
            yield

    def generation(self) -> int:
        """Commits on this file in this process: in-memory caches are valid for one generation."""
        return _GENERATIONS.get(self._gen_key, 0)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    @property
    def index_dir(self) -> Path | None:
        return None if self.path == ":memory:" else Path(self.path + ".index")

    # ------------------------------------------------------------------ namespaces
    def _ns(self, namespace: str | None) -> str:
        return namespace or self.namespace

    def _own(self, item: M) -> tuple[M, str]:
        """An item to write and its namespace: one that names none goes to the store's namespace."""
        if "namespace" in item.model_fields_set or item.namespace != DEFAULT_NAMESPACE:  # type: ignore[attr-defined]
            return item, item.namespace  # type: ignore[attr-defined]
        if self.namespace == DEFAULT_NAMESPACE:
            return item, DEFAULT_NAMESPACE
        return item.model_copy(update={"namespace": self.namespace}), self.namespace

    def _ensure_namespace(self, ns: str) -> None:
        self.conn.execute("INSERT INTO namespaces VALUES (?, ?) ON CONFLICT DO NOTHING", [ns, utcnow()])

    def list_namespaces(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT namespace FROM namespaces ORDER BY 1").fetchall()]

    def _known_namespaces(self) -> set[str]:
        gen = self.generation()
        if self._ns_cache is None or self._ns_cache[0] != gen:
            self._ns_cache = (gen, set(self.list_namespaces()))
        return self._ns_cache[1]

    def _check_namespace(self, ns: str) -> None:
        if ns not in self._known_namespaces():
            known = ", ".join(self.list_namespaces()) or "none"
            raise StoreError(
                f"unknown namespace '{ns}' (known: {known}); check the name or write to it first"
            )

    def delete_namespace(self, namespace: str) -> None:
        """Delete a namespace and everything in it (experience, knowledge, examples, vectors)."""
        self._check_namespace(namespace)
        with self.transaction():
            for table in T.NAMESPACED:
                self.conn.execute(f"DELETE FROM {table} WHERE namespace = ?", [namespace])
            self.conn.execute("DELETE FROM run_stages WHERE run_id NOT IN (SELECT id FROM runs)")
        self._vectors.invalidate()

    # ------------------------------------------------------------------ trajectories
    def add_trajectories(self, trajectories: Sequence[Trajectory]) -> int:
        """Append (or replace, by id) trajectories with their steps in one transaction."""
        return self._traj.add(trajectories)

    def get_trajectory(self, trajectory_id: str, namespace: str | None = None) -> Trajectory:
        return self._traj.get(trajectory_id, self._ns(namespace))

    def trajectories(
        self,
        namespace: str | None = None,
        *,
        env: str | None = None,
        split: str | None = None,
        outcome: str | Iterable[str] | None = None,
        run_id: str | None = None,
        arm: str | None = None,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[Trajectory]:
        where, params = self._traj.where(self._ns(namespace), env, split, outcome, run_id, arm, ids)
        return self._traj.select(where, params, limit)

    def count_trajectories(self, namespace: str | None = None, **filters: Any) -> int:
        keys = ("env", "split", "outcome", "run_id", "arm", "ids")
        where, params = self._traj.where(self._ns(namespace), *(filters.get(k) for k in keys))
        return self._traj.count(where, params)

    def done_episodes(
        self,
        namespace: str | None = None,
        *,
        run_id: str | None = None,
        arm: str | None = None,
        env: str | None = None,
        include_errors: bool = False,
    ) -> set[tuple[str, int | None]]:
        """``(task_id, seed)`` of the stored episodes (what a resumed run skips); those that ended
        in ``error`` are left out, so a resume retries them, unless ``include_errors``."""
        where, params = self._traj.where(self._ns(namespace), env=env, run_id=run_id, arm=arm)
        return self._traj.done_episodes(where, params, include_errors)

    def delete_trajectory(self, trajectory_id: str, namespace: str | None = None) -> dict[str, int]:
        """Delete a trajectory and, through provenance, everything distilled from it; checkpoints
        trained on it are kept but marked ``stale`` (``counts["checkpoints_stale"]``)."""
        counts = self._traj.delete(trajectory_id, self._ns(namespace))
        self._vectors.invalidate()
        return counts

    # ------------------------------------------------------------------ knowledge
    def upsert_skills(self, skills: Sequence[Skill]) -> None:
        self._know.upsert(skills)

    def upsert_guardrails(self, guardrails: Sequence[Guardrail]) -> None:
        self._know.upsert(guardrails)

    def skills(
        self, namespace: str | None = None, *, status: _Status = None, env: str | None = None
    ) -> list[Skill]:
        return self._know.select("skill", Skill, self._ns(namespace), status, env)

    def guardrails(
        self, namespace: str | None = None, *, status: _Status = None, env: str | None = None
    ) -> list[Guardrail]:
        return self._know.select("guardrail", Guardrail, self._ns(namespace), status, env)

    def get_knowledge(self, knowledge_id: str, namespace: str | None = None) -> Skill | Guardrail:
        return self._know.get(knowledge_id, self._ns(namespace))

    def knowledge_versions(self, knowledge_id: str) -> list[int]:
        return self._know.versions(knowledge_id)

    def rollback(self, knowledge_id: str, version: int, namespace: str | None = None) -> Skill | Guardrail:
        """Make an earlier version current again (recorded as a new version, history kept)."""
        return self._know.rollback(knowledge_id, version, self._ns(namespace))

    def record_usage(
        self,
        usage: Mapping[str, tuple[int, int, int]],
        effects: Mapping[str, float] | None = None,
        namespace: str | None = None,
    ) -> int:
        """Add ``(uses, successes, failures)`` to each item's stats and set ``stats.effect`` where given.

        Each changed item becomes a new version (so usage history is versioned too), all in one
        transaction; unknown ids, and ids with nothing to add, are skipped. Returns how many changed.
        """
        return self._know.record_usage(usage, effects or {}, self._ns(namespace))

    # ------------------------------------------------------------------ examples + teacher cache
    def add_examples(self, examples: Sequence[TrainingExample]) -> int:
        return self._examples.add(examples)

    def examples(self, namespace: str | None = None, *, kind: str | None = None) -> list[TrainingExample]:
        return self._examples.select(self._ns(namespace), kind)

    def put_teacher_logprobs(self, items: Sequence[TeacherLogprobs]) -> int:
        """Cache teacher top-k log-probs by ``(prompt_hash, teacher)`` (float16, replacing older ones)."""
        return self._examples.put_teacher_logprobs(items)

    def get_teacher_logprobs(self, prompt_hashes: Iterable[str], teacher: str) -> dict[str, TeacherLogprobs]:
        """The cached log-probs of ``teacher`` by prompt hash; hashes not cached are absent."""
        return self._examples.get_teacher_logprobs(prompt_hashes, teacher)

    # ------------------------------------------------------------------ checkpoints (trained students)
    def add_checkpoint(self, checkpoint: Checkpoint) -> Checkpoint:
        """Record (or replace, by id) a trained checkpoint with its lineage."""
        return self._checkpoints.add(checkpoint)

    def checkpoints(
        self,
        namespace: str | None = None,
        *,
        run_id: str | None = None,
        policy: str | None = None,
        status: str | CheckpointStatus | Iterable[str | CheckpointStatus] | None = None,
    ) -> list[Checkpoint]:
        """Checkpoints, oldest first, filtered by run, policy key and status."""
        st = None if status is None else [status] if isinstance(status, str) else list(status)
        return self._checkpoints.select(self._ns(namespace), run_id, policy, st)

    def get_checkpoint(self, checkpoint_id: str, namespace: str | None = None) -> Checkpoint:
        return self._checkpoints.get(checkpoint_id, self._ns(namespace))

    def update_checkpoint(
        self,
        checkpoint_id: str,
        namespace: str | None = None,
        *,
        status: str | CheckpointStatus | None = None,
        reason: str | None = None,
        metrics: dict[str, Any] | None = None,
        stale: bool | None = None,
    ) -> Checkpoint:
        """Set a checkpoint's status / reason / stale flag; ``metrics`` are merged into its own."""
        return self._checkpoints.update(
            checkpoint_id, self._ns(namespace), status=status, reason=reason, metrics=metrics, stale=stale
        )

    # ------------------------------------------------------------------ retrieval logs
    def log_retrievals(self, logs: Sequence[RetrievalLog]) -> None:
        self._logs.add(logs)

    def retrieval_logs(
        self, namespace: str | None = None, trajectory_id: str | None = None
    ) -> list[RetrievalLog]:
        return self._logs.select(self._ns(namespace), trajectory_id)

    # ------------------------------------------------------------------ runs (the pipeline's resumable state)
    def upsert_run(self, run_id: str, job: dict[str, Any], status: str, namespace: str | None = None) -> None:
        self._runs.upsert(run_id, job, status, self._ns(namespace))

    def runs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self._runs.select(namespace)

    def set_stage(self, run_id: str, stage: str, status: str, data: dict[str, Any] | None = None) -> None:
        self._runs.set_stage(run_id, stage, status, data)

    def stages(self, run_id: str) -> dict[str, dict[str, Any]]:
        return self._runs.stages(run_id)

    def reset_stages(self, run_id: str) -> None:
        """Forget every stage of ``run_id`` (``evolve run --fresh``); its episodes stay."""
        self._runs.reset_stages(run_id)

    # ------------------------------------------------------------------ stats, export, import
    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        ns = self._ns(namespace)
        out: dict[str, Any] = {"path": self.path, "namespace": ns}
        for table in (
            "trajectories",
            "steps",
            "diagnoses",
            "skills",
            "guardrails",
            "examples",
            "retrieval_log",
            "runs",
            "vectors",
        ):
            row = T.one(self.conn, f"SELECT count(*) FROM {table} WHERE namespace = ?", [ns])
            out[table] = int(row[0]) if row else 0
        rows = self.conn.execute(
            "SELECT outcome, count(*) FROM trajectories WHERE namespace = ? GROUP BY 1 ORDER BY 1", [ns]
        ).fetchall()
        out["outcomes"] = dict(rows)
        rows = self.conn.execute(
            "SELECT status, count(*) FROM skills WHERE namespace = ? GROUP BY 1 ORDER BY 1", [ns]
        ).fetchall()
        out["skill_status"] = dict(rows)
        out["namespaces"] = self.list_namespaces()
        return out

    def export_jsonl(self, path: str | Path, kind: str = "trajectories", namespace: str | None = None) -> int:
        """Write one JSON object per line (trajectories with their steps, skills, guardrails, examples)."""
        getters = {
            "trajectories": self.trajectories,
            "skills": self.skills,
            "guardrails": self.guardrails,
            "examples": self.examples,
        }
        if kind not in getters:
            raise StoreError(f"cannot export '{kind}'; choose one of: {', '.join(getters)}")
        items: list[BaseModel] = getters[kind](namespace)  # type: ignore[operator]
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        with tmp.open("w") as f:
            for it in items:
                f.write(it.model_dump_json() + "\n")
        tmp.replace(p)
        return len(items)

    def import_jsonl(self, path: str | Path, kind: str = "trajectories") -> int:
        """Validate every line first; write all in one transaction or nothing (names the bad line)."""
        models: dict[str, type[BaseModel]] = {
            "trajectories": Trajectory,
            "skills": Skill,
            "guardrails": Guardrail,
            "examples": TrainingExample,
        }
        if kind not in models:
            raise StoreError(f"cannot import '{kind}'; choose one of: {', '.join(models)}")
        p = Path(path)
        if not p.exists():
            raise StoreError(f"no such file '{p}'")
        if not p.is_file():
            raise StoreError(f"'{p}' is not a file (a directory?); give a JSON-lines file")
        items = []
        n = 0
        try:
            with p.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        json.loads(line, parse_constant=_no_constant)  # NaN / Infinity: not JSON
                        items.append(models[kind].model_validate_json(line))
                    except ValidationError as e:
                        err = e.errors()[0]
                        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
                        raise StoreError(
                            f"{p}:{n}: invalid {_SINGULAR[kind]} at '{loc}': {err['msg']}; nothing imported"
                        ) from None
                    except ValueError as e:  # json.JSONDecodeError and the constants
                        raise StoreError(
                            f"{p}:{n}: not a JSON {_SINGULAR[kind]} ({e}); nothing imported"
                        ) from None
        except UnicodeDecodeError as e:
            raise StoreError(
                f"{p}:{n + 1}: not UTF-8 text (byte {e.start} of the line); nothing imported"
            ) from None
        except OSError as e:
            raise StoreError(f"'{p}' cannot be read ({e.strerror}); nothing imported") from None
        {
            "trajectories": self.add_trajectories,
            "skills": self.upsert_skills,
            "guardrails": self.upsert_guardrails,
            "examples": self.add_examples,
        }[kind](items)  # type: ignore[operator]
        return len(items)

    # ------------------------------------------------------------------ vectors + search
    def index_texts(self, kind: str, rows: Sequence[tuple[str, str, str]]) -> None:
        """Embed ``(ref_id, namespace, text)`` rows in one call and (re)place their vectors."""
        if rows:
            self._vectors.write(kind, rows, self.embedder.embed([r[2] for r in rows]))

    def add_vectors(
        self,
        kind: str,
        rows: Sequence[tuple[str, str, str]],
        vecs: np.ndarray,
        model: str | None = None,
        *,
        replace: bool = True,
    ) -> None:
        """Store precomputed vectors (bulk loads, benchmarks); ``model`` names what made them.

        The vectors of ``kind`` already stored for these ref ids are replaced; ``replace=False``
        skips looking for them, for a caller that knows there are none (a new item)."""
        self._vectors.write(kind, rows, vecs, model, replace=replace)

    def delete_vectors(
        self, kind: str, ref_ids: Sequence[str] | None = None, *, other_than_model: str | None = None
    ) -> None:
        """Drop vectors of ``kind``: those of ``ref_ids`` (all when None), or only those another
        model than ``other_than_model`` wrote. Their sources stay; FAISS follows on next use."""
        self._vectors.delete(kind, ref_ids, other_than_model=other_than_model)

    def sync_vectors(self, kind: str) -> int:
        """Embed source rows of ``kind`` that have no (or an outdated) vector. Returns how many."""
        return self._vectors.sync(kind)

    def vector_index(self, kind: str, rebuild: bool = False) -> VectorIndex:
        """The FAISS index of ``kind``, loaded, extended or rebuilt so that it matches DuckDB."""
        return self._vectors.vector_index(kind, rebuild)

    def search(
        self,
        query: str,
        kind: Literal["trajectory", "skill", "guardrail"] | str = "skill",
        k: int = 10,
        namespace: str | None = None,
        filters: dict[str, Any] | None = None,
        mode: Literal["hybrid", "dense", "keyword"] = "hybrid",
        rrf_k: int = RRF_K,
        reranker: Reranker | None = None,
        rerank_depth: int | None = None,
    ) -> list[SearchHit]:
        """Dense (FAISS) + keyword (BM25) search, fused by reciprocal rank, within one namespace.

        ``filters`` restrict on metadata columns (status, env, signature, outcome...). A
        ``reranker`` (default: the store's) reorders the best ``rerank_depth`` fused hits
        (default ``max(4k, 20)``); each hit's ``score`` is then the reranker's.
        """
        if mode not in ("hybrid", "dense", "keyword"):
            raise StoreError(f"unknown search mode '{mode}'; use hybrid, dense or keyword")
        q = self.embedder.embed([query])[0] if mode in ("hybrid", "dense") else None
        return self._vectors.search(
            kind,
            k,
            self._ns(namespace),
            filters,
            mode,
            q,
            query,
            rrf_k,
            reranker or self.reranker,
            rerank_depth,
        )

    def search_vector(
        self,
        vector: np.ndarray,
        kind: str = "skill",
        k: int = 10,
        namespace: str | None = None,
        filters: dict[str, Any] | None = None,
    ) -> list[SearchHit]:
        """Dense search with a query vector computed elsewhere (in the space of the stored vectors)."""
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        return self._vectors.search(kind, k, self._ns(namespace), filters, "dense", q, "", RRF_K)

    def rebuild_index(self, kinds: Iterable[str] | None = None) -> dict[str, int]:
        """Re-derive the FAISS indexes from DuckDB (embedding any rows that lack vectors)."""
        return self._vectors.rebuild(kinds)


# ---------------------------------------------------------------------------------- one DuckDB instance
# Starting a DuckDB instance costs ~15 ms (it registers every built-in function and extension, for
# an in-memory database too); attaching a file to a running instance costs ~0.3 ms, and DETACH
# checkpoints the file and releases its lock as closing an instance does. So the stores of a
# process share one in-memory instance, each attaching its file on a cursor of its own (a cursor is
# a connection: its own transaction and ``USE``); stores of one file share its attachment, as
# ``duckdb.connect`` shares an instance per path. DuckDB itself refuses a file that is attached
# here when something else in the process opens it ("Unique file handle conflict").
_ATTACH_LOCK = threading.Lock()
_INSTANCE: tuple[int, duckdb.DuckDBPyConnection] | None = None
_ATTACHED: dict[str, list[Any]] = {}
"""file key -> [alias, read_only, stores using it]"""
_ALIASES = iter(range(1 << 62))


def _instance() -> duckdb.DuckDBPyConnection:
    global _INSTANCE
    # A forked child must not touch its parent's instance (its threads did not survive the fork).
    if _INSTANCE is None or _INSTANCE[0] != os.getpid():
        _ATTACHED.clear()
        # Spills of the shared instance go to the temporary directory, not to the working one.
        tmp = os.path.join(tempfile.gettempdir(), f"evolve-duckdb-{os.getpid()}")
        _INSTANCE = (os.getpid(), duckdb.connect(":memory:", config={"temp_directory": tmp}))
    return _INSTANCE[1]


def _attach(path: str, read_only: bool) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A connection whose default database is the file at ``path``, and the file's key."""
    with _ATTACH_LOCK:
        base = _instance()
        key = str(Path(path).resolve()) if path != ":memory:" else f":memory:{next(_ALIASES)}"
        entry = _ATTACHED.get(key)
        if entry is not None and entry[1] and not read_only:
            raise StoreError(
                f"store '{path}' is open read-only elsewhere in this process; close that store "
                "before opening it writable"
            )
        cur = base.cursor()
        try:
            if entry is None:
                alias = f"evolve_{next(_ALIASES)}"
                quoted = path.replace("'", "''")
                cur.execute(f"ATTACH '{quoted}' AS {alias}" + (" (READ_ONLY)" if read_only else ""))
                entry = _ATTACHED[key] = [alias, read_only, 0]
            cur.execute(f"USE {entry[0]}")
        except BaseException:
            cur.close()
            raise
        entry[2] += 1
        return cur, key


def _detach(key: str, conn: duckdb.DuckDBPyConnection, pid: int) -> None:
    if pid != os.getpid():
        return  # a forked child's copy of its parent's store: the parent's to close
    with _ATTACH_LOCK:
        try:
            conn.close()
        finally:
            entry = _ATTACHED.get(key)
            if entry is not None and _INSTANCE is not None and _INSTANCE[0] == os.getpid():
                entry[2] -= 1
                if entry[2] <= 0:
                    del _ATTACHED[key]
                    _INSTANCE[1].execute(f"DETACH {entry[0]}")


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows; write a finite number or null")


class _Txn:
    """BEGIN/COMMIT around a block, ROLLBACK on error; nested uses join the outer transaction."""

    def __init__(self, store: ExperienceStore):
        self.store = store
        self.outer = False

    def __enter__(self) -> _Txn:
        self.store._lock.acquire()
        depth = self.store._txn_depth
        self.outer = depth == 0
        self.store._txn_depth = depth + 1
        if self.outer:
            if self.store.read_only:
                self.store._txn_depth = 0
                self.store._lock.release()
                raise StoreError(
                    f"store '{self.store.path}' is open read-only; open it writable to change it"
                )
            self.store.conn.execute("BEGIN TRANSACTION")
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.store._txn_depth -= 1
        try:
            if self.outer:
                try:
                    self.store.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
                finally:
                    # Tell every store on this file (in this process: DuckDB admits one writing
                    # process) that its caches must be checked against DuckDB again. A rollback
                    # counts too: an index may have been extended with rows that are now gone.
                    key = self.store._gen_key
                    _GENERATIONS[key] = _GENERATIONS.get(key, 0) + 1
        finally:
            self.store._lock.release()


__all__ = ["DEFAULT_NAMESPACE", "SOURCES", "ExperienceStore", "datetime"]
