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
from . import catalog, lock_holders, privileges, runner_watch
from .plan_text import PlanFrame, statement_text
from .sqltext import render

# PostgreSQL's table lock modes, weakest first: as the docs spell them -> as pg_locks names them.
PG_LOCK_MODES = {"ACCESS SHARE": "AccessShareLock", "ROW SHARE": "RowShareLock", "ROW EXCLUSIVE": "RowExclusiveLock",
                 "SHARE UPDATE EXCLUSIVE": "ShareUpdateExclusiveLock", "SHARE": "ShareLock",
                 "SHARE ROW EXCLUSIVE": "ShareRowExclusiveLock", "EXCLUSIVE": "ExclusiveLock",
                 "ACCESS EXCLUSIVE": "AccessExclusiveLock"}
_MODE_NAMES = re.compile(r"\b(" + "|".join(sorted(PG_LOCK_MODES, key=len, reverse=True)) + r")\b")
THE_TABLE = None  # in a Lock: the step's own table


@dataclass(frozen=True)
class Lock:
    """The table locks one statement takes, per relation: the one place a step's lock text, its short form and
    the ladder's mode (autovacuum clearing, long transactions named) come from. tests/test_plan_locks.py runs
    each kind of step and compares this with pg_locks."""
    holds: tuple[tuple[str | None, str], ...] = ()  # (relation, mode as PG_LOCK_MODES spells it); None: the table
    brief: bool = False   # metadata only: held for milliseconds
    note: str = ""        # what it means for the application, e.g. "reads and writes continue"
    scope: str = ""       # where the table's lock reaches beyond it, e.g. "and every partition"
    spread: tuple[str, ...] = ()  # those relations by name (a partitioned table's partitions): the text says scope

    def __post_init__(self):
        unknown = [m for _, m in self.holds if m not in PG_LOCK_MODES]
        if unknown:
            raise ValueError(f"unknown lock mode(s) {unknown}; one of {', '.join(PG_LOCK_MODES)}")

    def relations(self, table: str | None) -> dict[str, str]:
        """relation -> pg_locks mode, the step's table filled in (for comparing with pg_locks)."""
        out = {(table if rel is THE_TABLE else rel): PG_LOCK_MODES[mode] for rel, mode in self.holds}
        mine = next((mode for rel, mode in self.holds if rel is THE_TABLE), None)
        for rel in self.spread if mine else ():
            out.setdefault(rel, PG_LOCK_MODES[mine])
        return out

    @property
    def strongest(self) -> str | None:
        """The strongest pg_locks mode it takes (None: it locks no existing table)."""
        order = list(PG_LOCK_MODES)
        return PG_LOCK_MODES[max((m for _, m in self.holds), key=order.index)] if self.holds else None

    def short(self) -> str:
        """E.g. "ACCESS EXCLUSIVE (brief)": the strongest mode, and whether it is held only for milliseconds."""
        if not self.holds:
            return "none"
        name = {v: k for k, v in PG_LOCK_MODES.items()}[self.strongest]
        return f"{name} (brief)" if self.brief else name

    def text(self, table: str | None = None) -> str:
        """The whole sentence, e.g. "SHARE ROW EXCLUSIVE on rules and workflows (metadata only, milliseconds)"."""
        notes = [n for n in ("metadata only, milliseconds" if self.brief else "", self.note) if n]
        tail = f" ({'; '.join(notes)})" if notes else ""
        if not self.holds:
            return "none on existing tables" + tail
        by_mode: dict[str, list[str]] = {}
        for rel, mode in self.holds:
            name = (table or "the table") if rel is THE_TABLE else rel
            if rel is THE_TABLE and self.scope:
                name += f" {self.scope}"
            by_mode.setdefault(mode, []).append(name)
        parts = [f"{mode} on {' and '.join(names)}" for mode, names in by_mode.items()]
        return ", ".join(parts) + tail

    def __str__(self) -> str:
        return self.text()


def on_table(mode: str, *also: tuple[str, str], brief: bool = False, note: str = "", scope: str = "",
             spread: tuple[str, ...] = (), relation: str | None = THE_TABLE) -> Lock:
    """`mode` on the step's table (or on `relation`, e.g. the one partition a step works on) and on the `spread`
    relations it reaches (its partitions), and each (relation, mode) of `also` on another one."""
    return Lock(((relation, mode), *also), brief=brief, note=note, scope=scope, spread=tuple(spread))


def strongest_lock_mode(lock: "Lock | str") -> str | None:
    """The strongest pg_locks mode a lock takes (a text: the strongest mode it names; None: none)."""
    if isinstance(lock, Lock):
        return lock.strongest
    named = [PG_LOCK_MODES[m] for m in _MODE_NAMES.findall(lock)]
    order = list(PG_LOCK_MODES.values())
    return max(named, key=order.index) if named else None


