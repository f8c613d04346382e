"""Training examples, and the teacher log-prob cache the trainer fills (prompt hash -> top-k)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from evolve.schema import TeacherLogprobs, TrainingExample, utcnow
from evolve.stores import tables as T
from evolve.stores._part import Part

_PAD_ID = -1  # pads positions whose top-k list is shorter than the longest one


class Examples(Part):
    def add(self, examples: Sequence[TrainingExample]) -> int:
        if not examples:
            return 0
        rows = {
            e.id: (e.id, ns, e.kind.value, e.provenance, e.created_at, e.model_dump_json())
            for e, ns in map(self.store._own, examples)
        }  # one row per id, the last one winning
        with self.store.transaction():
            for ns in {r[1] for r in rows.values()}:
                self.store._ensure_namespace(ns)
            self.conn.execute("DELETE FROM examples WHERE id IN (SELECT unnest(?::VARCHAR[]))", [list(rows)])
            self.append(T.EXAMPLES, T.EXAMPLES.from_rows(rows.values()))
        return len(examples)

    def select(self, ns: str, kind: str | None = None) -> list[TrainingExample]:
        sql, params = "SELECT data FROM examples WHERE namespace = ?", [ns]
        if kind:
            sql += " AND kind = ?"
            params.append(kind)
        return [
            TrainingExample.model_validate_json(r[0])
            for r in self.conn.execute(sql + " ORDER BY id", params).fetchall()
        ]

    # ------------------------------------------------------------------ teacher log-prob cache
    def put_teacher_logprobs(self, items: Sequence[TeacherLogprobs]) -> int:
        if not items:
            return 0
        rows = {(t.prompt_hash, t.teacher): _pack(t) for t in items}  # the last one per key wins
        with self.store.transaction():
            self.conn.execute(
                """DELETE FROM teacher_logprobs t WHERE EXISTS (
                    SELECT 1 FROM (SELECT unnest(?::VARCHAR[]) AS h, unnest(?::VARCHAR[]) AS teacher) b
                    WHERE b.h = t.prompt_hash AND b.teacher = t.teacher)""",
                [[k[0] for k in rows], [k[1] for k in rows]],
            )
            self.append(T.TEACHER_LOGPROBS, T.TEACHER_LOGPROBS.from_rows(rows.values()))
        return len(rows)

    def get_teacher_logprobs(self, prompt_hashes: Iterable[str], teacher: str) -> dict[str, TeacherLogprobs]:
        hashes = list(dict.fromkeys(prompt_hashes))
        if not hashes or self.store.schema_version < 2:  # an older store opened read-only has no cache
            return {}
        rows = self.conn.execute(
            "SELECT prompt_hash, positions, k, token_ids, logprobs, tail_logprob, epoch_us(created_at) "
            "FROM teacher_logprobs WHERE teacher = ? AND prompt_hash IN (SELECT unnest(?::VARCHAR[]))",
            [teacher, hashes],
        ).fetchall()
        return {r[0]: _unpack(teacher, *r) for r in rows}


def _pack(t: TeacherLogprobs) -> tuple:
    """One row: ids as int32 bytes, log-probs and tail as float16 bytes, ``[positions, k]`` row-major."""
    n = len(t.token_ids)
    if len(t.logprobs) != n or (t.tail_logprob and len(t.tail_logprob) != n):
        raise ValueError(
            f"teacher log-probs for '{t.prompt_hash}': {n} positions of ids but {len(t.logprobs)} of "
            f"log-probs and {len(t.tail_logprob)} tail values; they must have one entry per position"
        )
    k = max((len(r) for r in t.token_ids), default=0)
    ids = np.full((n, k), _PAD_ID, dtype=np.int32)
    lp = np.full((n, k), -np.inf, dtype=np.float16)
    for i, (ri, rl) in enumerate(zip(t.token_ids, t.logprobs)):
        if len(ri) != len(rl):
            raise ValueError(
                f"teacher log-probs for '{t.prompt_hash}', position {i}: {len(ri)} ids, {len(rl)} log-probs"
            )
        ids[i, : len(ri)] = ri
        lp[i, : len(rl)] = rl
    tail = np.asarray(t.tail_logprob, dtype=np.float16)
    return (
        t.prompt_hash,
        t.teacher,
        n,
        k,
        ids.astype("<i4").tobytes(),
        lp.astype("<f2").tobytes(),
        tail.astype("<f2").tobytes(),
        t.created_at or utcnow(),
    )


def _unpack(
    teacher: str, h: str, n: int, k: int, ids: bytes, lp: bytes, tail: bytes, created_us: int | None
) -> TeacherLogprobs:
    idm = np.frombuffer(ids, dtype="<i4").reshape(n, k)
    lpm = np.frombuffer(lp, dtype="<f2").reshape(n, k).astype(np.float32)
    keep = idm != _PAD_ID
    return TeacherLogprobs(
        prompt_hash=h,
        teacher=teacher,
        token_ids=[row[m].tolist() for row, m in zip(idm, keep)],
        logprobs=[row[m].tolist() for row, m in zip(lpm, keep)],
        tail_logprob=np.frombuffer(tail, dtype="<f2").astype(np.float32).tolist(),
        created_at=T.utc(created_us) or utcnow(),
    )
