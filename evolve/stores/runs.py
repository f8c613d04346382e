"""Run state: the pipeline's runs and their resumable stages."""

from __future__ import annotations

import json
from typing import Any

from evolve.schema import utcnow
from evolve.stores import tables as T
from evolve.stores._part import Part


class Runs(Part):
    def upsert(self, run_id: str, job: dict[str, Any], status: str, ns: str) -> None:
        now = utcnow()
        with self.store.transaction():
            self.store._ensure_namespace(ns)
            self.conn.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "status = excluded.status, job = excluded.job, updated_at = excluded.updated_at",
                [run_id, ns, status, json.dumps(job, default=str), now, now],
            )

    def select(self, ns: str | None) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, namespace, status, job, epoch_us(created_at) AS created_at, "
            "epoch_us(updated_at) AS updated_at FROM runs"
        )
        params: list[Any] = []
        if ns:
            sql += " WHERE namespace = ?"
            params.append(ns)
        cur = self.conn.execute(sql + " ORDER BY created_at", params)
        cols = [d[0] for d in cur.description]
        out = [dict(zip(cols, r)) for r in cur.fetchall()]
        for r in out:
            r["created_at"], r["updated_at"] = T.utc(r["created_at"]), T.utc(r["updated_at"])
        return out

    def set_stage(self, run_id: str, stage: str, status: str, data: dict[str, Any] | None) -> None:
        with self.store.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO run_stages VALUES (?, ?, ?, ?, ?)",
                [run_id, stage, status, json.dumps(data or {}, default=str), utcnow()],
            )

    def stages(self, run_id: str) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT stage, status, data, epoch_us(updated_at) FROM run_stages WHERE run_id = ?", [run_id]
        ).fetchall()
        return {r[0]: {"status": r[1], "data": json.loads(r[2]), "updated_at": T.utc(r[3])} for r in rows}

    def reset_stages(self, run_id: str) -> None:
        with self.store.transaction():
            self.conn.execute("DELETE FROM run_stages WHERE run_id = ?", [run_id])
