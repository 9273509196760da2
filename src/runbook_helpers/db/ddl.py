"""Safe DDL: one Step type, a retry ladder on lock timeouts, CONCURRENTLY outside transactions, dry runs.

A Step is one statement with the table it touches, the lock it takes and why it is safe. The Executor
runs it with a short lock_timeout that grows per try (so the application queues behind the runbook for
tens of milliseconds, not seconds), retries lock timeouts with jittered exponential sleeps, clears the
table first for statements that need ACCESS EXCLUSIVE or SHARE ROW EXCLUSIVE (cancels a plain autovacuum on
it, waits for an anti-wraparound one, names long transactions), journals every try in the ledger, and when
the ladder is exhausted fails with the sessions that blocked it (pg_blocking_pids, their query and age).
Each Step is atomic: a failed try leaves nothing behind, and the phase's plan re-reads the catalog, so a
re-run continues from whatever did commit.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy.engine import Connection, Engine

from .. import faults
from ..errors import LockNotAcquired, RunbookError
from ..params import LockParams
from . import catalog, lock_holders, privileges
from .sqltext import render

# Lock levels, spelled the way the PostgreSQL docs spell them, with what they mean for the application.
ACCESS_EXCLUSIVE_META = "ACCESS EXCLUSIVE (metadata only, milliseconds)"
SHARE_UPDATE_EXCLUSIVE = "SHARE UPDATE EXCLUSIVE (reads and writes continue)"
SHARE_ROW_EXCLUSIVE_META = "SHARE ROW EXCLUSIVE on table and tenants (metadata only, milliseconds)"
ROW_EXCLUSIVE_BATCH = "ROW EXCLUSIVE, row locks per batch (reads and writes continue)"
NEW_OBJECT = "none on existing tables (creates a new object)"

# PostgreSQL's table lock modes, weakest first, as pg_locks names them. A step's lock text names the modes it
# takes (on its table, sometimes also on another one: "SHARE ROW EXCLUSIVE on this partition and tenants");
# the strongest mode named is what the checks go by, which errs on the side of clearing the table.
PG_LOCK_MODES = {"ACCESS SHARE": "AccessShareLock", "ROW SHARE": "RowShareLock", "ROW EXCLUSIVE": "RowExclusiveLock",
                 "SHARE UPDATE EXCLUSIVE": "ShareUpdateExclusiveLock", "SHARE": "ShareLock",
                 "SHARE ROW EXCLUSIVE": "ShareRowExclusiveLock", "EXCLUSIVE": "ExclusiveLock",
                 "ACCESS EXCLUSIVE": "AccessExclusiveLock"}
_MODE_NAMES = re.compile(r"\b(" + "|".join(sorted(PG_LOCK_MODES, key=len, reverse=True)) + r")\b")


def strongest_lock_mode(lock: str) -> str | None:
    """The strongest pg_locks mode a lock text names (None: it names none, e.g. a new object)."""
    named = [PG_LOCK_MODES[m] for m in _MODE_NAMES.findall(lock)]
    order = list(PG_LOCK_MODES.values())
    return max(named, key=order.index) if named else None


# Modes that conflict with autovacuum and queue every application statement behind them while they wait.
QUEUEING_MODES = {"AccessExclusiveLock", "ShareRowExclusiveLock"}
# Modes that conflict with autovacuum's SHARE UPDATE EXCLUSIVE. PostgreSQL cancels a plain autovacuum only
# after a waiter has waited deadlock_timeout (1 s), which the ladder's short tries never reach: without
# clearing, a VALIDATE or an index build would exhaust the ladder behind a long autovacuum.
AUTOVACUUM_CONFLICTS = QUEUEING_MODES | {"ShareUpdateExclusiveLock"}

# The phase that runs every undo step: each phase module offers the steps that reverse it (undo_steps),
# and 99_rollback runs them under this name.
UNDO_PHASE = "rollback"


@dataclass(frozen=True)
class Step:
    phase: str
    table: str | None
    action: str
    statement: sql.Composable
    lock: str
    why: str
    transactional: bool = True  # False: CREATE/DROP INDEX CONCURRENTLY must run outside a transaction
    long_scan: bool = False      # True: VALIDATE or an index build; runs under statement_timeout only
    on_failure: sql.Composable | None = None  # undoes what a failed try leaves (an INVALID index)
    # after a failure that is not a lock timeout: `diagnose` is a read returning one row (count, sample keys)
    # that names what violates the statement (a VALIDATE); `on_error` puts back what an earlier step of the
    # phase left in force that new writes would meet (the NOT VALID constraint whose VALIDATE failed)
    diagnose: sql.Composable | None = None
    on_error: sql.Composable | None = None
    planned_rows: int | None = None  # an insert's rows as its plan counted them (what the apply reports against)

    @property
    def label(self) -> str:
        """How messages name the step: 'table: action', or the action alone for a step on no table."""
        return f"{self.table}: {self.action}" if self.table else self.action

    @property
    def lock_mode(self) -> str | None:
        """The strongest pg_locks mode this step's lock text names (None: a new object)."""
        return strongest_lock_mode(self.lock)

    @property
    def queues_the_application(self) -> bool:
        return self.table is not None and self.lock_mode in QUEUEING_MODES

    @property
    def waits_for_autovacuum(self) -> bool:
        return self.table is not None and self.lock_mode in AUTOVACUUM_CONFLICTS


