"""ExperienceStore: one DuckDB file is the truth; FAISS + BM25 indexes beside it are derived.

Layout on disk::

    run/store.duckdb            trajectories, steps, diagnoses, skills, guardrails, examples, runs,
                                vectors (the embeddings, so indexes rebuild without re-embedding)
    run/store.duckdb.index/     <kind>.index + <kind>.json  (FAISS, rebuilt when missing or stale)

Ingestion is batched: a list of trajectories becomes three Arrow tables appended in one
transaction. Embedding is lazy: rows are embedded (one batched call per kind) the first time a
search needs them, so ingest never waits on a model and never calls an LLM.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ValidationError

from evolve.errors import StoreError
from evolve.schema import (
    SCHEMA_VERSION,
    Guardrail,
    KnowledgeStatus,
    RetrievalLog,
    SearchHit,
    Skill,
    Step,
    TrainingExample,
    Trajectory,
    utcnow,
)
from evolve.stores.embedders import Embedder, default_embedder
from evolve.stores.keyword import BM25Index
from evolve.stores.vector_index import HNSW_THRESHOLD, VectorIndex

APP_ID = "evolve-experience-store"
DEFAULT_NAMESPACE = "default"
# Commits per database file in this process; a store's caches are valid for one generation.
_GENERATIONS: dict[str, int] = {}
K = TypeVar("K", Skill, Guardrail)
M = TypeVar("M", bound=BaseModel)

# Kinds whose text is derived from a source table and embedded lazily.
_SOURCES: dict[str, tuple[str, str]] = {
    "trajectory": ("trajectories", "summary"),
    "skill": ("skills", "text"),
    "guardrail": ("guardrails", "text"),
}
# Columns a metadata filter may name, per kind (anything else is a user error).
_FILTERABLE: dict[str, set[str]] = {
    "trajectory": {"env", "split", "policy", "arm", "outcome", "task_id", "run_id"},
    "skill": {"env", "status", "signature", "name"},
    "guardrail": {"env", "status", "signature", "root_cause", "scope"},
}

_DDL = [
    "CREATE TABLE IF NOT EXISTS evolve_meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    "CREATE TABLE IF NOT EXISTS namespaces (namespace VARCHAR PRIMARY KEY, created_at TIMESTAMPTZ)",
    """CREATE TABLE IF NOT EXISTS trajectories (
        id VARCHAR PRIMARY KEY, namespace VARCHAR, run_id VARCHAR, task_id VARCHAR, env VARCHAR,
        split VARCHAR, policy VARCHAR, arm VARCHAR, outcome VARCHAR, score DOUBLE, max_score DOUBLE,
        n_steps INTEGER, seed BIGINT, created_at TIMESTAMPTZ, summary VARCHAR, data JSON)""",
    """CREATE TABLE IF NOT EXISTS steps (
        trajectory_id VARCHAR, idx INTEGER, namespace VARCHAR, action VARCHAR, observation VARCHAR,
        reward DOUBLE, done BOOLEAN, causes VARCHAR[], pre_shared BOOLEAN, data JSON)""",
    """CREATE TABLE IF NOT EXISTS diagnoses (
        trajectory_id VARCHAR, step_index INTEGER, namespace VARCHAR, cause VARCHAR, evidence VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS skills (
        id VARCHAR PRIMARY KEY, namespace VARCHAR, env VARCHAR, name VARCHAR, status VARCHAR,
        signature VARCHAR, version INTEGER, confidence DOUBLE, provenance VARCHAR[],
        updated_at TIMESTAMPTZ, text VARCHAR, data JSON)""",
    """CREATE TABLE IF NOT EXISTS guardrails (
        id VARCHAR PRIMARY KEY, namespace VARCHAR, env VARCHAR, root_cause VARCHAR, scope VARCHAR,
        status VARCHAR, signature VARCHAR, version INTEGER, confidence DOUBLE, provenance VARCHAR[],
        updated_at TIMESTAMPTZ, text VARCHAR, data JSON)""",
    """CREATE TABLE IF NOT EXISTS knowledge_versions (
        id VARCHAR, kind VARCHAR, version INTEGER, namespace VARCHAR, created_at TIMESTAMPTZ, data JSON)""",
    """CREATE TABLE IF NOT EXISTS examples (
        id VARCHAR PRIMARY KEY, namespace VARCHAR, kind VARCHAR, provenance VARCHAR[],
        created_at TIMESTAMPTZ, data JSON)""",
    """CREATE TABLE IF NOT EXISTS retrieval_log (
        id VARCHAR, namespace VARCHAR, trajectory_id VARCHAR, step_index INTEGER, knowledge_id VARCHAR,
        kind VARCHAR, score DOUBLE, applicable BOOLEAN, injected BOOLEAN, reason VARCHAR,
        outcome VARCHAR, created_at TIMESTAMPTZ)""",
    """CREATE TABLE IF NOT EXISTS runs (
        id VARCHAR PRIMARY KEY, namespace VARCHAR, status VARCHAR, job JSON,
        created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ)""",
    """CREATE TABLE IF NOT EXISTS run_stages (
        run_id VARCHAR, stage VARCHAR, status VARCHAR, data JSON, updated_at TIMESTAMPTZ,
        PRIMARY KEY (run_id, stage))""",
    "CREATE SEQUENCE IF NOT EXISTS vid_seq START 1",
    """CREATE TABLE IF NOT EXISTS vectors (
        vid BIGINT, kind VARCHAR, ref_id VARCHAR, namespace VARCHAR, model VARCHAR,
        text VARCHAR, vec FLOAT[])""",
]


def _as_list(x: str | Iterable[str] | None) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _utc(us: int | None) -> datetime | None:
    """A TIMESTAMPTZ read as ``epoch_us(col)``: fetching the column itself would need pytz."""
    return None if us is None else _EPOCH + timedelta(microseconds=us)


def _traj_summary(t: Trajectory) -> str:
    """Text that represents an episode for retrieval (goal, outcome, what was done)."""
    acts = "; ".join(s.action.text for s in t.steps[:40])
    summ = t.metadata.get("summary") if isinstance(t.metadata.get("summary"), str) else ""
    return f"{t.goal} | {t.outcome.value} score {t.score:g} | {summ} | actions: {acts}"[:2000]


class ExperienceStore:
    """Experiences, knowledge and training examples of one or many namespaces (tenants)."""

    def __init__(
        self,
        path: str | Path = ":memory:",
        namespace: str = DEFAULT_NAMESPACE,
        embedder: Embedder | None = None,
        read_only: bool = False,
        hnsw_threshold: int = HNSW_THRESHOLD,
    ):
        self.path = str(path)
        self.namespace = namespace
        self._embedder = embedder
        self.read_only = read_only
        self.hnsw_threshold = hnsw_threshold
        self._lock = threading.RLock()
        self._indexes: dict[str, VectorIndex] = {}
        self._bm25: dict[str, tuple[_Meta, BM25Index]] = {}
        # What the in-memory caches were checked against: the file's commit generation.
        self._gen_key = str(Path(self.path).resolve()) if self.path != ":memory:" else f":memory:{id(self)}"
        self._fresh: dict[str, int] = {}
        self._meta: dict[str, _Meta] = {}
        self._allowed: dict[str, dict[str, tuple[np.ndarray | None, np.ndarray | None]]] = {}
        self._ns_cache: tuple[int, set[str]] | None = None
        self.conn = self._connect()
        try:
            self._init_schema()
        except BaseException:
            # A refused file must not stay locked by this process.
            self.conn.close()
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
        try:
            return duckdb.connect(self.path, read_only=self.read_only)
        except duckdb.IOException as e:
            msg = str(e).splitlines()[0]
            if "lock" in msg.lower():
                raise StoreError(
                    f"store '{self.path}' is open in another process; close it or use another store path"
                ) from None
            raise StoreError(
                f"'{self.path}' is not a readable DuckDB file ({msg}); point to an evolve store or a new path"
            ) from None
        except duckdb.Error as e:
            raise StoreError(
                f"'{self.path}' could not be opened as a DuckDB database ({str(e).splitlines()[0]}); "
                "point to an evolve store or a new path"
            ) from None

    def _init_schema(self) -> None:
        tables = {
            r[0] for r in self.conn.execute("SELECT table_name FROM information_schema.tables").fetchall()
        }
        if tables and "evolve_meta" not in tables:
            raise StoreError(
                f"'{self.path}' is a DuckDB database but not an evolve store (tables: "
                f"{', '.join(sorted(tables)[:5])}); use a new path so nothing of it is touched"
            )
        if "evolve_meta" in tables:
            meta = dict(self.conn.execute("SELECT key, value FROM evolve_meta").fetchall())
            if meta.get("app") != APP_ID:
                raise StoreError(
                    f"'{self.path}' has an evolve_meta table of another application; use a new path"
                )
            version = int(meta.get("schema_version", "0"))
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store '{self.path}' was written by a newer evolve (schema {version} > {SCHEMA_VERSION}); "
                    "upgrade evolve-agents"
                )
            if not self.read_only:
                self._migrate(version)
            return
        if self.read_only:
            raise StoreError(f"'{self.path}' is empty, not an evolve store; run a collect stage first")
        with self.transaction():
            for ddl in _DDL:
                self.conn.execute(ddl)
            self.conn.executemany(
                "INSERT INTO evolve_meta VALUES (?, ?)",
                [("app", APP_ID), ("schema_version", str(SCHEMA_VERSION))],
            )
            self._ensure_namespace(DEFAULT_NAMESPACE)

    def _migrate(self, version: int) -> None:
        # Schema 1 is the first; later versions add their ALTERs here, one block per version.
        for ddl in _DDL:
            self.conn.execute(ddl)

    def _one(self, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
        # fetchall, not fetchone: DuckDB refuses new work while a result is only partly fetched.
        rows = self.conn.execute(sql, params or []).fetchall()
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None  # type: ignore[assignment]

    def __enter__(self) -> ExperienceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> _Txn:
        return _Txn(self)

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

    def delete_namespace(self, namespace: str) -> None:
        """Delete a namespace and everything in it (experience, knowledge, examples, vectors)."""
        self._check_namespace(namespace)
        with self.transaction():
            for table in (
                "trajectories",
                "steps",
                "diagnoses",
                "skills",
                "guardrails",
                "knowledge_versions",
                "examples",
                "retrieval_log",
                "runs",
                "vectors",
                "namespaces",
            ):
                self.conn.execute(f"DELETE FROM {table} WHERE namespace = ?", [namespace])
            self.conn.execute("DELETE FROM run_stages WHERE run_id NOT IN (SELECT id FROM runs)")
        self._invalidate()

    # ------------------------------------------------------------------ trajectories
    def add_trajectories(self, trajectories: Sequence[Trajectory]) -> int:
        """Append (or replace, by id) trajectories with their steps in one transaction."""
        if not trajectories:
            return 0
        # One row per id: a later duplicate in the same batch replaces an earlier one.
        trajectories = list({t.id: t for t in trajectories}.values())
        trows: dict[str, list[Any]] = {c: [] for c in _TRAJ_COLS}
        srows: dict[str, list[Any]] = {c: [] for c in _STEP_COLS}
        drows: dict[str, list[Any]] = {c: [] for c in _DIAG_COLS}
        for t in trajectories:
            t, ns = self._own(t)
            head = t.model_dump_json(exclude={"steps"})
            for c, v in zip(
                _TRAJ_COLS,
                (
                    t.id,
                    ns,
                    t.run_id,
                    t.task_id,
                    t.env,
                    t.split.value,
                    t.policy,
                    t.arm,
                    t.outcome.value,
                    t.score,
                    t.max_score,
                    len(t.steps),
                    t.seed,
                    t.created_at,
                    _traj_summary(t),
                    head,
                ),
            ):
                trows[c].append(v)
            steps, m = t.steps, len(t.steps)
            # A step's pre_state is almost always the previous post_state: store it once
            # (halves the serialisation cost, the bottleneck of ingest); _assemble restores it.
            shared = [False] * min(m, 1) + [
                b.pre_state is a.post_state or b.pre_state == a.post_state for a, b in zip(steps, steps[1:])
            ]
            # Column-wise comprehensions and the serializer itself (model_dump_json adds ~10% per
            # call); its bytes go to Arrow as they are.
            srows["data"] += [
                _STEP_JSON(s, exclude=_PRE) if sh else _STEP_JSON(s) for s, sh in zip(steps, shared)
            ]
            srows["pre_shared"] += shared
            srows["trajectory_id"] += [t.id] * m
            srows["namespace"] += [ns] * m
            srows["idx"] += [s.index for s in steps]
            srows["action"] += [s.action.text for s in steps]
            srows["observation"] += [s.post_state.text for s in steps]
            srows["reward"] += [s.reward for s in steps]
            srows["done"] += [s.done for s in steps]
            srows["causes"] += [s.diagnosis.cause_names() if s.diagnosis else [] for s in steps]
            for s in steps:
                if s.diagnosis:
                    for ce in s.diagnosis.causes:
                        for c, v in zip(_DIAG_COLS, (t.id, s.index, ns, ce.cause.value, ce.evidence)):
                            drows[c].append(v)
            if t.diagnosis:
                for ce in t.diagnosis.causes:
                    for c, v in zip(_DIAG_COLS, (t.id, -1, ns, ce.cause.value, ce.evidence)):
                        drows[c].append(v)
        ids = trows["id"]
        with self.transaction():
            for ns in set(trows["namespace"]):
                self._ensure_namespace(ns)
            # Replace by id; only ids already stored cost a scan of the (large) steps table.
            old = [
                r[0]
                for r in self.conn.execute(
                    "SELECT id FROM trajectories WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids]
                ).fetchall()
            ]
            if old:
                for table, col in (
                    ("steps", "trajectory_id"),
                    ("diagnoses", "trajectory_id"),
                    ("trajectories", "id"),
                ):
                    self.conn.execute(
                        f"DELETE FROM {table} WHERE {col} IN (SELECT unnest(?::VARCHAR[]))", [old]
                    )
            self._append("trajectories", pa.table(trows, schema=_TRAJ_SCHEMA))
            if srows["idx"]:
                self._append("steps", pa.table(srows, schema=_STEP_SCHEMA))
            if drows["cause"]:
                self._append("diagnoses", pa.table(drows, schema=_DIAG_SCHEMA))
        return len(ids)

    def _append(self, table: str, arrow: pa.Table) -> None:
        self.conn.from_arrow(arrow).insert_into(table)

    def get_trajectory(self, trajectory_id: str, namespace: str | None = None) -> Trajectory:
        ns = self._ns(namespace)
        row = self._one("SELECT data FROM trajectories WHERE id = ? AND namespace = ?", [trajectory_id, ns])
        if row is None:
            raise StoreError(f"no trajectory '{trajectory_id}' in namespace '{ns}'")
        return self._assemble([(trajectory_id, row[0])])[0]

    def _assemble(self, heads: list[tuple[str, str]]) -> list[Trajectory]:
        if not heads:
            return []
        self.conn.register("_ids", pa.table({"id": [h[0] for h in heads]}))
        try:
            rows = self.conn.execute(
                "SELECT trajectory_id, pre_shared, data FROM steps WHERE trajectory_id IN (SELECT id FROM _ids) "
                "ORDER BY trajectory_id, idx"
            ).fetchall()
        finally:
            self.conn.unregister("_ids")
        by: dict[str, list[Step]] = {}
        for tid, shared, data in rows:
            steps = by.setdefault(tid, [])
            if shared:
                d = json.loads(data)
                d["pre_state"] = steps[-1].post_state
                steps.append(Step.model_validate(d))
            else:
                steps.append(Step.model_validate_json(data))
        out = []
        for tid, head in heads:
            t = Trajectory.model_validate_json(head)
            t.steps = by.get(tid, [])
            out.append(t)
        return out

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
        where, params = self._traj_where(namespace, env, split, outcome, run_id, arm, ids)
        sql = f"SELECT id, data FROM trajectories WHERE {where} ORDER BY created_at, id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self._assemble(self.conn.execute(sql, params).fetchall())

    def _traj_where(self, namespace, env, split, outcome, run_id, arm, ids) -> tuple[str, list[Any]]:  # noqa: ANN001
        ns = self._ns(namespace)
        where, params = ["namespace = ?"], [ns]
        for col, val in (("env", env), ("split", split), ("run_id", run_id), ("arm", arm)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        outs = _as_list(outcome)
        if outs:
            where.append("outcome IN (" + ",".join("?" * len(outs)) + ")")
            params += outs
        if ids is not None:
            idl = list(ids)
            where.append("id IN (SELECT unnest(?::VARCHAR[]))")  # a hash join, not a list scan per row
            params.append(idl)
        return " AND ".join(where), params

    def count_trajectories(self, namespace: str | None = None, **filters: Any) -> int:
        where, params = self._traj_where(
            namespace,
            filters.get("env"),
            filters.get("split"),
            filters.get("outcome"),
            filters.get("run_id"),
            filters.get("arm"),
            filters.get("ids"),
        )
        return int(self._one(f"SELECT count(*) FROM trajectories WHERE {where}", params)[0])

    def delete_trajectory(self, trajectory_id: str, namespace: str | None = None) -> dict[str, int]:
        """Delete a trajectory and, through provenance, everything distilled from it."""
        ns = self._ns(namespace)
        counts: dict[str, int] = {}
        with self.transaction():
            for table, col in (
                ("steps", "trajectory_id"),
                ("diagnoses", "trajectory_id"),
                ("retrieval_log", "trajectory_id"),
                ("trajectories", "id"),
            ):
                counts[table] = self._delete_count(
                    f"FROM {table} WHERE {col} = ? AND namespace = ?", [trajectory_id, ns]
                )
            for table, kind in (("skills", "skill"), ("guardrails", "guardrail"), ("examples", "example")):
                dead = [
                    r[0]
                    for r in self.conn.execute(
                        f"SELECT id FROM {table} WHERE namespace = ? AND list_contains(provenance, ?)",
                        [ns, trajectory_id],
                    ).fetchall()
                ]
                counts[table] = len(dead)
                if dead:
                    self.conn.execute(
                        f"DELETE FROM {table} WHERE id IN (SELECT unnest(?::VARCHAR[]))", [dead]
                    )
                    self.conn.execute(
                        "DELETE FROM knowledge_versions WHERE id IN (SELECT unnest(?::VARCHAR[]))", [dead]
                    )
                    self.conn.execute(
                        "DELETE FROM vectors WHERE kind = ? AND ref_id IN (SELECT unnest(?::VARCHAR[]))",
                        [kind, dead],
                    )
            self.conn.execute(
                "DELETE FROM vectors WHERE kind = 'trajectory' AND ref_id = ? AND namespace = ?",
                [trajectory_id, ns],
            )
        self._invalidate()
        return counts

    def _delete_count(self, frm: str, params: list[Any]) -> int:
        n = int(self._one(f"SELECT count(*) {frm}", params)[0])
        if n:
            self.conn.execute(f"DELETE {frm}", params)
        return n

    # ------------------------------------------------------------------ knowledge
    def upsert_skills(self, skills: Sequence[Skill]) -> None:
        self._upsert_knowledge("skills", "skill", skills)

    def upsert_guardrails(self, guardrails: Sequence[Guardrail]) -> None:
        self._upsert_knowledge("guardrails", "guardrail", guardrails)

    def _upsert_knowledge(self, table: str, kind: str, items: Sequence[Skill | Guardrail]) -> None:
        if not items:
            return
        now = utcnow()
        rows = []
        hist = []
        for it in items:
            it, ns = self._own(it)
            data = it.model_dump_json()
            base = [it.id, ns, it.env]
            if isinstance(it, Skill):
                base += [it.name]
            else:
                base += [it.root_cause.value, it.scope.value]
            base += [
                it.status.value,
                it.signature,
                it.version,
                it.stats.confidence,
                it.provenance,
                now,
                it.text(),
                data,
            ]
            rows.append(base)
            hist.append([it.id, kind, it.version, ns, now, data])
        # One row per key, the last one winning, as a sequence of single upserts would leave it.
        rows = list({r[0]: r for r in rows}.values())
        hist = list({(h[0], h[2]): h for h in hist}.values())
        schema = _SKILL_SCHEMA if table == "skills" else _GUARD_SCHEMA
        with self.transaction():
            for ns in {r[1] for r in rows}:
                self._ensure_namespace(ns)
            # Bulk delete + Arrow append: executemany costs milliseconds per row in DuckDB.
            self.conn.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT unnest(?::VARCHAR[]))", [[r[0] for r in rows]]
            )
            self._append(
                table, pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema)
            )
            # History keeps one row per (id, version) so any version can be rolled back to.
            self.conn.execute(
                """DELETE FROM knowledge_versions k WHERE EXISTS (
                    SELECT 1 FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::INTEGER[]) AS version) b
                    WHERE b.id = k.id AND b.version = k.version)""",
                [[h[0] for h in hist], [h[2] for h in hist]],
            )
            self._append(
                "knowledge_versions",
                pa.Table.from_pylist([dict(zip(_HIST_SCHEMA.names, h)) for h in hist], schema=_HIST_SCHEMA),
            )

    def skills(
        self,
        namespace: str | None = None,
        *,
        status: str | Iterable[str] | None = None,
        env: str | None = None,
    ) -> list[Skill]:
        return self._knowledge("skills", Skill, namespace, status, env)

    def guardrails(
        self,
        namespace: str | None = None,
        *,
        status: str | Iterable[str] | None = None,
        env: str | None = None,
    ) -> list[Guardrail]:
        return self._knowledge("guardrails", Guardrail, namespace, status, env)

    def _knowledge(self, table: str, cls: type[K], namespace, status, env) -> list[K]:  # noqa: ANN001
        where, params = ["namespace = ?"], [self._ns(namespace)]
        st = _as_list(status.value if isinstance(status, KnowledgeStatus) else status)
        if st:
            st = [s.value if isinstance(s, KnowledgeStatus) else s for s in st]
            where.append("status IN (" + ",".join("?" * len(st)) + ")")
            params += st
        if env:
            where.append("env = ?")
            params.append(env)
        rows = self.conn.execute(
            f"SELECT data FROM {table} WHERE {' AND '.join(where)} ORDER BY id", params
        ).fetchall()
        return [cls.model_validate_json(r[0]) for r in rows]

    def get_knowledge(self, knowledge_id: str, namespace: str | None = None) -> Skill | Guardrail:
        ns = self._ns(namespace)
        for table, cls in (("skills", Skill), ("guardrails", Guardrail)):
            row = self._one(f"SELECT data FROM {table} WHERE id = ? AND namespace = ?", [knowledge_id, ns])
            if row:
                return cls.model_validate_json(row[0])
        raise StoreError(f"no skill or guardrail '{knowledge_id}' in namespace '{ns}'")

    def knowledge_versions(self, knowledge_id: str) -> list[int]:
        rows = self.conn.execute(
            "SELECT version FROM knowledge_versions WHERE id = ? ORDER BY version", [knowledge_id]
        ).fetchall()
        return [r[0] for r in rows]

    def rollback(self, knowledge_id: str, version: int, namespace: str | None = None) -> Skill | Guardrail:
        """Make an earlier version current again (recorded as a new version, history kept)."""
        ns = self._ns(namespace)
        row = self._one(
            "SELECT kind, data FROM knowledge_versions WHERE id = ? AND version = ? AND namespace = ?",
            [knowledge_id, version, ns],
        )
        if row is None:
            have = self.knowledge_versions(knowledge_id)
            raise StoreError(f"'{knowledge_id}' has no version {version} (versions: {have or 'none'})")
        kind, data = row
        cls = Skill if kind == "skill" else Guardrail
        item = cls.model_validate_json(data)
        item.version = max(self.knowledge_versions(knowledge_id)) + 1
        (self.upsert_skills if kind == "skill" else self.upsert_guardrails)([item])  # type: ignore[list-item]
        return item

    # ------------------------------------------------------------------ examples, logs, runs
    def add_examples(self, examples: Sequence[TrainingExample]) -> int:
        if not examples:
            return 0
        rows = {
            e.id: (e.id, ns, e.kind.value, e.provenance, e.created_at, e.model_dump_json())
            for e, ns in map(self._own, examples)
        }  # one row per id, the last one winning
        cols = list(zip(*rows.values()))
        with self.transaction():
            for ns in set(cols[1]):
                self._ensure_namespace(ns)
            self.conn.execute(
                "DELETE FROM examples WHERE id IN (SELECT unnest(?::VARCHAR[]))", [list(cols[0])]
            )
            self._append("examples", pa.table(dict(zip(_EXAMPLE_SCHEMA.names, cols)), schema=_EXAMPLE_SCHEMA))
        return len(examples)

    def examples(self, namespace: str | None = None, *, kind: str | None = None) -> list[TrainingExample]:
        sql, params = "SELECT data FROM examples WHERE namespace = ?", [self._ns(namespace)]
        if kind:
            sql += " AND kind = ?"
            params.append(kind)
        return [
            TrainingExample.model_validate_json(r[0])
            for r in self.conn.execute(sql + " ORDER BY id", params).fetchall()
        ]

    def log_retrievals(self, logs: Sequence[RetrievalLog]) -> None:
        if not logs:
            return
        rows = [
            [
                r.id,
                r.namespace,
                r.trajectory_id,
                r.step_index,
                r.knowledge_id,
                r.kind,
                r.score,
                r.applicable,
                r.injected,
                r.reason,
                r.outcome,
                r.created_at,
            ]
            for r in logs
        ]
        with self.transaction():
            self.conn.executemany("INSERT INTO retrieval_log VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def retrieval_logs(
        self, namespace: str | None = None, trajectory_id: str | None = None
    ) -> list[RetrievalLog]:
        # Timestamps come back as epoch microseconds (see _utc).
        sql = (
            "SELECT id, namespace, trajectory_id, step_index, knowledge_id, kind, score, applicable, "
            "injected, reason, outcome, epoch_us(created_at) AS created_at FROM retrieval_log WHERE namespace = ?"
        )
        params: list[Any] = [self._ns(namespace)]
        if trajectory_id:
            sql += " AND trajectory_id = ?"
            params.append(trajectory_id)
        cur = self.conn.execute(sql + " ORDER BY created_at, id", params)
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        return [RetrievalLog.model_validate({**r, "created_at": _utc(r["created_at"])}) for r in rows]

    # Runs: the pipeline keeps its resumable state here.
    def upsert_run(self, run_id: str, job: dict[str, Any], status: str, namespace: str | None = None) -> None:
        ns = self._ns(namespace)
        now = utcnow()
        with self.transaction():
            self._ensure_namespace(ns)
            self.conn.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "status = excluded.status, job = excluded.job, updated_at = excluded.updated_at",
                [run_id, ns, status, json.dumps(job, default=str), now, now],
            )

    def runs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, namespace, status, job, epoch_us(created_at) AS created_at, "
            "epoch_us(updated_at) AS updated_at FROM runs"
        )
        params: list[Any] = []
        if namespace:
            sql += " WHERE namespace = ?"
            params.append(namespace)
        cur = self.conn.execute(sql + " ORDER BY created_at", params)
        cols = [d[0] for d in cur.description]
        out = [dict(zip(cols, r)) for r in cur.fetchall()]
        for r in out:
            r["created_at"], r["updated_at"] = _utc(r["created_at"]), _utc(r["updated_at"])
        return out

    def set_stage(self, run_id: str, stage: str, status: str, data: dict[str, Any] | None = None) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO run_stages VALUES (?, ?, ?, ?, ?)",
                [run_id, stage, status, json.dumps(data or {}, default=str), utcnow()],
            )

    def stages(self, run_id: str) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT stage, status, data, epoch_us(updated_at) FROM run_stages WHERE run_id = ?", [run_id]
        ).fetchall()
        return {r[0]: {"status": r[1], "data": json.loads(r[2]), "updated_at": _utc(r[3])} for r in rows}

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
            out[table] = int(self._one(f"SELECT count(*) FROM {table} WHERE namespace = ?", [ns])[0])
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
        items = []
        with p.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    items.append(models[kind].model_validate_json(line))
                except ValidationError as e:
                    err = e.errors()[0]
                    loc = ".".join(str(x) for x in err["loc"]) or "(root)"
                    raise StoreError(
                        f"{p}:{n}: invalid {_SINGULAR[kind]} at '{loc}': {err['msg']}; nothing imported"
                    ) from None
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
        if not rows:
            return
        vecs = self.embedder.embed([r[2] for r in rows])
        self._write_vectors(kind, rows, vecs)

    def add_vectors(
        self, kind: str, rows: Sequence[tuple[str, str, str]], vecs: np.ndarray, model: str | None = None
    ) -> None:
        """Store precomputed vectors (bulk loads, benchmarks); ``model`` names what made them."""
        self._write_vectors(kind, rows, vecs, model)

    def _write_vectors(
        self, kind: str, rows: Sequence[tuple[str, str, str]], vecs: np.ndarray, model: str | None = None
    ) -> None:
        vecs = np.asarray(vecs, dtype=np.float32)
        model = model or self.embedder.name
        n = len(rows)
        with self.transaction():
            # The drawn values themselves, not min()+arange: another connection may draw concurrently.
            vids = np.sort(
                self.conn.execute("SELECT nextval('vid_seq') AS v FROM range(?)", [n]).fetchnumpy()["v"]
            ).astype(np.int64)
            ref_ids = [r[0] for r in rows]
            self.conn.register("_ids", pa.table({"id": ref_ids}))
            self.conn.execute(
                "DELETE FROM vectors WHERE kind = ? AND ref_id IN (SELECT id FROM _ids)", [kind]
            )
            self.conn.unregister("_ids")
            flat = pa.array(vecs.reshape(-1), type=pa.float32())
            lists = pa.ListArray.from_arrays(
                pa.array(np.arange(0, (n + 1) * vecs.shape[1], vecs.shape[1], dtype=np.int32)), flat
            )
            tbl = pa.table(
                {
                    "vid": pa.array(vids),
                    "kind": [kind] * n,
                    "ref_id": ref_ids,
                    "namespace": [r[1] for r in rows],
                    "model": [model] * n,
                    "text": [r[2] for r in rows],
                    "vec": lists,
                }
            )
            self._append("vectors", tbl)
        self._invalidate(kind)

    def delete_vectors(self, kind: str, ref_ids: Sequence[str]) -> None:
        with self.transaction():
            self.conn.execute(
                "DELETE FROM vectors WHERE kind = ? AND ref_id IN (SELECT unnest(?::VARCHAR[]))",
                [kind, list(ref_ids)],
            )
        self._invalidate(kind)

    def _invalidate(self, kind: str | None = None) -> None:
        for k in [kind] if kind else list(self._bm25):
            self._bm25.pop(k, None)

    def _generation(self) -> int:
        return _GENERATIONS.get(self._gen_key, 0)

    def sync_vectors(self, kind: str) -> int:
        """Embed source rows of ``kind`` that have no (or an outdated) vector. Returns how many."""
        if kind not in _SOURCES or self.read_only:
            return 0
        table, col = _SOURCES[kind]
        model = self.embedder.name
        todo = self.conn.execute(
            f"""SELECT s.id, s.namespace, s.{col} FROM {table} s LEFT JOIN vectors v
                ON v.kind = ? AND v.ref_id = s.id AND v.model = ? AND v.text = s.{col}
                WHERE v.vid IS NULL ORDER BY s.id""",
            [kind, model],
        ).fetchall()
        if not todo:
            return 0
        # Rows of another model are dropped together with the new ones' replacements.
        for i in range(0, len(todo), 1024):
            chunk = todo[i : i + 1024]
            self.index_texts(kind, [(r[0], r[1], r[2] or "") for r in chunk])
        with self.transaction():
            self.conn.execute("DELETE FROM vectors WHERE kind = ? AND model <> ?", [kind, model])
        return len(todo)

    def _db_index_state(self, kind: str) -> tuple[int, int, int]:
        n, mx, sm = self._one(
            "SELECT count(*), coalesce(max(vid), -1), coalesce(sum(vid), 0) FROM vectors WHERE kind = ?",
            [kind],
        )
        return int(n), int(mx), int(sm) % (1 << 61)

    def _dims(self, kind: str) -> int | None:
        row = self._one("SELECT len(vec) FROM vectors WHERE kind = ? LIMIT 1", [kind])
        return int(row[0]) if row else None

    def vector_index(self, kind: str, rebuild: bool = False) -> VectorIndex:
        """The FAISS index of ``kind``, loaded, extended or rebuilt so that it matches DuckDB."""
        with self._lock:
            idx = None if rebuild else self._indexes.get(kind)
            # Fast path: no transaction committed on this file since the index was last checked.
            if idx is not None and self._fresh.get(kind) == self._generation():
                return idx
            self.sync_vectors(kind)
            gen = self._generation()
            n, mx, sm = self._db_index_state(kind)
            dim = self._dims(kind) or getattr(self._embedder, "dim", None) or 384
            meta = self._meta.get(kind) if idx is not None else None
            path = self.index_dir / f"{kind}.index" if self.index_dir else None
            if idx is None and path is not None and not rebuild:
                idx = VectorIndex.load(path, self.hnsw_threshold)
            if idx is not None and idx.dim != dim:
                idx = None  # dimension mismatch: the embedder changed
            changed = False
            if idx is not None and (idx.count, idx.max_vid, idx.checksum) != (n, mx, sm):
                # Only appended rows: extend. Anything else (deletes, replaced rows): rebuild.
                newer = self._one(
                    "SELECT count(*), coalesce(sum(vid), 0) FROM vectors WHERE kind = ? AND vid > ?",
                    [kind, idx.max_vid],
                )
                if idx.count + int(newer[0]) == n and (idx.checksum + int(newer[1])) % (1 << 61) == sm:
                    start = idx.max_vid + 1
                    vids, vecs = self._load_vectors(kind, min_vid=start)
                    idx.add(vids, vecs)
                    if meta is not None:
                        meta = meta.extend(self._load_meta(kind, min_vid=start))
                    changed = True
                else:
                    idx = None
            if idx is None:
                idx = VectorIndex(dim, self.hnsw_threshold)
                vids, vecs = self._load_vectors(kind)
                idx.build(vids, vecs)
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

    def _load_vectors(self, kind: str, min_vid: int = 0) -> tuple[np.ndarray, np.ndarray]:
        # sql(), not execute(): Arrow from a relation is not copied twice.
        tbl = self.conn.sql(
            "SELECT vid, vec FROM vectors WHERE kind = ? AND vid >= ? ORDER BY vid", params=[kind, min_vid]
        ).to_arrow_table()
        vids = tbl.column("vid").to_numpy().astype(np.int64)
        if len(vids) == 0:
            return vids, np.zeros((0, self._dims(kind) or 1), dtype=np.float32)
        col = tbl.column("vec").combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return vids, flat.reshape(len(vids), -1)

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

    def _known_namespaces(self) -> set[str]:
        gen = self._generation()
        if self._ns_cache is None or self._ns_cache[0] != gen:
            self._ns_cache = (gen, set(self.list_namespaces()))
        return self._ns_cache[1]

    def _check_namespace(self, ns: str) -> None:
        if ns not in self._known_namespaces():
            known = ", ".join(self.list_namespaces()) or "none"
            raise StoreError(
                f"unknown namespace '{ns}' (known: {known}); check the name or write to it first"
            )

    def _allowed_vids(
        self, kind: str, ns: str, filters: dict[str, Any] | None, meta: _Meta
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(vids, row mask over meta or None)`` a search may return; ``(None, None)``: all rows may."""
        filters = {k: v for k, v in (filters or {}).items() if v is not None}
        bad = set(filters) - _FILTERABLE.get(kind, set())
        if bad:
            allowed = ", ".join(sorted(_FILTERABLE.get(kind, set()))) or "none"
            raise StoreError(f"cannot filter {kind} on {', '.join(sorted(bad))}; filterable: {allowed}")
        if not filters:
            # Namespace only: answered from the in-memory metadata, cached until the index changes.
            per_ns = self._allowed.setdefault(kind, {})
            if ns not in per_ns:
                mask = meta.namespace_mask(ns)
                per_ns[ns] = (None, None) if mask.all() else (meta.vids[mask], mask)
            return per_ns[ns]
        where, params = ["v.kind = ?", "v.namespace = ?"], [kind, ns]
        table = _SOURCES[kind][0]
        join = f" JOIN {table} s ON s.id = v.ref_id"
        for col, val in filters.items():
            vals = _as_list(val.value if hasattr(val, "value") else val) or []
            vals = [x.value if hasattr(x, "value") else x for x in vals]
            where.append(f"s.{col} IN (" + ",".join("?" * len(vals)) + ")")
            params += vals
        rows = self.conn.execute(
            f"SELECT v.vid FROM vectors v{join} WHERE {' AND '.join(where)} ORDER BY v.vid", params
        ).fetchnumpy()
        return np.asarray(rows["vid"], dtype=np.int64), None  # the mask only if keyword search needs it

    def search(
        self,
        query: str,
        kind: Literal["trajectory", "skill", "guardrail"] | str = "skill",
        k: int = 10,
        namespace: str | None = None,
        filters: dict[str, Any] | None = None,
        mode: Literal["hybrid", "dense", "keyword"] = "hybrid",
        rrf_k: int = 60,
    ) -> list[SearchHit]:
        """Dense (FAISS) + keyword (BM25) search, fused by reciprocal rank, within one namespace.

        ``filters`` restrict on metadata columns (status, env, signature, outcome...).
        """
        if mode not in ("hybrid", "dense", "keyword"):
            raise StoreError(f"unknown search mode '{mode}'; use hybrid, dense or keyword")
        q = self.embedder.embed([query])[0] if mode in ("hybrid", "dense") else None
        return self._search(kind, k, namespace, filters, mode, q, query, rrf_k)

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
        return self._search(kind, k, namespace, filters, "dense", q, "", 60)

    def _search(
        self,
        kind: str,
        k: int,
        namespace: str | None,
        filters: dict[str, Any] | None,
        mode: str,
        q: np.ndarray | None,
        query: str,
        rrf_k: int,
    ) -> list[SearchHit]:
        ns = self._ns(namespace)
        with self._lock:  # FAISS must not search an index that another thread is extending
            idx = self.vector_index(kind)
            meta = self._meta[kind]
            # Vectors written with add_vectors may name a namespace no other row has.
            if ns not in self._known_namespaces() and not meta.has_namespace(ns):
                self._check_namespace(ns)
            allowed, mask = self._allowed_vids(kind, ns, filters, meta)
            if allowed is not None and len(allowed) == 0:
                return []
            depth = k if mode == "dense" else max(k * 4, 20)
            dense: list[tuple[int, float]] = []
            kw: list[tuple[int, float]] = []
            if q is not None:
                if q.shape[0] != idx.dim:
                    raise StoreError(
                        f"the {kind} vectors are {idx.dim}-d but the query vector is {q.shape[0]}-d "
                        f"(embedder '{getattr(self._embedder, 'name', '?')}'); search with the embedder that wrote them"
                    )
                # Namespace isolation is exact: only allowed vids can come back.
                dense = idx.search(q, depth, allowed=allowed)
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
                fused = {}
                for lst in (dense, kw):
                    for rank, (vid, _) in enumerate(lst):
                        fused[vid] = fused.get(vid, 0.0) + 1.0 / (rrf_k + rank + 1)
            top = sorted(fused.items(), key=lambda x: -x[1])[:k]
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
            return hits

    def rebuild_index(self, kinds: Iterable[str] | None = None) -> dict[str, int]:
        """Re-derive the FAISS indexes from DuckDB (embedding any rows that lack vectors)."""
        out = {}
        for kind in kinds or [
            r[0] for r in self.conn.execute("SELECT DISTINCT kind FROM vectors").fetchall()
        ] + [k for k in _SOURCES]:
            if kind in out:
                continue
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
        self._ns: pa.Array | None = None

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


