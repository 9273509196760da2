"""Throttling: the backfill keeps the application's latency budget and the replicas' lag, measured by itself.

Three signals, each from a connection of its own, none of which can fail the backfill (a failing sampler
stops, says so, and the backfill carries on at the pace it had):
- the canary (throttle.budget_p99_ms): every 50 ms a tiny committed write (one row of the ledger's canary
  table, synchronous_commit on, as one of the runbook's sessions, so no rollout trigger fires). Its commit
  waits for the WAL flush behind the batches exactly as the application's commits do, so its p99 over the
  last 2 s is what the application feels. A controller compares it with the budget every half second, on
  samples taken since its last change: over the budget (or application sessions stalled longer than
  app_stall_ms), the next batches get half the size of the last one, down to min_batch_size, and then a pause
  before each batch that doubles from 50 ms up to max_pace_ms; under half the budget, the pause shrinks by
  50 ms at a time to none, and then the size limit grows by a fiftieth of max_batch_size at a time, up to
  max_batch_size (multiplicative decrease, additive increase: it backs off fast and probes back slowly).
  The size it allows is an upper bound: target_batch_ms still keeps each batch's row locks brief.
- the server (every 100 ms): sessions waiting on the backfill's locks, dead tuples ahead of autovacuum,
  application sessions stalled; without a budget the stalls drive the pace as before.
- streaming standbys (throttle.max_replica_lag_s): batches pause while a standby's replay lag exceeds the
  bound and resume below it. The lag is 0 when the standby has replayed all WAL the primary has
  (pg_stat_replication.replay_lag keeps its last value, stale, until the next reply, and is NULL when idle);
  replay_lag when it is behind; while replay_lag is NULL and bytes are outstanding, the bytes behind at the
  WAL rate of the last 2 s.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from psycopg import sql


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by the nearest-rank method (of 40 samples the p99 is the largest): no interpolation."""
    ordered = sorted(values)
    rank = max(1, -(-int(round(q * 1000)) * len(ordered) // 1000))
    return ordered[min(rank, len(ordered)) - 1]


class Throttle:
    """Watches the application and the standbys from its own connections and sizes and paces the batches.

    `ledger_schema` names the schema holding the canary row; without it (or without a budget) there is no
    canary and no controller. `batch` is (batch_size, min_batch_size, max_batch_size) of the backfill params.
    """

    SAMPLE_S = 0.1
    CANARY_S = 0.05      # one canary commit every 50 ms
    WINDOW_S = 2.0       # the signal: the canary's p99 over the last 2 s
    TICK_S = 0.5         # the controller decides at most this often ...
    MIN_SAMPLES = 8      # ... on at least this many canary commits since its last change
    PACE_STEP_S = 0.05
    FIRST_SAMPLE_S = 5.0  # the first batch waits this long at most for the first sample (standbys, lock waiters)

    def __init__(self, engine, table_oid: int, params, log: Callable[[str], None], *,
                 ledger_schema: str | None = None, batch: tuple[int, int, int] | None = None):
        self.params, self.log, self.table_oid = params, log, table_oid
        self.ledger_schema = ledger_schema
        self.controlled = params.budget_p99_ms is not None and ledger_schema is not None
        self.enabled = (params.max_lock_waiters is not None or params.max_dead_ratio is not None
                        or params.app_stall_ms is not None or params.max_replica_lag_s is not None
                        or self.controlled)
        first, self.min_size, self.max_size = batch or (10000, 200, 100000)
        self.size_cap = self.max_size   # the controller's upper bound on the next batch's size
        self.last_size = min(first, self.max_size)
        self.pids: set[int] = set()
        self.waiters = 0
        self.stalled = 0
        self.dead_ratio = 0.0
        self.pace_s = 0.0
        self.paused_s = 0.0
        self.canary_p99_ms: float | None = None
        self.replica_lag: dict[str, float] = {}   # standby -> replay lag in seconds, from the last sample
        self.max_replica_lag_s: float | None = None  # the largest seen while this throttle ran (None: no standby)
        self._canary: collections.deque[tuple[float, float]] = collections.deque()
        self._wal: collections.deque[tuple[float, float]] = collections.deque()
        self._unreadable: set[str] = set()
        self._changed_at = 0.0
        self._decided_at = 0.0
        self._stop = threading.Event()
        self._sampled = threading.Event()  # the first sample is in: no batch starts before it
        self._lock = threading.Lock()
        self._engine = engine
        self._threads = []
        if self.enabled:
            self._threads.append(threading.Thread(target=self._sample_loop, daemon=True))
        if self.controlled:
            self._threads.append(threading.Thread(target=self._canary_loop, daemon=True))

    def __enter__(self) -> "Throttle":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    SAMPLE_SQL = (
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "        AND pg_blocking_pids(pid) && %(pids)s::int[]), "
        "       (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "        AND backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid() "
        "        AND NOT pid = ANY(%(pids)s::int[]) AND wait_event_type IN ('Lock', 'LWLock', 'IO') "
        "        AND now() - query_start > make_interval(secs => %(stall_s)s)), "
        "       (SELECT n_dead_tup::float8 / greatest(n_live_tup, 1) FROM pg_stat_user_tables "
        "        WHERE relid = %(oid)s::oid)")

    REPLICA_SQL = (
        "SELECT coalesce(nullif(application_name, ''), 'pid ' || pid) || coalesce(' at ' || client_addr::text, ''), "
        "       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8, "
        "       extract(epoch FROM replay_lag)::float8, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 "
        "FROM pg_stat_replication WHERE state = 'streaming'")

    def _sample_loop(self) -> None:
        p = self.params
        stall_s = (p.app_stall_ms or 0) / 1000.0
        try:
            with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                replicas = p.max_replica_lag_s is not None and not conn.exec_driver_sql(
                    "SELECT pg_is_in_recovery()").scalar()
                while not self._stop.is_set():
                    waiters, stalled, dead = conn.exec_driver_sql(self.SAMPLE_SQL, {
                        "pids": sorted(self.pids), "stall_s": stall_s, "oid": self.table_oid}).one()
                    self.waiters, self.stalled, self.dead_ratio = int(waiters), int(stalled), float(dead or 0.0)
                    if p.app_stall_ms is not None and not self.controlled:
                        if self.stalled:
                            self.pace_s = min(p.max_pace_ms / 1000.0, max(self.pace_s * 2, 0.05))
                        else:
                            self.pace_s = max(0.0, self.pace_s - 0.002)  # 20 ms per second
                    if replicas:
                        self._sample_replicas(conn.exec_driver_sql(self.REPLICA_SQL).all())
                    self._sampled.set()
                    self._stop.wait(self.SAMPLE_S)
        except Exception as exc:  # throttling is advisory: never fail the backfill over it
            self.log(f"  throttle sampling stopped: {exc}")
        finally:
            self._sampled.set()

    def _sample_replicas(self, rows) -> None:
        now = time.monotonic()
        if rows:
            self._wal.append((now, rows[0][3]))
        while self._wal and self._wal[0][0] < now - self.WINDOW_S:
            self._wal.popleft()
        rate = ((self._wal[-1][1] - self._wal[0][1]) / (self._wal[-1][0] - self._wal[0][0])
                if len(self._wal) > 1 and self._wal[-1][0] > self._wal[0][0] else 0.0)
        lags = {}
        for name, behind, replay_lag, _ in rows:
            if behind is None:  # without pg_monitor (or pg_read_all_stats) the positions read as NULL
                if name not in self._unreadable:
                    self._unreadable.add(name)
                    self.log(f"  throttle: cannot read the replay position of standby {name} (grant pg_monitor to "
                             f"the migration role); its lag is not watched")
                continue
            if behind <= 0:
                lags[name] = 0.0          # everything replayed: a replay_lag still shown is stale
            elif replay_lag is not None:
                lags[name] = float(replay_lag)
            else:
                lags[name] = behind / rate if rate > 0 else 0.0
        self.replica_lag = lags
        if lags:
            worst = max(lags.values())
            self.max_replica_lag_s = worst if self.max_replica_lag_s is None else max(self.max_replica_lag_s, worst)

    # -- the canary and the controller
    def _canary_loop(self) -> None:
        statement = None
        try:
            with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                driver = conn.connection.driver_connection
                driver.execute("SET synchronous_commit = on")  # whatever the role's default: it must wait
                statement = sql.SQL("UPDATE {} SET beats = beats + 1, beat_at = clock_timestamp() WHERE id = 1").format(
                    sql.Identifier(self.ledger_schema, "canary"))
                self._changed_at = time.monotonic()
                while not self._stop.is_set():
                    started = time.monotonic()
                    driver.execute(statement)  # autocommit: the UPDATE and its commit, one round trip
                    now = time.monotonic()
                    self._canary.append((started, 1000.0 * (now - started)))
                    while self._canary and self._canary[0][0] < now - self.WINDOW_S:
                        self._canary.popleft()
                    self.canary_p99_ms = quantile([ms for _, ms in self._canary], 0.99)
                    if now - self._decided_at >= self.TICK_S:
                        self._decide(now)
                    self._stop.wait(max(0.0, self.CANARY_S - (time.monotonic() - started)))
        except Exception as exc:  # advisory: the batches keep the size and pace they had
            self.log(f"  throttle canary stopped (the batches keep their current size and pace): {exc}")

    def _decide(self, now: float) -> None:
        """One step of the controller, on the canary commits since its last change."""
        fresh = [ms for t, ms in self._canary if t >= self._changed_at]
        if len(fresh) < self.MIN_SAMPLES:
            return
        self._decided_at = now
        p = self.params
        p99 = quantile(fresh, 0.99)
        max_pace = p.max_pace_ms / 1000.0
        with self._lock:
            if p99 > p.budget_p99_ms or self.stalled:
                if self.last_size > self.min_size or self.size_cap > self.min_size:
                    self.size_cap = max(self.min_size, min(self.size_cap, self.last_size) // 2)
                else:
                    self.pace_s = min(max_pace, max(self.pace_s * 2, self.PACE_STEP_S))
            elif p99 < p.budget_p99_ms / 2:
                if self.pace_s > 0:
                    self.pace_s = max(0.0, self.pace_s - self.PACE_STEP_S)
                elif self.size_cap < self.max_size:
                    self.size_cap = min(self.max_size, self.size_cap + max(1, self.max_size // 50))
                else:
                    return  # at full speed: nothing changed, keep the window
            else:
                return  # within the budget: hold
            self._changed_at = now

    def batch_size(self, wanted: int) -> int:
        """The size of the next batch: what the engine wants (batch_size, or adapted to target_batch_ms), at
        most what the budget allows."""
        size = min(wanted, self.size_cap) if self.controlled else wanted
        self.last_size = size
        return size

    def snapshot(self) -> dict:
        """The signals and the pace now, for the progress history (one row per batch)."""
        lag = max(self.replica_lag.values()) if self.replica_lag else None
        return {"pace_ms": round(1000 * self.pace_s, 1),
                "canary_p99_ms": None if self.canary_p99_ms is None else round(self.canary_p99_ms, 2),
                "replica_lag_s": None if lag is None else round(lag, 3)}

    def status(self) -> str:
        """The milestone line's tail: the signal, the batch size and pace chosen."""
        parts = []
        if self.controlled:
            p99 = "n/a" if self.canary_p99_ms is None else f"{self.canary_p99_ms:,.1f} ms"
            parts.append(f"canary p99 {p99} (budget {self.params.budget_p99_ms:g} ms), batch {self.last_size:,}")
        if self.enabled:
            parts.append(f"pace {1000 * self.pace_s:,.0f} ms")
        if self.replica_lag:
            name, lag = max(self.replica_lag.items(), key=lambda kv: kv[1])
            parts.append(f"replica {name} lag {lag:.1f} s")
        return ", ".join(parts)

    def over_limit(self) -> str | None:
        p = self.params
        if p.max_lock_waiters is not None and self.waiters > p.max_lock_waiters:
            return f"{self.waiters} sessions wait on the backfill's locks (limit {p.max_lock_waiters})"
        if p.max_dead_ratio is not None and self.dead_ratio > p.max_dead_ratio:
            return f"dead tuples are {self.dead_ratio:.2f} of live ones (limit {p.max_dead_ratio}): autovacuum is behind"
        if p.max_replica_lag_s is not None and self.replica_lag:
            name, lag = max(self.replica_lag.items(), key=lambda kv: kv[1])
            if lag > p.max_replica_lag_s:
                return f"for replica {name}, replay lag {lag:.1f} s (limit {p.max_replica_lag_s:g} s)"
        return None

    def wait(self, label: str) -> None:
        """Called before each batch: the current pace, then any outright pause."""
        if not self.enabled:
            return
        started = time.monotonic()
        self._sampled.wait(self.FIRST_SAMPLE_S)
        if self.pace_s:
            time.sleep(self.pace_s)
        reason = self.over_limit()
        if reason is not None:
            with self._lock:
                self.log(f"{label}: pausing: {reason}")
            while reason is not None and time.monotonic() - started < self.params.max_pause_s:
                time.sleep(self.params.pause_ms / 1000.0)
                reason = self.over_limit()
            with self._lock:
                if reason is not None:
                    self.log(f"{label}: still over the limit after {time.monotonic() - started:.0f} s; carrying on "
                             f"({reason})")
                else:
                    self.log(f"{label}: resuming after {time.monotonic() - started:.1f} s")
        with self._lock:
            self.paused_s += time.monotonic() - started
