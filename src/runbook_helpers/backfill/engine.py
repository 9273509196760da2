"""The batched backfill engine: key ranges, parallel workers, adaptive batch size, throttling, checkpoints.

The table's key space (its primary key, or the key the params name; ctid pages when there is neither) is
split into `workers` disjoint parts, one checkpoint row each. A worker walks its part in key order, one
short transaction per batch: `UPDATE … SET tenant_id = <id> WHERE key in (last, upper] AND tenant_id IS
NULL`, and its checkpoint row is updated in the same transaction, so a kill anywhere loses nothing and a
re-run resumes every part where it stopped. Batch size adapts toward `target_batch_ms`, so row locks
are held briefly whatever the row width. Before each batch the worker asks the throttle (throttle.py): it
bounds the batch size and sets the pace that keep the application's latency budget (the canary), and
pauses while more sessions than allowed wait on the backfill's locks, while dead tuples outrun autovacuum,
or while a standby replays too far behind. Keys are never loaded into memory: each batch's upper bound
comes from one index-ordered OFFSET query.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from .. import faults
from ..db import catalog, runner_watch
from ..db.catalog import TableState
from ..db.database import RUNBOOK_SESSION_SETTING
from ..errors import LockNotAcquired, RunbookError
from .assignment import Assignment, system_assignment
from .keyspace import Key, space_for
from .throttle import Throttle
from .vacuuming import VacuumAlongside


@dataclass
class Outcome:
    rows: int
    batches: int
    passes: int
    paused_s: float
    max_replica_lag_s: float | None = None  # the worst standby replay lag seen meanwhile (None: no standby)


class BatchedBackfill:
    """Fills NULL tenant_id of one table with the System Tenant (or, with an assignment from the legacy
    mapping, each row with its org's tenant), resumably, in parallel if asked."""

    def __init__(self, rb, st: TableState, system_id: int, assignment: Assignment | None = None,
                 core_table: str | None = None):
        """`st` is the table the batches update: a core table, or one leaf partition of `core_table` (its
        own checkpoint, under the partition's name, so each partition resumes where it stopped)."""
        self.rb, self.st, self.system_id = rb, st, system_id
        self.assign = assignment or system_assignment(system_id)
        self.params = rb.params.backfill
        self.label = f"backfill {st.name}"
        keys = list(rb.params.core_tables[core_table or st.name].key or st.pk_columns)
        if keys and keys != st.pk_columns:
            with rb.engine.connect() as conn:
                self.space = space_for(conn, st, keys)
        else:
            self.space = space_for(None, st, keys)
        self.progress = None  # the session's Progress for this table, from run()
        self.vacuuming = None  # the VACUUM beside the batches, from run()
        self._progress_lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[psycopg.Connection] = []

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
        self.progress = rb.progress(self.label, remaining, every_s=self.params.progress_every_s)
        passes = 0
        bp = self.params
        with Throttle(rb.engine, self.st.oid, bp.throttle, rb.log, ledger_schema=rb.params.ledger_schema,
                      batch=(bp.batch_size, bp.min_batch_size, bp.max_batch_size)) as throttle, \
                VacuumAlongside(rb.engine, self.st.schema, self.st.name, bp.vacuum_every_share,
                                max(float(self.st.estimated_rows), float(remaining)), rb.log) as vacuuming:
            self.vacuuming = vacuuming
            self.progress.status = lambda: "; ".join(s for s in (throttle.status(), vacuuming.status()) if s)
            while remaining:
                self._run_parts([p for p in parts if p["finished_at"] is None], throttle)
                passes += 1
                with rb.engine.connect() as conn:
                    remaining = self.assign.count(conn, self.st)
                if not remaining:
                    break
                if passes >= self.params.max_passes:  # this run's budget: a re-run gets a fresh one
                    raise RunbookError(
                        f"{self.st.name}: {remaining:,} rows still have no tenant after {self.params.max_passes} "
                        f"passes in this run; something writes them behind the rollout trigger (a session with "
                        f"session_replication_role = replica, or one that sets {RUNBOOK_SESSION_SETTING}). Find it, "
                        f"then re-run this notebook: it resumes.")
                rb.log(f"{self.label}: {remaining:,} rows without their tenant appeared meanwhile; sweeping again")
                rb.ledger.next_pass(rb.control, self.st.name, remaining)
                parts = rb.ledger.parts(rb.control, self.st.name)
                self.progress.total += remaining
            paused, worst_lag = throttle.paused_s, throttle.max_replica_lag_s
        self.progress.close()
        if vacuuming.runs:
            rb.log(f"{self.label}: {vacuuming.status()}")
        rb.ledger.record_pace(rb.control, rb.run_id, [
            {"table_name": self.st.name, "batch": i + 1, **row} for i, row in enumerate(self.progress.history)])
        after = rb.ledger.checkpoint(rb.control, self.st.name)
        return Outcome(after["rows_updated"] - (before or {}).get("rows_updated", 0),
                       after["batches"] - (before or {}).get("batches", 0), passes, paused, worst_lag)

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
                    runner_watch.runner_alive_or_stop(f"a batch of {self.st.name}")
                    faults.point("backfill.before_batch", self.st.name)
                    ask = throttle.batch_size(size)  # at most what the application's budget allows now
                    try:
                        upper, last = self.space.next_upper(conn, cursor, limit, ask)
                        conn.commit()
                    except DBAPIError as exc:  # e.g. the server went away between two batches
                        raise self._failed(exc) from None
                    statement, args = self.space.update(conn, cursor, upper, self.assign)
                    seconds = self._batch(conn, statement, args, part["part"],
                                          upper if upper is not None else cursor,
                                          {"batch_size": ask, **throttle.snapshot()})
                    if last:
                        with conn.begin():  # the worker's own connection: rb.control is not shared across threads
                            rb.ledger.finish_part(conn, self.st.name, part["part"])
                        return
                    cursor = upper
                    if p.target_batch_ms:
                        factor = min(2.0, max(0.5, p.target_batch_ms / max(1.0, seconds * 1000)))
                        size = int(min(p.max_batch_size, max(p.min_batch_size, ask * factor)))
                    if p.pause_ms:
                        time.sleep(p.pause_ms / 1000.0)
            finally:
                throttle.pids.discard(driver.info.backend_pid)
                self._workers.remove(driver)
                if skip_triggers and not driver.closed:
                    driver.rollback()
                    driver.execute("RESET session_replication_role")
                    driver.commit()

    def _failed(self, exc: DBAPIError) -> RunbookError:
        return RunbookError(f"{self.st.name}: backfill batch failed: {exc.orig}; every committed checkpoint is intact, "
                            f"fix the cause and re-run to resume")

    def _batch(self, conn: Connection, statement: str, args: list, part: int, new_last: Key,
               extra: dict | None = None) -> float:
        """One batch and its checkpoint in one transaction; lock timeouts climb the retry ladder."""
        rb = self.rb
        retry = rb.params.locks.retry
        for attempt in range(1, retry.attempts + 1):
            started = time.monotonic()
            try:
                with conn.begin():
                    rows = conn.exec_driver_sql(statement, tuple(args)).rowcount
                    faults.point("backfill.mid_batch", self.st.name, conn)
                    rb.ledger.advance_checkpoint(conn, self.st.name, part, new_last, rows)
                faults.point("backfill.after_batch", self.st.name)
                break
            except DBAPIError as exc:
                if not isinstance(exc.orig, pg_errors.LockNotAvailable):
                    raise self._failed(exc) from None
                if attempt == retry.attempts:
                    raise LockNotAcquired(
                        f"{self.st.name}: a backfill batch could not lock its rows after {retry.attempts} tries of "
                        f"{rb.params.locks.lock_timeout_ms} ms; long transactions hold them. End them and re-run: "
                        f"it resumes from the last checkpoint.") from None
                rb.log(f"  {self.st.name}: a batch waited on row locks (try {attempt}/{retry.attempts}); retrying")
                time.sleep(min(retry.backoff_ms * 2 ** (attempt - 1), retry.backoff_max_ms) / 1000.0)
        seconds = time.monotonic() - started
        faults.step_done(f"backfill: {self.st.name}: batch")
        with self._progress_lock:
            self.progress.advance(rows, batch_rows=rows, batch_s=seconds, **(extra or {}))
        if self.vacuuming is not None:
            self.vacuuming.rewritten(rows)
        return seconds
