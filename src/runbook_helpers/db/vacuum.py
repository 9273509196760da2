"""VACUUM (ANALYZE) after a phase rewrote a table's rows, online, with progress for long ones.

A batched backfill leaves one dead row version per rewritten row; autovacuum gets to it eventually, at its
own pace, and the planner's statistics stay those of before until then. Plain VACUUM (never FULL) takes
SHARE UPDATE EXCLUSIVE: reads and writes continue, only other VACUUMs, ANALYZE and DDL wait. It cannot run
in a transaction block, so its Step is not transactional (the Executor runs it in autocommit, journaled in
the ledger like every statement). It removes nothing a rollback needs: no undo.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from .ddl import CONTINUES, SHARE_UPDATE_EXCLUSIVE, Step, on_table

ACTION = "VACUUM (ANALYZE): clear the dead row versions the batches left, refresh the statistics"

PROGRESS_SQL = text("""
SELECT v.phase, v.heap_blks_total, v.heap_blks_scanned, v.heap_blks_vacuumed, v.index_vacuum_count
FROM pg_stat_progress_vacuum v JOIN pg_stat_activity a ON a.pid = v.pid
WHERE v.relid = CAST(:oid AS oid) AND a.backend_type = 'client backend'
""")


def vacuum_step(phase: str, table: str, relation: sql.Composable, what: str = "", relname: str | None = None) -> Step:
    """`relation`: the table to vacuum (a core table or one of its leaf partitions, `relname`, named in `what`)."""
    lock = on_table("SHARE UPDATE EXCLUSIVE", note=CONTINUES, relation=relname) if relname else SHARE_UPDATE_EXCLUSIVE
    return Step(phase, table, ACTION + what, sql.SQL("VACUUM (ANALYZE) {}").format(relation), lock,
                "plain VACUUM, never FULL: reads and writes continue; a plain autovacuum on the table is cancelled "
                "first (this does its work), an anti-wraparound one waited for",
                transactional=False, long_scan=True)


OTHERS_SQL = text("""
SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND application_name = current_setting('application_name')
""")


def settle_statistics(engine: Engine, control: Connection, wait_s: float = 2.0) -> None:
    """Close the engine's idle pooled connections (the batches') and wait, briefly, until their backends are
    gone. A backend reports the rows it changed to pg_stat_user_tables when it ends (while idle, up to 10 s
    later): a VACUUM that ran first would be followed by dead-row counts it had already cleared."""
    engine.pool.dispose()  # only the checked-in connections: `control` and the pool stay usable
    deadline = time.monotonic() + wait_s
    while control.execute(OTHERS_SQL).scalar() and time.monotonic() < deadline:
        time.sleep(0.05)


class VacuumProgress:
    """While a VACUUM of `oid` runs, a line every `every_s` from pg_stat_progress_vacuum (nothing for a short
    one): one small read per interval from its own connection."""

    def __init__(self, engine: Engine, oid: int, label: str, every_s: float, log: Callable[[str], None]):
        self.engine, self.oid, self.label, self.every_s, self.log = engine, oid, label, every_s, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"progress {label}", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with self.engine.connect() as conn:
                    row = conn.execute(PROGRESS_SQL, {"oid": self.oid}).mappings().first()
            except Exception:  # progress is advisory; the VACUUM's own outcome decides
                return
            if row is None:
                continue
            total = row["heap_blks_total"] or 0
            share = f" ({100.0 * row['heap_blks_scanned'] / total:.0f}%)" if total else ""
            self.log(f"  {self.label}: VACUUM {row['phase']}: {row['heap_blks_scanned']:,}/{total:,} heap blocks "
                     f"scanned{share}, {row['heap_blks_vacuumed']:,} vacuumed, {row['index_vacuum_count']} index passes")

    def __enter__(self) -> "VacuumProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
