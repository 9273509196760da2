"""VACUUM beside the batches (backfill.vacuum_every_share): what keeps the application's index-only scans fast.

Every batch writes a new version of each row it touches, which clears its pages' all-visible bits in the
visibility map. The application's index-only scans (a `count(*) … WHERE org_id = $1` over an index on org_id)
then fetch every row from the heap instead of answering from the index: in bench B3 at 1M rows that one
statement went from 31 ms to 660 ms at p99 (its sessions waiting on IO:AioIoCompletion, reading heap pages),
and every statement queued behind it with it; the canary, a single-row write, felt none of it. Autovacuum
restores the bits only long after (and the lock ladder cancels it on the tables it alters). So a second
session runs `VACUUM (SKIP_LOCKED)` of the table each time the batches have rewritten another share of its
rows: each scans only the pages changed since the last (the visibility map skips the rest), sets them
all-visible again and makes the old versions' space reusable by the next batches.

The share, not a clock: a VACUUM that finds dead row versions on fewer than 2% of the table's pages skips
its index pass (PostgreSQL's bypass) and leaves those pages not all-visible, so a vacuum every few seconds
helps a 1M-row table and not a 5M-row one; 5% of the rows (and at least MIN_ROWS) always clears it. Each
VACUUM also scans every index once, so a smaller share costs more.

SKIP_LOCKED: a VACUUM that would wait (autovacuum already on the table) is skipped, never queued. It takes
SHARE UPDATE EXCLUSIVE, which no application statement conflicts with. Advisory, as throttling is: an error
stops the vacuuming with a line and the batches go on; the VACUUM (ANALYZE) after the batches
(backfill.vacuum_after) still runs.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from psycopg import sql

from ..db.sqltext import render


MIN_ROWS = 10_000  # no VACUUM beside the batches before they rewrote this many rows since the last


class VacuumAlongside:
    """A thread that vacuums one table each time the batches have rewritten `share` of its rows (None: never)."""

    def __init__(self, engine, schema: str, name: str, share: float | None, table_rows: float,
                 log: Callable[[str], None]):
        self._engine, self.log, self.name = engine, log, name
        self.statement = render(None, sql.SQL("VACUUM (SKIP_LOCKED) {}").format(sql.Identifier(schema, name)))
        self.threshold = max(MIN_ROWS, share * table_rows) if share else None
        self.runs = 0
        self.seconds = 0.0
        self._since = 0  # rows rewritten since the last VACUUM started
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "VacuumAlongside":
        if self.threshold:
            self._thread = threading.Thread(target=self._loop, name=f"vacuum {self.name}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._due.set()
        if self._thread is not None:
            self._thread.join()

    def rewritten(self, rows: int) -> None:
        """A batch committed `rows` new row versions: a VACUUM is due once enough have since the last."""
        if self.threshold is None:
            return
        with self._lock:
            self._since += rows
            if self._since >= self.threshold:
                self._due.set()

    def _loop(self) -> None:
        try:
            with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                while True:
                    self._due.wait()
                    if self._stop.is_set():
                        return
                    with self._lock:
                        self._since = 0
                        self._due.clear()
                    t0 = time.monotonic()
                    conn.exec_driver_sql(self.statement)
                    self.runs += 1
                    self.seconds += time.monotonic() - t0
        except Exception as exc:  # advisory: the batches go on without it
            self.log(f"  vacuuming {self.name} beside the batches stopped: {str(exc).splitlines()[0]}")

    def status(self) -> str:
        return f"vacuumed {self.runs} times beside the batches ({self.seconds:.1f} s)" if self.runs else ""
