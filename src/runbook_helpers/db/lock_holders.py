"""Who holds or waits on a table's locks right now, so the ladder clears autovacuum and names blockers first.

The DDL ladder asks this before any statement that needs ACCESS EXCLUSIVE or SHARE ROW EXCLUSIVE: a plain
autovacuum worker on the table would hold its SHARE UPDATE EXCLUSIVE lock until PostgreSQL cancels it after
deadlock_timeout (a second of the application queued behind the waiting DDL); an anti-wraparound one is never
cancelled (by PostgreSQL or by us) and must be waited for; long transactions holding locks are named up front.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

WRAPAROUND_MARK = "(to prevent wraparound)"

SESSIONS_ON_TABLE_SQL = text("""
SELECT DISTINCT ON (a.pid) a.pid, a.backend_type, a.state, split_part(a.query, E'\\n', 1) AS query,
       extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::float8 AS age_s,
       l.mode, l.granted, v.heap_blks_scanned, v.heap_blks_total, v.phase
FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation
JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN pg_stat_progress_vacuum v ON v.pid = a.pid
WHERE l.locktype = 'relation' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND c.relname = :table AND a.pid <> pg_backend_pid()
ORDER BY a.pid, l.granted DESC
""")


@dataclass
class Session:
    pid: int
    backend_type: str
    state: str | None
    query: str
    age_s: float
    mode: str
    granted: bool
    heap_blks_scanned: int | None = None
    heap_blks_total: int | None = None
    phase: str | None = None

    @property
    def is_autovacuum(self) -> bool:
        return self.backend_type == "autovacuum worker"

    @property
    def is_wraparound_vacuum(self) -> bool:
        return self.is_autovacuum and WRAPAROUND_MARK in (self.query or "")

    def progress(self) -> str:
        if not self.heap_blks_total:
            return f"phase {self.phase or 'starting'}"
        share = 100.0 * (self.heap_blks_scanned or 0) / self.heap_blks_total
        return (f"{self.heap_blks_scanned:,}/{self.heap_blks_total:,} heap blocks scanned ({share:.0f}%), "
                f"phase {self.phase}")

    def describe(self) -> str:
        return (f"pid {self.pid} ({self.state or self.backend_type}, {'holds' if self.granted else 'waits for'} "
                f"{self.mode}, transaction open {self.age_s:.1f} s): {self.query!r}")


def sessions_on_table(conn: Connection, table: str) -> list[Session]:
    """Other backends holding or waiting on a lock of `table` (matched by name) in this database."""
    return [Session(**dict(r)) for r in conn.execute(SESSIONS_ON_TABLE_SQL, {"table": table}).mappings()]


def cancel_backend(conn: Connection, pid: int) -> bool:
    # the pid cast to integer: psycopg sends a pid below 32768 as smallint, which on a Citus server matches both
    # PostgreSQL's pg_cancel_backend(integer) and Citus's pg_cancel_backend(bigint) (42725, not unique)
    return bool(conn.execute(text("SELECT pg_cancel_backend(CAST(:pid AS integer))"), {"pid": pid}).scalar())
