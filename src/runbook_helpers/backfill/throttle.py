"""Throttling: the backfill slows down when the application suffers, sampled from its own connection."""

from __future__ import annotations

import threading
import time
from typing import Callable


class Throttle:
    """Watches the application from its own connection and slows the backfill down when it suffers.

    Every 100 ms it samples: how many sessions wait on the backfill's locks, how far dead tuples are ahead
    of autovacuum, and how many application sessions are stalled (active, waiting on a lock, an LWLock
    such as WALWrite, or I/O, in a query older than app_stall_ms). Stalls drive the pace: the pause before
    each batch doubles while the application stalls and decays while it does not (additive decrease,
    multiplicative increase in reverse), so an idle database gets full speed and a busy one keeps its
    latency. Lock waiters and dead tuples over their limits pause the backfill outright.
    """

    SAMPLE_S = 0.1

    def __init__(self, engine, table_oid: int, params, log: Callable[[str], None]):
        self.params, self.log, self.table_oid = params, log, table_oid
        self.enabled = (params.max_lock_waiters is not None or params.max_dead_ratio is not None
                        or params.app_stall_ms is not None)
        self.pids: set[int] = set()
        self.waiters = 0
        self.stalled = 0
        self.dead_ratio = 0.0
        self.pace_s = 0.0
        self.paused_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._engine = engine
        self._thread = threading.Thread(target=self._sample_loop, daemon=True) if self.enabled else None

    def __enter__(self) -> "Throttle":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    SAMPLE_SQL = (
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "        AND pg_blocking_pids(pid) && %(pids)s::int[]), "
        "       (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "        AND backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid() "
        "        AND NOT pid = ANY(%(pids)s::int[]) AND wait_event_type IN ('Lock', 'LWLock', 'IO') "
        "        AND now() - query_start > make_interval(secs => %(stall_s)s)), "
        "       (SELECT n_dead_tup::float8 / greatest(n_live_tup, 1) FROM pg_stat_user_tables "
        "        WHERE relid = %(oid)s::oid)")

    def _sample_loop(self) -> None:
        p = self.params
        stall_s = (p.app_stall_ms or 0) / 1000.0
        try:
            with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                while not self._stop.wait(self.SAMPLE_S):
                    waiters, stalled, dead = conn.exec_driver_sql(self.SAMPLE_SQL, {
                        "pids": sorted(self.pids), "stall_s": stall_s, "oid": self.table_oid}).one()
                    self.waiters, self.stalled, self.dead_ratio = int(waiters), int(stalled), float(dead or 0.0)
                    if p.app_stall_ms is not None:
                        if self.stalled:
                            self.pace_s = min(p.max_pace_ms / 1000.0, max(self.pace_s * 2, 0.05))
                        else:
                            self.pace_s = max(0.0, self.pace_s - 0.002)  # 20 ms per second
        except Exception as exc:  # throttling is advisory: never fail the backfill over it
            self.log(f"  throttle sampling stopped: {exc}")

    def over_limit(self) -> str | None:
        p = self.params
        if p.max_lock_waiters is not None and self.waiters > p.max_lock_waiters:
            return f"{self.waiters} sessions wait on the backfill's locks (limit {p.max_lock_waiters})"
        if p.max_dead_ratio is not None and self.dead_ratio > p.max_dead_ratio:
            return f"dead tuples are {self.dead_ratio:.2f} of live ones (limit {p.max_dead_ratio}): autovacuum is behind"
        return None

    def wait(self, label: str) -> None:
        """Called before each batch: the current pace, then any outright pause."""
        if not self.enabled:
            return
        started = time.monotonic()
        if self.pace_s:
            time.sleep(self.pace_s)
        reason = self.over_limit()
        if reason is not None:
            with self._lock:
                self.log(f"{label}: pausing: {reason}")
            while reason is not None and time.monotonic() - started < self.params.max_pause_s:
                time.sleep(self.params.pause_ms / 1000.0)
                reason = self.over_limit()
            if reason is not None:
                with self._lock:
                    self.log(f"{label}: still over the limit after {time.monotonic() - started:.0f} s; carrying on "
                             f"({reason})")
        with self._lock:
            self.paused_s += time.monotonic() - started
