"""The batched backfill engine: key ranges, parallel workers, adaptive batch size, throttling, checkpoints.

The table's key space (its primary key, or the key the params name; ctid pages when there is neither) is
split into `workers` disjoint parts, one checkpoint row each. A worker walks its part in key order, one
short transaction per batch: `UPDATE … SET tenant_id = <id> WHERE key in (last, upper] AND tenant_id IS
NULL`, and its checkpoint row is updated in the same transaction, so a kill anywhere loses nothing and a
re-run resumes every part where it stopped. Batch size adapts toward `target_batch_ms`, so row locks
are held briefly whatever the row width. Before each batch the worker asks the throttle, which samples
the server every 250 ms: it pauses while more sessions than allowed wait on the backfill's locks, or
while dead tuples outrun autovacuum. Keys are never loaded into memory: each batch's upper bound comes
from one index-ordered OFFSET query.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from . import catalog, faults
from .catalog import TableState
from .errors import LockNotAcquired, RunbookError
from .legacy_mapping import Assignment, system_assignment
from .names import TENANT_COLUMN
from .progress import Progress
from .sqltext import render

COL = sql.Identifier(TENANT_COLUMN)
Key = list[str] | None  # key values as text (cast back with the column types); None = unbounded


# --- how batches walk a table ----------------------------------------------------------------------

class KeysetSpace:
    """Batches in key order over the key columns (compared as a row, so composite keys work)."""

    strategy = "keyset"

    def __init__(self, st: TableState, keys: list[str], key_types: list[str]):
        self.st, self.keys, self.types = st, keys, key_types

    def _row(self, alias: str | None = None) -> sql.Composable:
        cols = [sql.Identifier(alias, k) if alias else sql.Identifier(k) for k in self.keys]
        return sql.SQL("({})").format(sql.SQL(", ").join(cols))

    def _bound(self) -> sql.Composable:
        return sql.SQL("({})").format(sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(t)) for t in self.types))

    def _ordered(self, where: list[sql.Composable]) -> sql.Composed:
        # ORDER BY qualified table columns: an output column `id::text AS id` would sort as text
        clause = sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) + sql.SQL(" ") if where else sql.SQL("")
        return sql.SQL("SELECT {cols} FROM {t} AS t {where}ORDER BY {order} OFFSET %s LIMIT 1").format(
            cols=sql.SQL(", ").join(sql.SQL("t.{}::text AS {}").format(sql.Identifier(k), sql.Identifier(f"k{i}"))
                                    for i, k in enumerate(self.keys)),
            t=self.st.qualified, where=clause,
            order=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in self.keys))

    def split(self, conn: Connection, parts: int, estimated_rows: int) -> list[tuple[Key, Key]]:
        """Bounds of `parts` ranges holding about the same number of keys."""
        bounds: list[Key] = []
        for i in range(1, parts):
            row = conn.exec_driver_sql(render(conn, self._ordered([])), (int(i * estimated_rows / parts),)).first()
            if row is not None and (not bounds or list(row) != bounds[-1]):
                bounds.append(list(row))
        edges = [None, *bounds, None]
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def next_upper(self, conn: Connection, after: Key, limit: Key, size: int) -> tuple[Key, bool]:
        """The last key of the next batch of `size` keys after `after`, capped at `limit`. True when it is the
        part's last batch."""
        where, args = [], []
        if after is not None:
            where.append(sql.SQL("{} > {}").format(self._row("t"), self._bound()))
            args += after
        if limit is not None:
            where.append(sql.SQL("{} <= {}").format(self._row("t"), self._bound()))
            args += limit
        row = conn.exec_driver_sql(render(conn, self._ordered(where)), tuple(args + [size - 1])).first()
        if row is None:
            return limit, True
        return list(row), False

    def update(self, conn: Connection, lower: Key, upper: Key, assign: Assignment) -> tuple[str, list]:
        conds, args = [], []
        if lower is not None:
            conds.append(sql.SQL("{} > {}").format(self._row(), self._bound()))
            args += lower
        if upper is not None:
            conds.append(sql.SQL("{} <= {}").format(self._row(), self._bound()))
            args += upper
        return _update(conn, self.st, conds, assign), args


