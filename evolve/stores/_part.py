"""What every table-family part of :class:`~evolve.stores.experience.ExperienceStore` shares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from evolve.stores import tables as T

if TYPE_CHECKING:
    from evolve.stores.experience import ExperienceStore


class Part:
    """A table family behind the façade: it reads the façade's connection, namespaces and
    transactions at call time (the façade owns them; a closed store has no connection)."""

    def __init__(self, store: ExperienceStore):
        self.store = store

    @property
    def conn(self) -> duckdb.DuckDBPyConnection:
        return self.store.conn

    def one(self, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
        return T.one(self.conn, sql, params)

    def append(self, table: T.Table, arrow: pa.Table) -> None:
        T.append(self.conn, table, arrow)

    def delete_count(self, frm: str, params: list[Any]) -> int:
        """``DELETE {frm}``, returning how many rows it removed."""
        row = self.one(f"SELECT count(*) {frm}", params)
        n = int(row[0]) if row else 0
        if n:
            self.conn.execute(f"DELETE {frm}", params)
        return n
