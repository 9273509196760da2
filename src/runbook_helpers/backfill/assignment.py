"""What a batch writes into tenant_id and which rows are still pending: the engine's only knowledge of a
table's tenants. The System Tenant's assignment fills NULLs; the legacy mapping builds its own (each row
its org's tenant) from the same type.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql
from sqlalchemy.engine import Connection

from ..db.names import TENANT_COLUMN
from ..db.sqltext import render


@dataclass
class Assignment:
    """What the batched backfill writes into tenant_id and which rows still need it."""
    value: sql.Composable    # the tenant of a row of the table being updated (referenced by `alias`)
    pending: sql.Composable  # rows still to fill
    alias: str | None = None  # the name value and pending call the row by (not the table's): the same
    # assignment then serves a table and each of its leaf partitions, whose batches update the leaf itself

    def target(self, st) -> sql.Composable:
        """The relation a batch updates or a count reads, named so value and pending find their row."""
        return sql.SQL("{} AS {}").format(st.qualified, sql.Identifier(self.alias)) if self.alias else st.qualified

    def count(self, conn: Connection, st) -> int:
        query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(self.target(st), self.pending)
        return int(conn.exec_driver_sql(render(conn, query)).scalar())


def system_assignment(system_id: int) -> Assignment:
    return Assignment(sql.Literal(int(system_id)), sql.SQL("{} IS NULL").format(sql.Identifier(TENANT_COLUMN)))