# The common ones. What a lock means for the application is in its note.
CONTINUES = "reads and writes continue"
ACCESS_EXCLUSIVE_META = on_table("ACCESS EXCLUSIVE", brief=True)
SHARE_UPDATE_EXCLUSIVE = on_table("SHARE UPDATE EXCLUSIVE", note=CONTINUES)
ROW_EXCLUSIVE_BATCH = on_table("ROW EXCLUSIVE", note="row locks per batch; " + CONTINUES)
NEW_OBJECT = Lock(note="creates a new object")
PRIVILEGES_ONLY = Lock(note="privileges only")


def foreign_key_lock(parent: str, scope: str = "", spread: tuple[str, ...] = (), relation: str | None = THE_TABLE,
                     parent_partitions: tuple[str, ...] = ()) -> Lock:
    """ADD FOREIGN KEY (NOT VALID, or attaching validated partitions' keys): SHARE ROW EXCLUSIVE on the table and
    on the table it references, and its partitions (all get the key's triggers)."""
    return on_table("SHARE ROW EXCLUSIVE", *((p, "SHARE ROW EXCLUSIVE") for p in (parent, *parent_partitions)),
                    brief=True, scope=scope, spread=spread, relation=relation)


def validate_foreign_key_lock(parent: str, scope: str = "", note: str = CONTINUES, spread: tuple[str, ...] = (),
                              relation: str | None = THE_TABLE) -> Lock:
    """VALIDATE of a foreign key: SHARE UPDATE EXCLUSIVE on the table it scans, ROW SHARE on the referenced one."""
    return on_table("SHARE UPDATE EXCLUSIVE", (parent, "ROW SHARE"), note=note, scope=scope, spread=spread,
                    relation=relation)


def drop_foreign_key_lock(parent: str) -> Lock:
    """DROP of a foreign key: ACCESS EXCLUSIVE on the table and on the table it references (its triggers go)."""
    return on_table("ACCESS EXCLUSIVE", (parent, "ACCESS EXCLUSIVE"), brief=True)


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
    lock: Lock | str  # a Lock in every phase's steps; a text only in ad-hoc steps
    why: str
    transactional: bool = True  # False: CREATE/DROP INDEX CONCURRENTLY must run outside a transaction
    long_scan: bool = False      # True: VALIDATE or an index build; runs under statement_timeout only
    on_failure: sql.Composable | None = None  # undoes what a failed try leaves (an INVALID index)
    # after a failure that is not a lock timeout: `diagnose` is a read returning one row (count, sample keys)
    # that names what violates the statement (a VALIDATE); `on_error` puts back what an earlier step of the
    # phase left in force that new writes would meet (the NOT VALID constraint whose VALIDATE failed)
    diagnose: sql.Composable | None = None
    on_error: sql.Composable | None = None
    # what each %s placeholder of `statement` holds, in order: a step the batch engine runs once per batch
    # (the plan shows the statement one batch runs, its key-range bounds as $1, $2, …); never run by Executor
    params: tuple[str, ...] = ()
    planned_rows: int | None = None  # an insert's rows as its plan counted them (what the apply reports against)

    @property
    def label(self) -> str:
        """How messages name the step: 'table: action', or the action alone for a step on no table."""
        return f"{self.table}: {self.action}" if self.table else self.action

    @property
    def lock_mode(self) -> str | None:
        """The strongest pg_locks mode this step takes (None: a new object)."""
        return strongest_lock_mode(self.lock)

    @property
    def lock_text(self) -> str:
        return self.lock.text(self.table) if isinstance(self.lock, Lock) else self.lock

    @property
    def lock_short(self) -> str:
        return self.lock.short() if isinstance(self.lock, Lock) else self.lock

    @property
    def queues_the_application(self) -> bool:
        return self.table is not None and self.lock_mode in QUEUEING_MODES

    @property
    def clears(self) -> dict[str, str]:
        """The relations the ladder clears before each try (autovacuum, long transactions named), with the mode
        this step takes on each: every one it locks in a mode autovacuum conflicts with (a text lock: its table)."""
        if self.table is None:
            return {}
        if isinstance(self.lock, Lock):
            return {rel: mode for rel, mode in self.lock.relations(self.table).items() if mode in AUTOVACUUM_CONFLICTS}
        return {self.table: self.lock_mode} if self.lock_mode in AUTOVACUUM_CONFLICTS else {}

    @property
    def waits_for_autovacuum(self) -> bool:
        return bool(self.clears)


@dataclass
class StepResult:
    step: Step
    outcome: str  # applied | dry run | failed
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None


