"""Retrieval logs: what was retrieved for a step, with its scores (the reranker's training data)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evolve.schema import RetrievalLog
from evolve.stores import tables as T
from evolve.stores._part import Part

_TIMES = {"created_at"}
_SINCE_2 = {"query", "rank", "similarity", "rerank_score"}


class RetrievalLogs(Part):
    def add(self, logs: Sequence[RetrievalLog]) -> None:
        if not logs:
            return
        cols = T.RETRIEVAL_LOG.names
        rows = [[getattr(r, c) for c in cols] for r in logs]
        with self.store.transaction():
            self.append(T.RETRIEVAL_LOG, T.RETRIEVAL_LOG.from_rows(rows))

    def select(self, ns: str, trajectory_id: str | None = None) -> list[RetrievalLog]:
        # Timestamps come back as epoch microseconds (see tables.utc).
        old = self.store.schema_version < 2  # an older store opened read-only lacks the new columns
        cols = [
            f"epoch_us({c}) AS {c}" if c in _TIMES else f"NULL AS {c}" if old and c in _SINCE_2 else c
            for c in T.RETRIEVAL_LOG.names
        ]
        sql = f"SELECT {', '.join(cols)} FROM retrieval_log WHERE namespace = ?"
        params: list[Any] = [ns]
        if trajectory_id:
            sql += " AND trajectory_id = ?"
            params.append(trajectory_id)
        cur = self.conn.execute(sql + " ORDER BY created_at, id", params)
        names = [d[0] for d in cur.description]
        out = []
        for r in cur.fetchall():
            d = dict(zip(names, r))
            d["created_at"] = T.utc(d["created_at"])
            d["query"] = d["query"] or ""  # rows written before schema 2 have none
            out.append(RetrievalLog.model_validate(d))
        return out