class CtidSpace:
    """Batches over ranges of heap pages, for tables without a primary key (PostgreSQL 14+ scans a ctid range
    directly; on 13 each batch scans the table)."""

    strategy = "ctid"
    keys: list[str] = []

    def __init__(self, st: TableState):
        self.st = st
        self._rows_per_page: float | None = None

    def pages(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql("SELECT pg_relation_size(%s::oid) / current_setting('block_size')::int",
                                        (self.st.oid,)).scalar())

    def rows_per_page(self, conn: Connection) -> float:
        if self._rows_per_page is None:
            reltuples, relpages = conn.exec_driver_sql("SELECT reltuples, relpages FROM pg_class WHERE oid = %s::oid",
                                                       (self.st.oid,)).one()
            if reltuples > 0 and relpages > 0:
                self._rows_per_page = reltuples / relpages
            else:  # never analyzed: count the rows of the first pages instead
                sample = min(max(self.pages(conn), 1), 10)
                rows = conn.exec_driver_sql(render(conn, sql.SQL("SELECT count(*) FROM {} WHERE ctid < %s::tid").format(
                    self.st.qualified)), (f"({sample},0)",)).scalar()
                self._rows_per_page = max(1.0, rows / sample)
        return self._rows_per_page

    def split(self, conn: Connection, parts: int, estimated_rows: int) -> list[tuple[Key, Key]]:
        pages = self.pages(conn)
        edges: list[Key] = [None]
        for i in range(1, parts):
            edge = str(int(i * pages / parts))
            if edge != (edges[-1] or ["-1"])[0] and int(edge) > 0:
                edges.append([edge])
        edges.append(None)
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def next_upper(self, conn: Connection, after: Key, limit: Key, size: int) -> tuple[Key, bool]:
        start = int(after[0]) if after else 0
        end = start + max(1, int(size / self.rows_per_page(conn)))
        if limit is not None and end >= int(limit[0]):
            return limit, True
        if limit is None and end > self.pages(conn):
            return None, True
        return [str(end)], False

    def update(self, conn: Connection, lower: Key, upper: Key, assign: Assignment) -> tuple[str, list]:
        conds, args = [], []
        if lower is not None:
            conds.append(sql.SQL("ctid >= %s::tid"))
            args.append(f"({int(lower[0])},0)")
        if upper is not None:
            conds.append(sql.SQL("ctid < %s::tid"))
            args.append(f"({int(upper[0])},0)")
        return _update(conn, self.st, conds, assign), args


def _update(conn: Connection, st: TableState, conds: list[sql.Composable], assign: Assignment) -> str:
    """One batch's UPDATE: the key range, then the rows still pending, set to the assignment's value."""
    query = sql.SQL("UPDATE {} SET {} = {} WHERE {}").format(
        st.qualified, COL, assign.value, sql.SQL(" AND ").join([*conds, assign.pending]))
    return render(conn, query)


# --- throttling -------------------------------------------------------------------------------------

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


# --- the engine -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    rows: int
    batches: int
    passes: int
    paused_s: float


