"""Every table of the store, declared once: the DDL, the Arrow schema and the column list come from it.

A column's DuckDB type decides its Arrow type (:data:`_ARROW`), so the two can never disagree.
Columns added in a later store schema version go at the *end* of their table: ``ALTER TABLE ...
ADD COLUMN`` appends, so old and new files then have the same column order (see :func:`migrate`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import duckdb
import pyarrow as pa

STORE_SCHEMA_VERSION = 3
"""Version of the store's tables (not of the pydantic models). 2: retrieval_log gained query, rank,
similarity, rerank_score; the teacher_logprobs table. 3: the checkpoints table."""

_TS = pa.timestamp("us", tz="UTC")
_ARROW: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "DOUBLE": pa.float64(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMPTZ": _TS,
    "VARCHAR[]": pa.list_(pa.string()),
    "FLOAT[]": pa.list_(pa.float32()),
    "BLOB": pa.binary(),
}


@dataclass(frozen=True)
class Table:
    """One table: ``columns`` are ``(name, DuckDB type)`` pairs, in their order on disk."""

    name: str
    columns: tuple[tuple[str, str], ...]
    primary_key: tuple[str, ...] = ()
    zstd: tuple[str, ...] = ()
    """Columns stored with ZSTD instead of DuckDB's analysed choice (long JSON text: at ingest
    ZSTD halves the checkpoint's time and the file's size against dictionary/FSST)."""

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([(c, _ARROW[t]) for c, t in self.columns])

    def ddl(self) -> str:
        cols = [f"{c} {t}" + (" USING COMPRESSION zstd" if c in self.zstd else "") for c, t in self.columns]
        if len(self.primary_key) == 1:
            i = self.names.index(self.primary_key[0])
            cols[i] += " PRIMARY KEY"
        elif self.primary_key:
            cols.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(cols)})"

    def arrow(self, columns: Mapping[str, Sequence[Any] | pa.Array]) -> pa.Table:
        """An Arrow table of this schema from column-wise values (every column must be given)."""
        return pa.table({c: columns[c] for c in self.names}, schema=self.schema)

    def from_rows(self, rows: Iterable[Sequence[Any]]) -> pa.Table:
        """An Arrow table of this schema from rows in column order."""
        cols = list(zip(*rows))
        if not cols:
            return self.schema.empty_table()
        return self.arrow(dict(zip(self.names, cols)))


def _t(name: str, spec: str, primary_key: tuple[str, ...] = (), zstd: tuple[str, ...] = ()) -> Table:
    cols = []
    for part in spec.split(","):
        col, typ = part.split()
        cols.append((col, typ))
    return Table(name, tuple(cols), primary_key, zstd)


_KNOWLEDGE_TAIL = (
    "status VARCHAR, signature VARCHAR, version INTEGER, confidence DOUBLE, provenance VARCHAR[], "
    "updated_at TIMESTAMPTZ, text VARCHAR, data JSON"
)

META = _t("evolve_meta", "key VARCHAR, value VARCHAR", ("key",))
NAMESPACES = _t("namespaces", "namespace VARCHAR, created_at TIMESTAMPTZ", ("namespace",))
TRAJECTORIES = _t(
    "trajectories",
    "id VARCHAR, namespace VARCHAR, run_id VARCHAR, task_id VARCHAR, env VARCHAR, split VARCHAR, "
    "policy VARCHAR, arm VARCHAR, outcome VARCHAR, score DOUBLE, max_score DOUBLE, n_steps INTEGER, "
    "seed BIGINT, created_at TIMESTAMPTZ, summary VARCHAR, data VARCHAR",
    ("id",),
    zstd=("data",),
)
# ``data`` of trajectories and steps is VARCHAR holding JSON, not DuckDB's JSON type: the text
# comes from pydantic's serializer (valid by construction) and the JSON type would parse every
# step again on insert, ~40% of DuckDB's share of ingest. Stores created before keep JSON columns.
STEPS = _t(
    "steps",
    "trajectory_id VARCHAR, idx INTEGER, namespace VARCHAR, action VARCHAR, observation VARCHAR, "
    "reward DOUBLE, done BOOLEAN, causes VARCHAR[], pre_shared BOOLEAN, data VARCHAR",
    zstd=("observation", "data"),
)
DIAGNOSES = _t(
    "diagnoses",
    "trajectory_id VARCHAR, step_index INTEGER, namespace VARCHAR, cause VARCHAR, evidence VARCHAR",
)
SKILLS = _t("skills", f"id VARCHAR, namespace VARCHAR, env VARCHAR, name VARCHAR, {_KNOWLEDGE_TAIL}", ("id",))
GUARDRAILS = _t(
    "guardrails",
    f"id VARCHAR, namespace VARCHAR, env VARCHAR, root_cause VARCHAR, scope VARCHAR, {_KNOWLEDGE_TAIL}",
    ("id",),
)
KNOWLEDGE_VERSIONS = _t(
    "knowledge_versions",
    "id VARCHAR, kind VARCHAR, version INTEGER, namespace VARCHAR, created_at TIMESTAMPTZ, data JSON",
)
EXAMPLES = _t(
    "examples",
    "id VARCHAR, namespace VARCHAR, kind VARCHAR, provenance VARCHAR[], created_at TIMESTAMPTZ, data JSON",
    ("id",),
)
TEACHER_LOGPROBS = _t(
    "teacher_logprobs",
    # ids: int32 bytes, logprobs: float16 bytes, both [positions, k] row-major; tail: float16 [positions].
    "prompt_hash VARCHAR, teacher VARCHAR, positions INTEGER, k INTEGER, token_ids BLOB, logprobs BLOB, "
    "tail_logprob BLOB, created_at TIMESTAMPTZ",
    ("prompt_hash", "teacher"),
)
RETRIEVAL_LOG = _t(
    "retrieval_log",
    "id VARCHAR, namespace VARCHAR, trajectory_id VARCHAR, step_index INTEGER, knowledge_id VARCHAR, "
    "kind VARCHAR, score DOUBLE, applicable BOOLEAN, injected BOOLEAN, reason VARCHAR, outcome VARCHAR, "
    "created_at TIMESTAMPTZ, query VARCHAR, rank INTEGER, similarity DOUBLE, rerank_score DOUBLE",
)
RUNS = _t(
    "runs",
    "id VARCHAR, namespace VARCHAR, status VARCHAR, job JSON, created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ",
    ("id",),
)
RUN_STAGES = _t(
    "run_stages",
    "run_id VARCHAR, stage VARCHAR, status VARCHAR, data JSON, updated_at TIMESTAMPTZ",
    ("run_id", "stage"),
)
CHECKPOINTS = _t(
    "checkpoints",
    # status and stale are the truth (a trajectory delete flips stale in SQL); data holds the rest.
    "id VARCHAR, namespace VARCHAR, run_id VARCHAR, policy VARCHAR, status VARCHAR, stale BOOLEAN, "
    "path VARCHAR, base_model VARCHAR, method VARCHAR, example_ids VARCHAR[], trajectory_ids VARCHAR[], "
    "created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ, data JSON",
    ("id",),
)
VECTORS = _t(
    "vectors",
    "vid BIGINT, kind VARCHAR, ref_id VARCHAR, namespace VARCHAR, model VARCHAR, text VARCHAR, vec FLOAT[]",
)

TABLES: tuple[Table, ...] = (
    META,
    NAMESPACES,
    TRAJECTORIES,
    STEPS,
    DIAGNOSES,
    SKILLS,
    GUARDRAILS,
    KNOWLEDGE_VERSIONS,
    EXAMPLES,
    TEACHER_LOGPROBS,
    RETRIEVAL_LOG,
    RUNS,
    RUN_STAGES,
    CHECKPOINTS,
    VECTORS,
)
NAMESPACED: tuple[str, ...] = tuple(t.name for t in TABLES if "namespace" in t.names)
"""Tables whose rows belong to one namespace (deleted with it)."""
SEQUENCES = ("CREATE SEQUENCE IF NOT EXISTS vid_seq START 1",)
SCHEMA_HASH = hashlib.sha256("\n".join([*(t.ddl() for t in TABLES), *SEQUENCES]).encode()).hexdigest()[:16]
"""Fingerprint of every table spec: a store whose ``evolve_meta`` records it needs no migration
check at open (that check reads ``information_schema``, the largest part of opening a store)."""


def create_all(conn: duckdb.DuckDBPyConnection) -> None:
    # One call for every statement: each separate call costs a round trip through the binder.
    conn.execute(";\n".join([*(t.ddl() for t in TABLES), *SEQUENCES]))


def migrate(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """Bring an older store up to :data:`STORE_SCHEMA_VERSION`: missing tables are created and
    missing columns added (at the end, where the spec declares them). Returns what was added."""
    create_all(conn)
    have: dict[str, set[str]] = {}
    for table, column in conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_catalog = current_database()"
    ).fetchall():
        have.setdefault(table, set()).add(column)
    added = []
    for t in TABLES:
        for col, typ in t.columns:
            if col not in have.get(t.name, set()):
                conn.execute(f"ALTER TABLE {t.name} ADD COLUMN {col} {typ}")
                added.append(f"{t.name}.{col}")
    return added


def append(conn: duckdb.DuckDBPyConnection, table: Table, arrow: pa.Table) -> None:
    """Insert an Arrow table into ``table`` by column name (bulk: executemany costs ms per row)."""
    conn.from_arrow(arrow.select(table.names)).insert_into(table.name)


def one(conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
    # fetchall, not fetchone: DuckDB refuses new work while a result is only partly fetched.
    rows = conn.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def as_list(x: str | Iterable[str] | None) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def utc(us: int | None) -> datetime | None:
    """A TIMESTAMPTZ read as ``epoch_us(col)``: fetching the column itself would need pytz."""
    return None if us is None else _EPOCH + timedelta(microseconds=us)


__all__ = [
    "NAMESPACED",
    "SCHEMA_HASH",
    "STORE_SCHEMA_VERSION",
    "TABLES",
    "Table",
    "append",
    "as_list",
    "create_all",
    "migrate",
    "one",
    "utc",
]