@dataclass
class StepResult:
    step: Step
    outcome: str  # applied | dry run | failed
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None


def concurrent_index_steps(phase: str, table: str, schema: str, index: str, build: sql.Composable | None,
                           action: str, lock: str = SHARE_UPDATE_EXCLUSIVE, leftovers=()) -> list[Step]:
    """An index built CONCURRENTLY (outside a transaction, reads and writes continue): each INVALID leftover
    of an interrupted build in `leftovers` dropped first, then `build` (the CREATE … INDEX CONCURRENTLY
    statement; None when a valid index exists), whose failure drops what it left."""
    drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, index))
    out = [Step(phase, table, f"drop INVALID index {name} left by an interrupted build",
                sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, name)), lock,
                "CONCURRENTLY: reads and writes continue", transactional=False) for name in leftovers]
    if build is not None:
        out.append(Step(phase, table, action, build, lock, "CONCURRENTLY: reads and writes continue during the build",
                        transactional=False, long_scan=True, on_failure=drop))
    return out


def plan_frame(steps: list[Step], conn: Connection | None = None) -> pd.DataFrame:
    """The plan as a table: each statement with the table it touches and the lock it takes."""
    return pd.DataFrame(
        [{"phase": s.phase, "table": s.table or "", "action": s.action, "lock": s.lock,
          "statement": render(conn, s.statement), "why safe": s.why} for s in steps],
        columns=["phase", "table", "action", "lock", "statement", "why safe"],
    )


def results_frame(results: list[StepResult]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"table": r.step.table or "", "action": r.step.action, "outcome": r.outcome, "attempts": r.attempts,
          "seconds": round(r.seconds, 3)} for r in results],
        columns=["table", "action", "outcome", "attempts", "seconds"],
    )


class _BlockerWatch:
    """While a statement waits for its lock, ask once who blocks it (from another connection)."""

    def __init__(self, engine: Engine, pid: int, after_s: float):
        self.found: list[dict] = []
        self._timer = threading.Timer(after_s, self._look, args=(engine, pid))
        self._timer.daemon = True

    def _look(self, engine: Engine, pid: int) -> None:
        try:
            with engine.connect() as conn:
                self.found = catalog.blocking_sessions(conn, pid)
        except Exception:  # the watch is advisory; the statement's own outcome decides
            pass

    def __enter__(self) -> "_BlockerWatch":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def describe_blockers(blockers: list[dict]) -> str:
    if not blockers:
        return "no blocking session was caught in the act (the lock was held only briefly each time)"
    parts = []
    for b in blockers:
        parts.append(f"pid {b['pid']} ({b.get('user')}, {b.get('application_name') or 'no application_name'}, "
                     f"{b.get('state')}, open for {b.get('age')}): {b.get('query')!r}")
    return "blocked by " + "; ".join(parts)


