"""Trajectories, their steps and diagnoses: batched Arrow ingest, assembly, filters, deletes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from evolve.errors import StoreError
from evolve.schema import Step, Trajectory
from evolve.stores import tables as T
from evolve.stores._part import Part

_PRE = {"pre_state"}
_STEP_JSON = Step.__pydantic_serializer__.to_json


def traj_summary(t: Trajectory) -> str:
    """Text that represents an episode for retrieval (goal, outcome, what was done)."""
    acts = "; ".join([s.action.text for s in t.steps[:40]])
    summ = t.metadata.get("summary") if isinstance(t.metadata.get("summary"), str) else ""
    return f"{t.goal} | {t.outcome.value} score {t.score:g} | {summ} | actions: {acts}"[:2000]


def _utf8_column(chunks: list[bytes]) -> pa.Array | list[bytes]:
    """A string column from UTF-8 bytes in one copy: pyarrow's per-value conversion (and its
    UTF-8 check, needless for the serializer's output) cost ~1 us a step at ingest."""
    lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31 - 1:
        return chunks  # over pa.string()'s 32-bit offsets: let pyarrow convert (and fail clearly)
    bufs = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(chunks))]
    return pa.Array.from_buffers(pa.string(), len(chunks), bufs)


_Tables = tuple[pa.Table, pa.Table | None, pa.Table | None]


def _columns(owned: Sequence[tuple[Trajectory, str]]) -> _Tables:
    """The trajectories, steps and diagnoses rows of ``owned`` as Arrow tables, built column-wise
    before the transaction begins (no database work, so no lock is held meanwhile)."""
    trows: dict[str, list[Any]] = {c: [] for c in T.TRAJECTORIES.names}
    data: list[bytes] = []
    srows: dict[str, list[Any]] = {c: [] for c in T.STEPS.names if c != "data"}
    drows: dict[str, list[Any]] = {c: [] for c in T.DIAGNOSES.names}
    for t, ns in owned:
        row = (
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
            traj_summary(t),
            t.model_dump_json(exclude={"steps"}),
        )
        for c, v in zip(T.TRAJECTORIES.names, row):
            trows[c].append(v)
        steps, m = t.steps, len(t.steps)
        # A step's pre_state is almost always the previous post_state: store it once
        # (halves the serialisation cost, the bottleneck of ingest); assemble restores it.
        shared = [False] * min(m, 1) + [
            b.pre_state is a.post_state or b.pre_state == a.post_state for a, b in zip(steps, steps[1:])
        ]
        # Column-wise comprehensions and the serializer itself (model_dump_json adds ~10% per
        # call); its bytes go to Arrow as they are.
        data += [_STEP_JSON(s, exclude=_PRE) if sh else _STEP_JSON(s) for s, sh in zip(steps, shared)]
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
                    for c, v in zip(T.DIAGNOSES.names, (t.id, s.index, ns, ce.cause.value, ce.evidence)):
                        drows[c].append(v)
        if t.diagnosis:
            for ce in t.diagnosis.causes:
                for c, v in zip(T.DIAGNOSES.names, (t.id, -1, ns, ce.cause.value, ce.evidence)):
                    drows[c].append(v)
    steps_tbl = T.STEPS.arrow({**srows, "data": _utf8_column(data)}) if data else None
    diag_tbl = T.DIAGNOSES.arrow(drows) if drows["cause"] else None
    return T.TRAJECTORIES.arrow(trows), steps_tbl, diag_tbl


class Trajectories(Part):
    def add(self, trajectories: Sequence[Trajectory]) -> int:
        """Write ``trajectories`` (replacing stored ones by id) in one transaction."""
        if not trajectories:
            return 0
        # One row per id: a later duplicate in the same batch replaces an earlier one.
        owned = [self.store._own(t) for t in {t.id: t for t in trajectories}.values()]
        ids = [t.id for t, _ in owned]
        tables = _columns(owned)
        with self.store.transaction():
            for ns in dict.fromkeys(ns for _, ns in owned):
                self.store._ensure_namespace(ns)
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
            self._insert(tables)
        return len(ids)

    def _insert(self, tables: _Tables) -> None:
        for spec, tbl in zip((T.TRAJECTORIES, T.STEPS, T.DIAGNOSES), tables):
            if tbl is not None:
                self.append(spec, tbl)

    def get(self, trajectory_id: str, ns: str) -> Trajectory:
        row = self.one("SELECT data FROM trajectories WHERE id = ? AND namespace = ?", [trajectory_id, ns])
        if row is None:
            raise StoreError(f"no trajectory '{trajectory_id}' in namespace '{ns}'")
        return self.assemble([(trajectory_id, row[0])])[0]

    def assemble(self, heads: list[tuple[str, str]]) -> list[Trajectory]:
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

    @staticmethod
    def where(
        ns: str,
        env: str | None = None,
        split: str | None = None,
        outcome: str | Iterable[str] | None = None,
        run_id: str | None = None,
        arm: str | None = None,
        ids: Iterable[str] | None = None,
    ) -> tuple[str, list[Any]]:
        where, params = ["namespace = ?"], [ns]
        for col, val in (("env", env), ("split", split), ("run_id", run_id), ("arm", arm)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        outs = T.as_list(outcome)
        if outs:
            where.append("outcome IN (" + ",".join("?" * len(outs)) + ")")
            params += outs
        if ids is not None:
            where.append("id IN (SELECT unnest(?::VARCHAR[]))")  # a hash join, not a list scan per row
            params.append(list(ids))
        return " AND ".join(where), params

    def select(self, where: str, params: list[Any], limit: int | None = None) -> list[Trajectory]:
        sql = f"SELECT id, data FROM trajectories WHERE {where} ORDER BY created_at, id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self.assemble(self.conn.execute(sql, params).fetchall())

    def count(self, where: str, params: list[Any]) -> int:
        row = self.one(f"SELECT count(*) FROM trajectories WHERE {where}", params)
        return int(row[0]) if row else 0

    def done_episodes(
        self, where: str, params: list[Any], include_errors: bool
    ) -> set[tuple[str, int | None]]:
        if not include_errors:
            where += " AND outcome <> 'error'"
        rows = self.conn.execute(f"SELECT task_id, seed FROM trajectories WHERE {where}", params).fetchall()
        return {(r[0], r[1]) for r in rows}

    def delete(self, trajectory_id: str, ns: str) -> dict[str, int]:
        """Delete a trajectory and, through provenance, the knowledge and examples distilled from it;
        checkpoints trained on it are marked stale."""
        counts: dict[str, int] = {}
        with self.store.transaction():
            for table, col in (
                ("steps", "trajectory_id"),
                ("diagnoses", "trajectory_id"),
                ("retrieval_log", "trajectory_id"),
                ("trajectories", "id"),
            ):
                counts[table] = self.delete_count(
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
            # Weights cannot forget one episode: checkpoints trained on it stay, flagged stale.
            counts["checkpoints_stale"] = self.store._checkpoints.mark_stale(trajectory_id, ns)
        return counts