def concurrent_index_steps(phase: str, table: str, schema: str, index: str, build: sql.Composable | None,
                           action: str, lock: "Lock" = SHARE_UPDATE_EXCLUSIVE, leftovers=()) -> list[Step]:
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
    """The plan as a table: each statement as it will run (placeholders as $1, $2, … with what they hold in
    `params`), the table it touches and the lock it takes (whole, and short in `lock mode`). Shown in a
    notebook it renders for reading (plan_text.PlanFrame); `runbook plan --format` writes it as SQL or JSON."""
    rows = []
    for s in steps:
        text, params = statement_text(render(conn, s.statement), s.params)
        rows.append({"phase": s.phase, "table": s.table or "", "action": s.action, "lock": s.lock_text,
                     "statement": text, "why safe": s.why, "lock mode": s.lock_short, "params": params,
                     "locks": s.lock.relations(s.table) if isinstance(s.lock, Lock) else {},
                     "brief": bool(getattr(s.lock, "brief", False))})
    return PlanFrame(rows, columns=PLAN_COLUMNS + ["lock mode", "params", "locks", "brief"])


PLAN_COLUMNS = ["phase", "table", "action", "lock", "statement", "why safe"]


def results_frame(results: list[StepResult]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"table": r.step.table or "", "action": r.step.action, "outcome": r.outcome, "attempts": r.attempts,
          "seconds": round(r.seconds, 3)} for r in results],
        columns=["table", "action", "outcome", "attempts", "seconds"],
    )


CATALOG_UNIQUE_INDEX = re.compile(r'"pg_\w+_index"')


def concurrent_catalog_update(exc: psycopg.Error) -> bool:
    """This statement and another session changed or created one catalog row at once: the later one fails with
    "tuple concurrently updated" (XX000), or with a duplicate in a catalog's unique index (23505, e.g.
    pg_authid_rolname_index). Citus meets it when it creates a table's owner, or a role granted on the table, on a
    worker while another database's distribution or an ALTER ROLE does the same. A transactional step is rolled
    back whole by it, so it is tried again like a lock timeout (the next try finds the row the other one made)."""
    if exc.sqlstate == "XX000":
        return exc.diag.message_primary == "tuple concurrently updated"  # elog: never translated
    if exc.sqlstate == "23505":  # a worker's error reaches the coordinator without its schema: the index's name
        return exc.diag.schema_name == "pg_catalog" or bool(CATALOG_UNIQUE_INDEX.search(exc.diag.message_primary or ""))
    return False


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
        runner_watch.runner_alive_or_stop(step.label)
        entry = self._journal(step.phase, step.table, step.action, statement, step.lock_text) if self._journal else None
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
                runner_watch.runner_alive_or_stop(step.label)
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
                if step.transactional and concurrent_catalog_update(exc) and attempt < attempts:
                    wait = self.backoff_s(attempt)
                    self._log(f"  {step.label}: another session changed or created the same catalog row at that moment "
                              f"({exc.diag.message_primary}; nothing of this step was applied; try "
                              f"{attempt}/{attempts}); retrying in {wait:.2f} s")
                    self._sleep(wait)
                    continue
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
            faults.step_done(f"{step.phase}: {step.label}")
            return StepResult(step, "applied", attempt, time.monotonic() - started)
        leftover = (" The interrupted build left an INVALID index that the lock timeout also kept from being "
                    "dropped; the re-run drops and rebuilds it." if pending_cleanup else " Nothing of this step was applied.")
        lowest, highest = self.lock_timeout_ms(1), self.lock_timeout_ms(attempts)
        waits = f"of {lowest} ms each" if lowest == highest else f"waiting {lowest} to {highest} ms each"
        message = (f"{step.label}: could not take its lock ({step.lock_text}) after {attempts} tries "
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
            wraparound = []
            with self.engine.connect() as conn:
                for relation, mode in step.clears.items():  # the table, and e.g. the table a foreign key references
                    where = "the table" if relation == step.table else relation
                    sessions = lock_holders.sessions_on_table(conn, relation)
                    wraparound += [s for s in sessions if s.is_wraparound_vacuum]
                    for s in sessions:
                        if s.is_autovacuum and not s.is_wraparound_vacuum:
                            if may_cancel is None:
                                may_cancel, how = privileges.can_cancel_autovacuum(conn)
                            if not may_cancel:  # pg_cancel_backend would fail the step with 42501
                                self._say(f"  {step.label}: autovacuum pid {s.pid} is on {where} and "
                                          f"this role may not cancel it ({how}); PostgreSQL cancels it once the "
                                          f"statement has waited deadlock_timeout")
                                continue
                            done = lock_holders.cancel_backend(conn, s.pid)
                            self._say(f"  {step.label}: cancelled autovacuum pid {s.pid} on {where} "
                                      f"({s.query!r}){'' if done else ' (it had already ended)'}; it runs again later")
                        elif (mode in QUEUEING_MODES and not s.is_autovacuum and s.pid not in reported
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
