"""Trained students: one row per checkpoint, with its lineage (the examples and trajectories it
was trained on), its probation status and whether a trajectory it learned from was deleted since.

``status`` and ``stale`` live in their own columns and are the truth (the trajectory delete cascade
flips ``stale`` in SQL); ``data`` holds the rest of the :class:`~evolve.schema.Checkpoint`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from evolve.errors import StoreError
from evolve.schema import Checkpoint, CheckpointStatus, utcnow
from evolve.stores import tables as T
from evolve.stores._part import Part

_SINCE = 3
"""The store schema version that added the table (an older store opened read-only has none)."""


class Checkpoints(Part):
    def add(self, ckpt: Checkpoint) -> Checkpoint:
        ckpt, ns = self.store._own(ckpt)
        ckpt = ckpt.model_copy(update={"updated_at": utcnow()})
        with self.store.transaction():
            self.store._ensure_namespace(ns)
            self.conn.execute("DELETE FROM checkpoints WHERE id = ?", [ckpt.id])
            self.append(T.CHECKPOINTS, T.CHECKPOINTS.from_rows([_row(ckpt, ns)]))
        return ckpt

    def select(
        self,
        ns: str,
        run_id: str | None = None,
        policy: str | None = None,
        status: str | Iterable[str] | None = None,
        ids: Iterable[str] | None = None,
    ) -> list[Checkpoint]:
        if self.store.schema_version < _SINCE:
            return []
        where, params = ["namespace = ?"], [ns]
        for col, val in (("run_id", run_id), ("policy", policy)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        statuses = T.as_list(None if status is None else _values(status))
        if statuses:
            where.append("status IN (SELECT unnest(?::VARCHAR[]))")
            params.append(statuses)
        if ids is not None:
            where.append("id IN (SELECT unnest(?::VARCHAR[]))")
            params.append(list(ids))
        rows = self.conn.execute(
            f"SELECT status, stale, data FROM checkpoints WHERE {' AND '.join(where)} ORDER BY created_at, id",
            params,
        ).fetchall()
        return [
            Checkpoint.model_validate_json(data).model_copy(
                update={"status": CheckpointStatus(status), "stale": bool(stale)}
            )
            for status, stale, data in rows
        ]

    def get(self, ckpt_id: str, ns: str) -> Checkpoint:
        found = self.select(ns, ids=[ckpt_id])
        if not found:
            raise StoreError(f"no checkpoint '{ckpt_id}' in namespace '{ns}'")
        return found[0]

    def update(
        self,
        ckpt_id: str,
        ns: str,
        *,
        status: str | CheckpointStatus | None = None,
        reason: str | None = None,
        metrics: dict[str, Any] | None = None,
        stale: bool | None = None,
    ) -> Checkpoint:
        """Change a checkpoint's status, reason, metrics (merged into the old ones) or stale flag."""
        with self.store.transaction():
            old = self.get(ckpt_id, ns)
            upd: dict[str, Any] = {"updated_at": utcnow()}
            if status is not None:
                upd["status"] = CheckpointStatus(status)
            if reason is not None:
                upd["reason"] = reason
            if metrics is not None:
                upd["metrics"] = {**old.metrics, **metrics}
            if stale is not None:
                upd["stale"] = stale
            new = old.model_copy(update=upd)
            self.conn.execute("DELETE FROM checkpoints WHERE id = ?", [ckpt_id])
            self.append(T.CHECKPOINTS, T.CHECKPOINTS.from_rows([_row(new, ns)]))
        return new

    def mark_stale(self, trajectory_id: str, ns: str) -> int:
        """Flag the checkpoints trained on ``trajectory_id`` (inside the caller's transaction)."""
        if self.store.schema_version < _SINCE:
            return 0
        where = "FROM checkpoints WHERE namespace = ? AND NOT stale AND list_contains(trajectory_ids, ?)"
        row = self.one(f"SELECT count(*) {where}", [ns, trajectory_id])
        n = int(row[0]) if row else 0
        if n:
            self.conn.execute(
                "UPDATE checkpoints SET stale = true, updated_at = ? "
                "WHERE namespace = ? AND list_contains(trajectory_ids, ?)",
                [utcnow(), ns, trajectory_id],
            )
        return n


def _values(status: str | Iterable[str]) -> list[str]:
    items = [status] if isinstance(status, str) else list(status)
    return [CheckpointStatus(s).value for s in items]


def _row(c: Checkpoint, ns: str) -> tuple[Any, ...]:
    return (
        c.id,
        ns,
        c.run_id,
        c.policy,
        c.status.value,
        c.stale,
        c.path,
        c.base_model,
        c.method,
        c.example_ids,
        c.trajectory_ids,
        c.created_at,
        c.updated_at,
        c.model_dump_json(),
    )
