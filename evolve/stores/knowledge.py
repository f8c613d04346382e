"""Skills and guardrails: current rows, every version in ``knowledge_versions``, usage write-back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from evolve.errors import StoreError
from evolve.schema import Guardrail, Knowledge, KnowledgeStatus, Skill, utcnow
from evolve.stores import tables as T
from evolve.stores._part import Part

K = TypeVar("K", Skill, Guardrail)
_TABLE: dict[str, T.Table] = {"skill": T.SKILLS, "guardrail": T.GUARDRAILS}
_CLS: dict[str, type[Skill] | type[Guardrail]] = {"skill": Skill, "guardrail": Guardrail}


class KnowledgeTables(Part):
    def upsert(self, items: Sequence[Knowledge]) -> None:
        """Write skills and/or guardrails as current and record each ``(id, version)`` in history."""
        if not items:
            return
        now = utcnow()
        rows: dict[str, dict[str, list]] = {"skill": {}, "guardrail": {}}  # kind -> id -> row
        hist: dict[tuple[str, int], list] = {}
        for it in items:
            it, ns = self.store._own(it)
            data = it.model_dump_json()
            row = [it.id, ns, it.env]
            if isinstance(it, Skill):
                row += [it.name]
            elif isinstance(it, Guardrail):
                row += [it.root_cause.value, it.scope.value]
            else:
                raise StoreError(
                    f"cannot store knowledge of type {type(it).__name__}; give a Skill or Guardrail"
                )
            row += [
                it.status.value,
                it.signature,
                it.version,
                it.stats.confidence,
                it.provenance,
                now,
                it.text(),
                data,
            ]
            # One row per key, the last one winning, as a sequence of single upserts would leave it.
            rows[it.kind][it.id] = row
            hist[(it.id, it.version)] = [it.id, it.kind, it.version, ns, now, data]
        with self.store.transaction():
            for ns in {r[1] for by_id in rows.values() for r in by_id.values()}:
                self.store._ensure_namespace(ns)
            for kind, by_id in rows.items():
                if not by_id:
                    continue
                table = _TABLE[kind]
                # Bulk delete + Arrow append: executemany costs milliseconds per row in DuckDB.
                self.conn.execute(
                    f"DELETE FROM {table.name} WHERE id IN (SELECT unnest(?::VARCHAR[]))", [list(by_id)]
                )
                self.append(table, table.from_rows(by_id.values()))
            # History keeps one row per (id, version) so any version can be rolled back to.
            self.conn.execute(
                """DELETE FROM knowledge_versions k WHERE EXISTS (
                    SELECT 1 FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::INTEGER[]) AS version) b
                    WHERE b.id = k.id AND b.version = k.version)""",
                [[h[0] for h in hist.values()], [h[2] for h in hist.values()]],
            )
            self.append(T.KNOWLEDGE_VERSIONS, T.KNOWLEDGE_VERSIONS.from_rows(hist.values()))

    def select(
        self,
        kind: str,
        cls: type[K],
        ns: str,
        status: str | KnowledgeStatus | Iterable[str | KnowledgeStatus] | None,
        env: str | None,
    ) -> list[K]:
        where, params = ["namespace = ?"], [ns]
        if status is not None:
            st = [status] if isinstance(status, (str, KnowledgeStatus)) else list(status)
            st = [s.value if isinstance(s, KnowledgeStatus) else s for s in st]
            if st:
                where.append("status IN (" + ",".join("?" * len(st)) + ")")
                params += st
        if env:
            where.append("env = ?")
            params.append(env)
        rows = self.conn.execute(
            f"SELECT data FROM {_TABLE[kind].name} WHERE {' AND '.join(where)} ORDER BY id", params
        ).fetchall()
        return [cls.model_validate_json(r[0]) for r in rows]

    def get(self, knowledge_id: str, ns: str) -> Skill | Guardrail:
        for kind, table in _TABLE.items():
            row = self.one(
                f"SELECT data FROM {table.name} WHERE id = ? AND namespace = ?", [knowledge_id, ns]
            )
            if row:
                return _CLS[kind].model_validate_json(row[0])
        raise StoreError(f"no skill or guardrail '{knowledge_id}' in namespace '{ns}'")

    def versions(self, knowledge_id: str) -> list[int]:
        rows = self.conn.execute(
            "SELECT version FROM knowledge_versions WHERE id = ? ORDER BY version", [knowledge_id]
        ).fetchall()
        return [r[0] for r in rows]

    def rollback(self, knowledge_id: str, version: int, ns: str) -> Skill | Guardrail:
        row = self.one(
            "SELECT kind, data FROM knowledge_versions WHERE id = ? AND version = ? AND namespace = ?",
            [knowledge_id, version, ns],
        )
        if row is None:
            have = self.versions(knowledge_id)
            raise StoreError(f"'{knowledge_id}' has no version {version} (versions: {have or 'none'})")
        kind, data = row
        item = _CLS[kind].model_validate_json(data)
        item.version = max(self.versions(knowledge_id)) + 1
        self.upsert([item])
        return item

    def record_usage(
        self,
        usage: Mapping[str, tuple[int, int, int]],
        effects: Mapping[str, float],
        ns: str,
    ) -> int:
        ids = sorted(set(usage) | set(effects))
        if not ids:
            return 0
        with self.store.transaction():
            current: dict[str, Skill | Guardrail] = {}
            for kind, table in _TABLE.items():
                for (data,) in self.conn.execute(
                    f"SELECT data FROM {table.name} WHERE namespace = ? AND id IN (SELECT unnest(?::VARCHAR[]))",
                    [ns, ids],
                ).fetchall():
                    it = _CLS[kind].model_validate_json(data)
                    current[it.id] = it
            latest = dict(
                self.conn.execute(
                    "SELECT id, max(version) FROM knowledge_versions WHERE id IN (SELECT unnest(?::VARCHAR[])) "
                    "GROUP BY id",
                    [list(current)],
                ).fetchall()
            )
            out: list[Knowledge] = []
            for kid, it in current.items():
                u, s, f = usage.get(kid, (0, 0, 0))
                if (u, s, f) == (0, 0, 0) and kid not in effects:
                    continue  # nothing to record: no new version
                st = it.stats.model_copy(
                    update={
                        "uses": it.stats.uses + int(u),
                        "successes": it.stats.successes + int(s),
                        "failures": it.stats.failures + int(f),
                    }
                )
                if kid in effects:
                    st.effect = float(effects[kid])
                version = max(it.version, latest.get(kid) or 0) + 1
                out.append(it.model_copy(update={"stats": st, "version": version}))
            self.upsert(out)
        return len(out)