class _Txn:
    """BEGIN/COMMIT around a block, ROLLBACK on error; nested uses join the outer transaction."""

    def __init__(self, store: ExperienceStore):
        self.store = store
        self.outer = False

    def __enter__(self) -> _Txn:
        self.store._lock.acquire()
        depth = getattr(self.store, "_txn_depth", 0)
        self.outer = depth == 0
        self.store._txn_depth = depth + 1  # type: ignore[attr-defined]
        if self.outer:
            if self.store.read_only:
                self.store._txn_depth = 0  # type: ignore[attr-defined]
                self.store._lock.release()
                raise StoreError(
                    f"store '{self.store.path}' is open read-only; open it writable to change it"
                )
            self.store.conn.execute("BEGIN TRANSACTION")
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.store._txn_depth -= 1  # type: ignore[attr-defined]
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


_PRE = {"pre_state"}
_STEP_JSON = Step.__pydantic_serializer__.to_json
_SINGULAR = {
    "trajectories": "trajectory",
    "skills": "skill",
    "guardrails": "guardrail",
    "examples": "example",
}
_TRAJ_COLS = [
    "id",
    "namespace",
    "run_id",
    "task_id",
    "env",
    "split",
    "policy",
    "arm",
    "outcome",
    "score",
    "max_score",
    "n_steps",
    "seed",
    "created_at",
    "summary",
    "data",
]
_TRAJ_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("namespace", pa.string()),
        ("run_id", pa.string()),
        ("task_id", pa.string()),
        ("env", pa.string()),
        ("split", pa.string()),
        ("policy", pa.string()),
        ("arm", pa.string()),
        ("outcome", pa.string()),
        ("score", pa.float64()),
        ("max_score", pa.float64()),
        ("n_steps", pa.int32()),
        ("seed", pa.int64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("summary", pa.string()),
        ("data", pa.string()),
    ]
)
_STEP_COLS = [
    "trajectory_id",
    "idx",
    "namespace",
    "action",
    "observation",
    "reward",
    "done",
    "causes",
    "pre_shared",
    "data",
]
_STEP_SCHEMA = pa.schema(
    [
        ("trajectory_id", pa.string()),
        ("idx", pa.int32()),
        ("namespace", pa.string()),
        ("action", pa.string()),
        ("observation", pa.string()),
        ("reward", pa.float64()),
        ("done", pa.bool_()),
        ("causes", pa.list_(pa.string())),
        ("pre_shared", pa.bool_()),
        ("data", pa.string()),
    ]
)
_TS = pa.timestamp("us", tz="UTC")
_KNOWLEDGE_TAIL = [
    ("status", pa.string()),
    ("signature", pa.string()),
    ("version", pa.int32()),
    ("confidence", pa.float64()),
    ("provenance", pa.list_(pa.string())),
    ("updated_at", _TS),
    ("text", pa.string()),
    ("data", pa.string()),
]
_HEAD = [("id", pa.string()), ("namespace", pa.string()), ("env", pa.string())]
_SKILL_SCHEMA = pa.schema([*_HEAD, ("name", pa.string()), *_KNOWLEDGE_TAIL])
_GUARD_SCHEMA = pa.schema([*_HEAD, ("root_cause", pa.string()), ("scope", pa.string()), *_KNOWLEDGE_TAIL])
_HIST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("version", pa.int32()),
        ("namespace", pa.string()),
        ("created_at", _TS),
        ("data", pa.string()),
    ]
)
_EXAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("namespace", pa.string()),
        ("kind", pa.string()),
        ("provenance", pa.list_(pa.string())),
        ("created_at", _TS),
        ("data", pa.string()),
    ]
)
_DIAG_COLS = ["trajectory_id", "step_index", "namespace", "cause", "evidence"]
_DIAG_SCHEMA = pa.schema(
    [
        ("trajectory_id", pa.string()),
        ("step_index", pa.int32()),
        ("namespace", pa.string()),
        ("cause", pa.string()),
        ("evidence", pa.string()),
    ]
)

__all__ = ["ExperienceStore", "DEFAULT_NAMESPACE", "datetime"]