class Executor:
    """Runs Steps against the database, or only lists them when dry_run is set."""

    def __init__(self, engine: Engine, locks: LockParams, *, dry_run: bool = False,
                 journal: Callable[..., int] | None = None, journal_end: Callable[..., None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print):
        self.engine = engine
        self.cleared: list[str] = []  # what clearing the tables did (cancelled, waited for, reported)
        self.locks = locks
        self.dry_run = dry_run
        self._journal = journal
        self._journal_end = journal_end
        self._sleep = sleep
        self._log = log

    def backoff_s(self, attempt: int) -> float:
        retry = self.locks.retry
        base = min(retry.backoff_ms * (2 ** (attempt - 1)), retry.backoff_max_ms) / 1000.0
        return max(0.0, base * (1 + random.uniform(-retry.jitter, retry.jitter)))

    def lock_timeout_ms(self, attempt: int) -> int:
        """The lock wait of try `attempt`: the first rung, doubling per try, capped at the top rung."""
        top = self.locks.lock_timeout_ms
        first = min(self.locks.first_lock_timeout_ms, top)
        return int(min(first * 2 ** min(attempt - 1, 30), top))

    def run_all(self, steps: list[Step]) -> list[StepResult]:
        return [self.run(step) for step in steps]

    def run(self, step: Step) -> StepResult:
        with self.engine.connect() as conn:
            statement = render(conn, step.statement)
        if self.dry_run:
            return StepResult(step, "dry run")
        entry = self._journal(step.phase, step.table, step.action, statement, step.lock) if self._journal else None
        cleared_from = len(self.cleared)

        def end(outcome: str, attempt: int, error: str | None) -> None:
            if self._journal_end and entry is not None:
                self._journal_end(entry, outcome, attempt, error, "\n".join(self.cleared[cleared_from:]) or None)

        started = time.monotonic()
        attempts = self.locks.retry.attempts
        blockers: list[dict] = []
        cleanup = self._cleanup_step(step)
        pending_cleanup = False
        reported: set[int] = set()
        for attempt in range(1, attempts + 1):
            lock_timeout = self.lock_timeout_ms(attempt)
            try:
                if step.waits_for_autovacuum:
                    try:
                        self._clear_the_table(step, reported)
                    except LockNotAcquired as exc:
                        end("lock timeout", attempt - 1, str(exc))
                        raise
                if pending_cleanup:
                    self._try(cleanup, self._render(cleanup), blockers, lock_timeout)
                    pending_cleanup = False
                faults.point("ddl.before_step", step.action)
                self._try(step, statement, blockers, lock_timeout)
            except pg_errors.LockNotAvailable:
                pending_cleanup = cleanup is not None
                if attempt == attempts:
                    break
                wait = self.backoff_s(attempt)
                self._log(f"  {step.label}: lock not granted within "
                          f"{lock_timeout} ms (try {attempt}/{attempts}); retrying in {wait:.2f} s")
                self._sleep(wait)
                continue
            except psycopg.Error as exc:
                if cleanup is not None:
                    self._best_effort(cleanup)
                message = f"{step.label} failed: {exc.diag.message_primary or exc}"
                message += self._diagnosis(step)
                undone = self._undo_on_error(step)
                end("failed", attempt, message + undone)
                raise RunbookError(f"{message}\n  statement: {statement}\n  nothing of this step was applied{undone}; "
                                   f"fix the cause and re-run this notebook (it resumes)") from None
            end("applied", attempt, None)
            faults.point("ddl.after_step", step.action)
            return StepResult(step, "applied", attempt, time.monotonic() - started)
        leftover = (" The interrupted build left an INVALID index that the lock timeout also kept from being "
                    "dropped; the re-run drops and rebuilds it." if pending_cleanup else " Nothing of this step was applied.")
        lowest, highest = self.lock_timeout_ms(1), self.lock_timeout_ms(attempts)
        waits = f"of {lowest} ms each" if lowest == highest else f"waiting {lowest} to {highest} ms each"
        message = (f"{step.label}: could not take its lock ({step.lock}) after {attempts} tries "
                   f"{waits}; {describe_blockers(blockers)}.{leftover} End or wait for "
                   f"those sessions, then re-run this notebook; it resumes here.")
        end("lock timeout", attempts, message)
        raise LockNotAcquired(message)

    def _diagnosis(self, step: Step) -> str:
        """'; N rows violate it, e.g. …' from the step's diagnose query (bounded: a count and a few keys)."""
        if step.diagnose is None:
            return ""
        try:
            with self.engine.connect() as conn:
                count, samples = conn.exec_driver_sql(render(conn, step.diagnose)).one()
        except Exception as exc:  # the diagnosis is advisory; the failure itself is reported either way
            return f" (the violating rows could not be listed: {type(exc).__name__})"
        if not count:
            return "; no violating row is left now (written and removed meanwhile?)"
        return f"; {int(count):,} row{'s' if count != 1 else ''} violate it, e.g. {', '.join(map(str, samples))}"

    def _undo_on_error(self, step: Step) -> str:
        if step.on_error is None:
            return ""
        undo = Step(step.phase, step.table, f"undo after: {step.action}", step.on_error, step.lock, step.why)
        try:
            self._try(undo, self._render(undo), [], self.locks.lock_timeout_ms)
        except psycopg.Error as exc:
            return (f"; what the phase added for it stays in force on new writes ({exc.diag.message_primary}): "
                    f"run: {self._render(undo)}")
        return f"; undone so new writes do not meet it: {self._render(undo)}"

    def _render(self, step: Step) -> str:
        with self.engine.connect() as conn:
            return render(conn, step.statement)

    @staticmethod
    def _cleanup_step(step: Step) -> Step | None:
        if step.on_failure is None:
            return None
        return Step(step.phase, step.table, f"clean up after: {step.action}", step.on_failure, step.lock,
                    step.why, transactional=False)

    def _best_effort(self, cleanup: Step) -> None:
        try:
            self._try(cleanup, self._render(cleanup), [], self.locks.lock_timeout_ms)
        except psycopg.Error as exc:
            self._log(f"  {cleanup.label} did not complete ({exc.diag.message_primary}); "
                      f"the next run finds the leftover and removes it")

    def _clear_the_table(self, step: Step, reported: set[int]) -> None:
        """Before a lock that autovacuum blocks: cancel a plain autovacuum on the table, wait out an
        anti-wraparound one; before a queueing lock also name long transactions holding locks on it (once
        per step: they are what the ladder's tries will wait for)."""
        deadline = time.monotonic() + self.locks.wraparound_wait_s
        next_line = 0.0
        may_cancel = None
        while True:
            with self.engine.connect() as conn:
                sessions = lock_holders.sessions_on_table(conn, step.table)
                wraparound = [s for s in sessions if s.is_wraparound_vacuum]
                for s in sessions:
                    if s.is_autovacuum and not s.is_wraparound_vacuum:
                        if may_cancel is None:
                            may_cancel, how = privileges.can_cancel_autovacuum(conn)
                        if not may_cancel:  # pg_cancel_backend would fail the step with 42501
                            self._say(f"  {step.label}: autovacuum pid {s.pid} is on the table and this "
                                      f"role may not cancel it ({how}); PostgreSQL cancels it once the statement "
                                      f"has waited deadlock_timeout")
                            continue
                        done = lock_holders.cancel_backend(conn, s.pid)
                        self._say(f"  {step.label}: cancelled autovacuum pid {s.pid} on the table "
                                  f"({s.query!r}){'' if done else ' (it had already ended)'}; it runs again later")
                    elif (step.queues_the_application and not s.is_autovacuum and s.pid not in reported
                          and s.age_s * 1000 >= self.locks.report_transactions_older_than_ms):
                        reported.add(s.pid)
                        self._say(f"  {step.label}: before trying: long transaction {s.describe()}")
                conn.commit()
            if not wraparound:
                return
            w = wraparound[0]
            if time.monotonic() >= deadline:
                raise LockNotAcquired(
                    f"{step.label}: an anti-wraparound autovacuum (pid {w.pid}, {w.progress()}) is "
                    f"still running on the table after {self.locks.wraparound_wait_s} s (locks.wraparound_wait_s); "
                    f"it must not be cancelled. Nothing of this step was applied; re-run this notebook once it "
                    f"has finished (it resumes here).")
            if time.monotonic() >= next_line:
                next_line = time.monotonic() + 10.0
                self._say(f"  {step.label}: waiting for an anti-wraparound autovacuum (pid {w.pid}), "
                          f"never cancelled: {w.progress()}")
            self._sleep(1.0)

    def _say(self, line: str) -> None:
        self.cleared.append(line.strip())
        self._log(line)

    def _try(self, step: Step, statement: str, blockers: list[dict], lock_timeout: int) -> None:
        if step.long_scan or not step.transactional:
            statement_timeout = self.locks.statement_timeout_ms
        else:
            # a metadata-only change may hold ACCESS EXCLUSIVE only briefly: cap it
            statement_timeout = lock_timeout + 10_000
        raw = self.engine.raw_connection()
        try:
            driver: psycopg.Connection = raw.driver_connection
            driver.autocommit = True
            pid = driver.info.backend_pid
            driver.execute(f"SET lock_timeout = {int(lock_timeout)}")
            driver.execute(f"SET statement_timeout = {int(statement_timeout)}")
            watch_after = max(0.02, min(lock_timeout / 2000.0, 1.0))
            with _BlockerWatch(self.engine, pid, watch_after) as watch:
                try:
                    if step.transactional:
                        with driver.transaction():
                            driver.execute(statement)
                    else:
                        driver.execute(statement)
                finally:
                    if watch.found:
                        seen = {b["pid"] for b in blockers}
                        blockers.extend(b for b in watch.found if b["pid"] not in seen)
            driver.execute("RESET lock_timeout")
            driver.execute("RESET statement_timeout")
            # the pool would hand an autocommit connection to the next user, whose batch and checkpoint
            # would then commit separately
            driver.autocommit = False
        except BaseException:
            raw.invalidate()  # never hand a connection in an unknown state back to the pool
            raise
        finally:
            raw.close()