class BatchedBackfill:
    """Fills NULL tenant_id of one table with the System Tenant (or, with an assignment from the legacy
    mapping, each row with its org's tenant), resumably, in parallel if asked."""

    def __init__(self, rb, st: TableState, system_id: int, assignment: Assignment | None = None):
        self.rb, self.st, self.system_id = rb, st, system_id
        self.assign = assignment or system_assignment(system_id)
        self.params = rb.params.backfill
        self.label = f"backfill {st.name}"
        keys = list(rb.params.core_tables[st.name].key or st.pk_columns)
        self.space = KeysetSpace(st, keys, self._key_types(keys)) if keys else CtidSpace(st)
        self.progress: Progress | None = None
        self._progress_lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[psycopg.Connection] = []

    def _key_types(self, keys: list[str]) -> list[str]:
        if keys == self.st.pk_columns:
            return list(self.st.pk_types)
        with self.rb.engine.connect() as conn:
            types = dict(conn.exec_driver_sql(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s "
                "AND attnum > 0 AND NOT attisdropped", (self.st.oid,)).all())
        missing = [k for k in keys if k not in types]
        if missing:
            raise RunbookError(f"{self.st.name}: key column(s) {', '.join(missing)} named in params do not exist; "
                               f"fix core_tables.{self.st.name}.key")
        return [types[k] for k in keys]

    # -- parts
    def _parts(self, remaining: int) -> list[dict]:
        rb, ledger, name = self.rb, self.rb.ledger, self.st.name
        parts = ledger.parts(rb.control, name)
        if parts and (parts[0]["strategy"] != self.space.strategy or list(parts[0]["key_columns"]) != self.space.keys):
            rb.log(f"{self.label}: the checkpoint walked ({', '.join(parts[0]['key_columns']) or 'ctid'}), now "
                   f"({', '.join(self.space.keys) or 'ctid'}); starting a new pass over the new key")
            first_pass = max(p["pass"] for p in parts) + 1
            parts = []
        else:
            first_pass = 1
        if not parts:
            with rb.engine.connect() as conn:
                bounds = self.space.split(conn, self.params.workers, max(self.st.estimated_rows, remaining))
            ledger.create_parts(rb.control, name, self.space.strategy, self.space.keys, bounds, remaining, first_pass)
            return ledger.parts(rb.control, name)
        if all(p["finished_at"] is not None for p in parts) and remaining:
            ledger.next_pass(rb.control, name, remaining)  # NULLs written after it finished
            return ledger.parts(rb.control, name)
        done = sum(p["rows_updated"] for p in parts)
        if done:
            rb.log(f"{self.label}: resuming {sum(p['finished_at'] is None for p in parts)} of {len(parts)} part(s) "
                   f"from their checkpoints ({done:,} rows already done)")
        return parts

    # -- the run
    def run(self, counted: int | None = None) -> Outcome:
        """`counted`: the rows still to fill, if the caller counted them a moment ago (a full scan saved; a
        wrong count only changes the progress total, since every pass ends with a recount)."""
        rb = self.rb
        remaining = counted
        if not remaining:
            with rb.engine.connect() as conn:
                remaining = self.assign.count(conn, self.st)
        parts = self._parts(remaining)
        before = rb.ledger.checkpoint(rb.control, self.st.name)
        from .session import headless
        self.progress = Progress(self.label, remaining, every_s=self.params.progress_every_s, live=not headless(),
                                 log=rb.log)
        passes = 0
        with Throttle(rb.engine, self.st.oid, self.params.throttle, rb.log) as throttle:
            while remaining:
                self._run_parts([p for p in parts if p["finished_at"] is None], throttle)
                passes += 1
                with rb.engine.connect() as conn:
                    remaining = self.assign.count(conn, self.st)
                if not remaining:
                    break
                current_pass = max(p["pass"] for p in rb.ledger.parts(rb.control, self.st.name))
                if current_pass >= self.params.max_passes:
                    raise RunbookError(
                        f"{self.st.name}: {remaining:,} rows still have no tenant after {self.params.max_passes} "
                        f"passes; something writes NULL (or the System Tenant) explicitly. Find it (the DEFAULT "
                        f"covers inserts that omit tenant_id), then re-run this notebook.")
                rb.log(f"{self.label}: {remaining:,} rows without their tenant appeared meanwhile; sweeping again")
                rb.ledger.next_pass(rb.control, self.st.name, remaining)
                parts = rb.ledger.parts(rb.control, self.st.name)
                self.progress.total += remaining
            paused = throttle.paused_s
        self.progress.close()
        after = rb.ledger.checkpoint(rb.control, self.st.name)
        return Outcome(after["rows_updated"] - (before or {}).get("rows_updated", 0),
                       after["batches"] - (before or {}).get("batches", 0), passes, paused)

    def _run_parts(self, parts: list[dict], throttle: Throttle) -> None:
        if len(parts) <= 1:
            for part in parts:
                self._walk(part, throttle)
            return
        errors: list[BaseException] = []

        def worker(part: dict) -> None:
            try:
                self._walk(part, throttle)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                errors.append(exc)
                self._stop.set()

        threads = [threading.Thread(target=worker, args=(p,), name=f"{self.label} part {p['part']}") for p in parts]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except BaseException:
            self._stop.set()
            for conn in list(self._workers):
                try:
                    conn.cancel_safe()  # no orphaned UPDATE keeps running on the server
                except Exception:
                    pass
            for t in threads:
                t.join(30)
            raise
        if errors:
            raise errors[0]

    def _walk(self, part: dict, throttle: Throttle) -> None:
        """One part, batch after batch, from its checkpoint to its upper bound."""
        rb = self.rb
        p = self.params
        size = p.batch_size
        cursor: Key = part["last_key"] if part["last_key"] is not None else part["lower_key"]
        limit: Key = part["upper_key"]
        with rb.engine.connect() as conn:
            driver = conn.connection.driver_connection
            # a batch and its checkpoint must commit together: never on an autocommit connection
            driver.autocommit = False
            if not p.synchronous_commit:
                # the batch and its checkpoint still commit atomically; a crash can only lose both together,
                # and the re-run redoes them. Meanwhile the batches stop queueing fsyncs ahead of the application's.
                driver.execute("SET synchronous_commit = off")
                driver.commit()
            # the application's triggers (updated_at, audit rows) must not fire for the backfill's own updates:
            # they would change pre-existing columns. Replica mode also skips foreign key checks, which is safe
            # only while no foreign key includes tenant_id (before constrain); after it, the triggers fire.
            skip_triggers = bool(self.st.triggers) and catalog.can_skip_triggers(conn) and \
                not catalog.tenant_foreign_keys(conn, self.st.oid)
            conn.commit()
            if skip_triggers:
                driver.execute("SET session_replication_role = replica")
                driver.commit()
            self._workers.append(driver)
            throttle.pids.add(driver.info.backend_pid)
            try:
                while not self._stop.is_set():
                    throttle.wait(self.label)
                    faults.point("backfill.before_batch", self.st.name)
                    upper, last = self.space.next_upper(conn, cursor, limit, size)
                    conn.commit()
                    statement, args = self.space.update(conn, cursor, upper, self.assign)
                    seconds = self._batch(conn, statement, args, part["part"],
                                          upper if upper is not None else cursor)
                    if last:
                        with conn.begin():  # the worker's own connection: rb.control is not shared across threads
                            rb.ledger.finish_part(conn, self.st.name, part["part"])
                        return
                    cursor = upper
                    if p.target_batch_ms:
                        factor = min(2.0, max(0.5, p.target_batch_ms / max(1.0, seconds * 1000)))
                        size = int(min(p.max_batch_size, max(p.min_batch_size, size * factor)))
                    if p.pause_ms:
                        time.sleep(p.pause_ms / 1000.0)
            finally:
                throttle.pids.discard(driver.info.backend_pid)
                self._workers.remove(driver)
                if skip_triggers and not driver.closed:
                    driver.rollback()
                    driver.execute("RESET session_replication_role")
                    driver.commit()

    def _batch(self, conn: Connection, statement: str, args: list, part: int, new_last: Key) -> float:
        """One batch and its checkpoint in one transaction; lock timeouts climb the retry ladder."""
        rb = self.rb
        retry = rb.params.locks.retry
        for attempt in range(1, retry.attempts + 1):
            started = time.monotonic()
            try:
                with conn.begin():
                    rows = conn.exec_driver_sql(statement, tuple(args)).rowcount
                    faults.point("backfill.mid_batch", self.st.name)
                    rb.ledger.advance_checkpoint(conn, self.st.name, part, new_last, rows)
                faults.point("backfill.after_batch", self.st.name)
                break
            except DBAPIError as exc:
                if not isinstance(exc.orig, pg_errors.LockNotAvailable):
                    raise RunbookError(f"{self.st.name}: backfill batch failed: {exc.orig}; every committed "
                                       f"checkpoint is intact, fix the cause and re-run to resume") from None
                if attempt == retry.attempts:
                    raise LockNotAcquired(
                        f"{self.st.name}: a backfill batch could not lock its rows after {retry.attempts} tries of "
                        f"{rb.params.locks.lock_timeout_ms} ms; long transactions hold them. End them and re-run: "
                        f"it resumes from the last checkpoint.") from None
                rb.log(f"  {self.st.name}: a batch waited on row locks (try {attempt}/{retry.attempts}); retrying")
                time.sleep(min(retry.backoff_ms * 2 ** (attempt - 1), retry.backoff_max_ms) / 1000.0)
        seconds = time.monotonic() - started
        with self._progress_lock:
            self.progress.advance(rows, batch_rows=rows, batch_s=seconds)
        return seconds
