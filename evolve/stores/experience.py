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
from datetime import datetime
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
K = TypeVar("K", Skill, Guardrail)

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
        self._bm25: dict[str, tuple[int, BM25Index, np.ndarray, np.ndarray]] = {}
        self.conn = self._connect()
        self._init_schema()

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

    def _ensure_namespace(self, ns: str) -> None:
        self.conn.execute("INSERT INTO namespaces VALUES (?, ?) ON CONFLICT DO NOTHING", [ns, utcnow()])

    def list_namespaces(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT namespace FROM namespaces ORDER BY 1").fetchall()]

    def _check_namespace(self, ns: str) -> None:
        row = self._one("SELECT 1 FROM namespaces WHERE namespace = ?", [ns])
        if row is None:
            known = ", ".join(self.list_namespaces()) or "none"
            raise StoreError(
                f"unknown namespace '{ns}' (known: {known}); check the name or write to it first"
            )

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
        trows: dict[str, list[Any]] = {c: [] for c in _TRAJ_COLS}
        srows: dict[str, list[Any]] = {c: [] for c in _STEP_COLS}
        drows: dict[str, list[Any]] = {c: [] for c in _DIAG_COLS}
        for t in trajectories:
            ns = t.namespace or self.namespace
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
            prev: Step | None = None
            for s in t.steps:
                causes = s.diagnosis.cause_names() if s.diagnosis else []
                # A step's pre_state is almost always the previous post_state: store it once
                # (halves the serialisation cost, the bottleneck of ingest); _assemble restores it.
                if prev is not None and (s.pre_state is prev.post_state or s.pre_state == prev.post_state):
                    data, shared = s.model_dump_json(exclude=_PRE), True
                else:
                    data, shared = s.model_dump_json(), False
                prev = s
                srows["trajectory_id"].append(t.id)
                srows["idx"].append(s.index)
                srows["namespace"].append(ns)
                srows["action"].append(s.action.text)
                srows["observation"].append(s.post_state.text)
                srows["reward"].append(s.reward)
                srows["done"].append(s.done)
                srows["causes"].append(causes)
                srows["pre_shared"].append(shared)
                srows["data"].append(data)
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
            id_tbl = pa.table({"id": ids})
            self.conn.register("_ids", id_tbl)
            self.conn.execute("DELETE FROM steps WHERE trajectory_id IN (SELECT id FROM _ids)")
            self.conn.execute("DELETE FROM diagnoses WHERE trajectory_id IN (SELECT id FROM _ids)")
            self.conn.execute("DELETE FROM trajectories WHERE id IN (SELECT id FROM _ids)")
            self.conn.unregister("_ids")
            self._append("trajectories", pa.table(trows, schema=_TRAJ_SCHEMA))
            if srows["idx"]:
                self._append("steps", pa.table(srows, schema=_STEP_SCHEMA))
            if drows["cause"]:
                self._append("diagnoses", pa.table(drows, schema=_DIAG_SCHEMA))
        return len(ids)

    def _append(self, table: str, arrow: pa.Table) -> None:
        self.conn.register("_batch", arrow)
        try:
            self.conn.execute(f"INSERT INTO {table} SELECT * FROM _batch")
        finally:
            self.conn.unregister("_batch")

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
            where.append("list_contains(?, id)")
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
                    self.conn.execute(f"DELETE FROM {table} WHERE list_contains(?, id)", [dead])
                    self.conn.execute("DELETE FROM knowledge_versions WHERE list_contains(?, id)", [dead])
                    self.conn.execute(
                        "DELETE FROM vectors WHERE kind = ? AND list_contains(?, ref_id)", [kind, dead]
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
            ns = it.namespace or self.namespace
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
        with self.transaction():
            for ns in {r[1] for r in rows}:
                self._ensure_namespace(ns)
            ph = ",".join("?" * len(rows[0]))
            self.conn.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({ph})", rows)
            # History keeps one row per (id, version) so any version can be rolled back to.
            self.conn.executemany(
                "DELETE FROM knowledge_versions WHERE id = ? AND version = ?", [[h[0], h[2]] for h in hist]
            )
            self.conn.executemany("INSERT INTO knowledge_versions VALUES (?, ?, ?, ?, ?, ?)", hist)

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
        rows = [
            [
                e.id,
                e.namespace or self.namespace,
                e.kind.value,
                e.provenance,
                e.created_at,
                e.model_dump_json(),
            ]
            for e in examples
        ]
        with self.transaction():
            for ns in {r[1] for r in rows}:
                self._ensure_namespace(ns)
            self.conn.executemany("INSERT OR REPLACE INTO examples VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

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
        sql, params = "SELECT * FROM retrieval_log WHERE namespace = ?", [self._ns(namespace)]
        if trajectory_id:
            sql += " AND trajectory_id = ?"
            params.append(trajectory_id)
        cur = self.conn.execute(sql + " ORDER BY created_at, id", params)
        cols = [d[0] for d in cur.description]
        return [RetrievalLog.model_validate(dict(zip(cols, r))) for r in cur.fetchall()]

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
        sql = "SELECT id, namespace, status, job, created_at, updated_at FROM runs"
        params: list[Any] = []
        if namespace:
            sql += " WHERE namespace = ?"
            params.append(namespace)
        cur = self.conn.execute(sql + " ORDER BY created_at", params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def set_stage(self, run_id: str, stage: str, status: str, data: dict[str, Any] | None = None) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO run_stages VALUES (?, ?, ?, ?, ?)",
                [run_id, stage, status, json.dumps(data or {}, default=str), utcnow()],
            )

    def stages(self, run_id: str) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT stage, status, data, updated_at FROM run_stages WHERE run_id = ?", [run_id]
        ).fetchall()
        return {r[0]: {"status": r[1], "data": json.loads(r[2]), "updated_at": r[3]} for r in rows}

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
                        f"{p}:{n}: invalid {kind[:-1]} at '{loc}': {err['msg']}; nothing imported"
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
            start = int(
                self._one("SELECT min(v) FROM (SELECT nextval('vid_seq') AS v FROM range(?))", [n])[0]
            )
            vids = np.arange(start, start + n, dtype=np.int64)
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
                "DELETE FROM vectors WHERE kind = ? AND list_contains(?, ref_id)", [kind, list(ref_ids)]
            )
        self._invalidate(kind)

    def _invalidate(self, kind: str | None = None) -> None:
        for k in [kind] if kind else list(self._bm25):
            self._bm25.pop(k, None)

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
            self.sync_vectors(kind)
            n, mx, sm = self._db_index_state(kind)
            dim = self._dims(kind) or getattr(self._embedder, "dim", None) or 384
            idx = None if rebuild else self._indexes.get(kind)
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
                    vids, vecs = self._load_vectors(kind, min_vid=idx.max_vid + 1)
                    idx.add(vids, vecs)
                    changed = True
                else:
                    idx = None
            if idx is None:
                idx = VectorIndex(dim, self.hnsw_threshold)
                vids, vecs = self._load_vectors(kind)
                idx.build(vids, vecs)
                changed = True
            if path is not None and (changed or not path.exists()):
                idx.save(path)
            self._indexes[kind] = idx
            return idx

    def _load_vectors(self, kind: str, min_vid: int = 0) -> tuple[np.ndarray, np.ndarray]:
        tbl = self.conn.execute(
            "SELECT vid, vec FROM vectors WHERE kind = ? AND vid >= ? ORDER BY vid", [kind, min_vid]
        ).to_arrow_table()  # noqa
        vids = tbl.column("vid").to_numpy().astype(np.int64)
        if len(vids) == 0:
            return vids, np.zeros((0, self._dims(kind) or 1), dtype=np.float32)
        col = tbl.column("vec").combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return vids, flat.reshape(len(vids), -1)

    def _keyword(self, kind: str) -> tuple[BM25Index, np.ndarray, np.ndarray]:
        n, _, sm = self._db_index_state(kind)
        cached = self._bm25.get(kind)
        if cached and cached[0] == hash((n, sm)):
            return cached[1], cached[2], cached[3]
        rows = self.conn.execute(
            "SELECT vid, text FROM vectors WHERE kind = ? ORDER BY vid", [kind]
        ).fetchall()
        vids = np.array([r[0] for r in rows], dtype=np.int64)
        bm = BM25Index([r[1] or "" for r in rows])
        order = np.argsort(vids)
        self._bm25[kind] = (hash((n, sm)), bm, vids, order)
        return bm, vids, order

    def _allowed_vids(self, kind: str, ns: str, filters: dict[str, Any] | None) -> np.ndarray | None:
        filters = {k: v for k, v in (filters or {}).items() if v is not None}
        bad = set(filters) - _FILTERABLE.get(kind, set())
        if bad:
            allowed = ", ".join(sorted(_FILTERABLE.get(kind, set()))) or "none"
            raise StoreError(f"cannot filter {kind} on {', '.join(sorted(bad))}; filterable: {allowed}")
        where, params = ["v.kind = ?", "v.namespace = ?"], [kind, ns]
        join = ""
        if filters:
            table = _SOURCES[kind][0]
            join = f" JOIN {table} s ON s.id = v.ref_id"
            for col, val in filters.items():
                vals = _as_list(val.value if hasattr(val, "value") else val) or []
                vals = [x.value if hasattr(x, "value") else x for x in vals]
                where.append(f"s.{col} IN (" + ",".join("?" * len(vals)) + ")")
                params += vals
        rows = self.conn.execute(
            f"SELECT v.vid FROM vectors v{join} WHERE {' AND '.join(where)}", params
        ).fetchnumpy()
        return np.asarray(rows["vid"], dtype=np.int64)

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
        ns = self._ns(namespace)
        self._check_namespace(ns)
        if mode not in ("hybrid", "dense", "keyword"):
            raise StoreError(f"unknown search mode '{mode}'; use hybrid, dense or keyword")
        idx = self.vector_index(kind)
        allowed = self._allowed_vids(kind, ns, filters)
        if allowed is None or len(allowed) == 0:
            return []
        depth = max(k * 4, 20)
        dense: list[tuple[int, float]] = []
        kw: list[tuple[int, float]] = []
        if mode in ("hybrid", "dense"):
            q = self.embedder.embed([query])[0]
            # Namespace isolation is exact: only allowed vids can come back.
            dense = idx.search(q, depth, allowed=allowed if len(allowed) < idx.count else None)
        if mode in ("hybrid", "keyword"):
            bm, vids, _ = self._keyword(kind)
            mask = np.isin(vids, allowed)
            kw = [(int(vids[i]), s) for i, s in bm.search(query, depth, mask=mask)]
        fused: dict[int, float] = {}
        for lst in (dense, kw):
            for rank, (vid, _) in enumerate(lst):
                fused[vid] = fused.get(vid, 0.0) + 1.0 / (rrf_k + rank + 1)
        if mode == "dense":
            fused = {v: s for v, s in dense}
        elif mode == "keyword":
            fused = {v: s for v, s in kw}
        top = sorted(fused.items(), key=lambda x: -x[1])[:k]
        if not top:
            return []
        dmap, kmap = dict(dense), dict(kw)
        meta = {
            r[0]: r[1:]
            for r in self.conn.execute(
                "SELECT vid, ref_id, namespace, text FROM vectors WHERE list_contains(?, vid)",
                [[v for v, _ in top]],
            ).fetchall()
        }
        return [
            SearchHit(
                id=meta[v][0],
                kind=kind,
                namespace=meta[v][1],
                score=s,
                text=meta[v][2] or "",
                dense_score=dmap.get(v),
                keyword_score=kmap.get(v),
            )
            for v, s in top
            if v in meta
        ]

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
                if exc_type is None:
                    self.store.conn.execute("COMMIT")
                else:
                    self.store.conn.execute("ROLLBACK")
        finally:
            self.store._lock.release()


_PRE = {"pre_state"}
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
