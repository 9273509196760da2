"""Phase 3: tenant_id on every core table, and a tenant for every row, by the cheapest correct strategy.

- fast default: the column is absent and every row goes to the System Tenant, so
  `ADD COLUMN tenant_id bigint DEFAULT <id>` is metadata-only: existing rows read the default from the
  catalog, nothing is rewritten, ACCESS EXCLUSIVE is held for milliseconds. Never with REFERENCES in the
  same statement (that would scan the table under ACCESS EXCLUSIVE); the FK comes in constrain, NOT VALID.
- batched: the column exists with NULLs (a partly applied 0001). First SET DEFAULT, so rows the
  application inserts meanwhile get the System Tenant; then keyset batches in key order, one transaction
  each, `UPDATE … WHERE key in (last, upper] AND tenant_id IS NULL`, the checkpoint committed in the same
  transaction. Kill it anywhere: the re-run resumes after the last committed batch.
  Keyset columns: the params' `key`, else the primary key (composite keys compare as rows). A table with
  neither is walked in ctid page ranges (PostgreSQL 14+ scans those ranges directly; 13 scans per batch).
- default only: the column exists and is filled, but new rows would get NULL: SET DEFAULT.
The DEFAULT stays for the rollout window; backfill.keep_default: false removes it in constrain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pandas as pd
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy.exc import DBAPIError

from .. import catalog
from ..catalog import TableState
from ..ddl import ACCESS_EXCLUSIVE_META, ROW_EXCLUSIVE_BATCH, Step, plan_frame, results_frame
from ..errors import LockNotAcquired, RunbookError
from ..names import TENANT_COLUMN
from ..progress import Progress
from ..session import headless
from ..sqltext import render
from . import state as table_states

PHASE = "backfill"
COL = sql.Identifier(TENANT_COLUMN)
UNKNOWN_ID = sql.SQL("<System Tenant id>")


def _tenant_literal(system_id: int | None) -> sql.Composable:
    return UNKNOWN_ID if system_id is None else sql.Literal(int(system_id))


def strategy_for(st: TableState, system_id: int | None, null_count: int | None = None) -> str:
    if not st.has_column:
        return "fast default"
    if st.not_null:
        return "done"
    has_default = system_id is not None and table_states.default_value(st.default) == system_id
    if null_count is None or null_count > 0:
        return "batched"
    return "done" if has_default else "default only"


def plan_table(st: TableState, system_id: int | None, strategy: str, batch_size: int) -> list[Step]:
    """The statements for one table. The batched UPDATE loop is listed as one step with its lock."""
    tenant = _tenant_literal(system_id)
    if strategy == "fast default":
        return [Step(PHASE, st.name, "add tenant_id with the System Tenant as default",
                     sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint DEFAULT {}").format(st.qualified, COL, tenant),
                     ACCESS_EXCLUSIVE_META,
                     "a constant default is stored in the catalog: no row is rewritten or scanned")]
    steps: list[Step] = []
    if strategy in ("batched", "default only") and (
            system_id is None or table_states.default_value(st.default) != system_id):
        steps.append(Step(PHASE, st.name, "default new rows to the System Tenant",
                          sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(st.qualified, COL, tenant),
                          ACCESS_EXCLUSIVE_META,
                          "changes only the catalog; rows the application inserts meanwhile get a tenant"))
    if strategy == "batched":
        keys = key_columns(st, None)
        how = f"keyset on ({', '.join(keys)})" if keys else "ctid page ranges (no primary key)"
        steps.append(Step(PHASE, st.name, f"fill NULL tenant_id in batches of {batch_size:,} ({how})",
                          sql.SQL("UPDATE {} SET {} = {} WHERE <key range of one batch> AND {} IS NULL").format(
                              st.qualified, COL, tenant, COL),
                          ROW_EXCLUSIVE_BATCH,
                          "one short transaction per batch with its checkpoint; resumable; no table lock"))
    return steps


def project(st: TableState, system_id: int | None) -> TableState:
    """The table as backfill leaves it (for planning constrain before backfill has run)."""
    default = str(system_id) if system_id is not None else "<System Tenant id>"
    return replace(st, has_column=True, column_type=st.column_type or "bigint", default=default)


def key_columns(st: TableState, override: list[str] | None) -> list[str]:
    return list(override) if override else list(st.pk_columns)


# --- planning ------------------------------------------------------------------------------------

@dataclass
class TablePlan:
    state: TableState
    strategy: str
    null_count: int | None
    steps: list[Step]


def plans(rb) -> list[TablePlan]:
    system_id = table_states.system_tenant_id(rb)
    out = []
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            if not st.exists:
                raise RunbookError(f"core table {name!r} does not exist in schema {rb.schema!r}; fix the spec "
                                   f"(params core_tables) or create the table. Nothing was changed.")
            nulls = None
            if st.has_column and not st.not_null:
                nulls = catalog.null_tenant_count(conn, rb.schema, name)
            strategy = strategy_for(st, system_id, nulls)
            out.append(TablePlan(st, strategy, nulls, plan_table(st, system_id, strategy, rb.params.batch_size_for(name))))
    return out


def plan(rb) -> pd.DataFrame:
    """Per table: the strategy, then each statement with its lock."""
    with rb.engine.connect() as conn:
        return plan_frame([s for p in plans(rb) for s in p.steps], conn)


def strategies(rb) -> pd.DataFrame:
    rows = [{"table": p.state.name, "strategy": p.strategy,
             "rows with NULL tenant_id": "n/a (column absent)" if p.null_count is None and not p.state.has_column
             else (p.null_count if p.null_count is not None else 0)} for p in plans(rb)]
    return pd.DataFrame(rows, columns=["table", "strategy", "rows with NULL tenant_id"])


# --- applying ------------------------------------------------------------------------------------

@dataclass
class BackfillReport:
    summary: pd.DataFrame
    progress: pd.DataFrame
    steps: pd.DataFrame


def apply(rb) -> BackfillReport:
    baseline = rb.require_baseline().set_index("table_name")["row_count"]
    system_id = table_states.system_tenant_id(rb)
    if system_id is None and not rb.dry_run:
        raise RunbookError("the System Tenant does not exist yet: run 02_seed first. Nothing was changed.")
    executor = rb.executor()
    summary, progress, step_results = [], [], []
    for tp in plans(rb):
        started = time.monotonic()
        ddl_steps = [s for s in tp.steps if s.lock != ROW_EXCLUSIVE_BATCH]
        step_results += executor.run_all(ddl_steps)
        updated, batches = 0, 0
        if tp.strategy == "batched" and not rb.dry_run:
            job = BatchedBackfill(rb, tp.state, system_id)
            updated, batches = job.run()
            progress.append(job.progress.frame())
        by_default = int(baseline.get(tp.state.name, 0)) if tp.strategy == "fast default" and not rb.dry_run else 0
        summary.append({"table": tp.state.name, "strategy": tp.strategy,
                        "rows by default": by_default, "rows updated": updated, "batches": batches,
                        "outcome": "dry run" if rb.dry_run else ("nothing to do" if tp.strategy == "done" else "done"),
                        "seconds": round(time.monotonic() - started, 2)})
    frame = pd.DataFrame(summary, columns=["table", "strategy", "rows by default", "rows updated", "batches",
                                           "outcome", "seconds"])
    prog = pd.concat(progress, ignore_index=True) if progress else pd.DataFrame(
        columns=["label", "elapsed_s", "rows_done", "batch_rows", "batch_s"])
    return BackfillReport(frame, prog, results_frame(step_results))


def assert_filled(rb) -> str:
    """The notebook's last cell: every core table has tenant_id and no row is without a tenant."""
    if rb.dry_run:
        return "dry run: nothing was changed"
    problems = []
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            if not st.has_column:
                problems.append(f"{name}: tenant_id absent")
            elif not st.not_null and (n := catalog.null_tenant_count(conn, rb.schema, name)):
                problems.append(f"{name}: {n:,} rows with NULL tenant_id")
    if problems:
        raise RunbookError("backfill incomplete: " + "; ".join(problems) + ". Re-run 03_backfill: it resumes.")
    return f"every row of {len(rb.params.tables)} core tables has a tenant"


class BatchedBackfill:
    """Keyset (or ctid) batches over one table, each committed with its checkpoint."""

    def __init__(self, rb, st: TableState, system_id: int):
        self.rb = rb
        self.st = st
        self.system_id = system_id
        spec = rb.params.core_tables[st.name]
        self.keys = key_columns(st, spec.key)
        self.batch_size = rb.params.batch_size_for(st.name)
        self.key_types = self._key_types()
        self.progress: Progress | None = None

    def _key_types(self) -> list[str]:
        if not self.keys:
            return []
        if self.keys == self.st.pk_columns:
            return list(self.st.pk_types)
        with self.rb.engine.connect() as conn:
            types = dict(conn.exec_driver_sql(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s "
                "AND attnum > 0 AND NOT attisdropped", (self.st.oid,)).all())
        missing = [k for k in self.keys if k not in types]
        if missing:
            raise RunbookError(f"{self.st.name}: key column(s) {', '.join(missing)} in params do not exist; "
                               f"fix core_tables.{self.st.name}.key")
        return [types[k] for k in self.keys]

    # -- statements
    def _key_row(self, alias: str | None = None) -> sql.Composable:
        cols = [sql.Identifier(alias, k) if alias else sql.Identifier(k) for k in self.keys]
        return sql.SQL("({})").format(sql.SQL(", ").join(cols))

    def _bound_row(self) -> sql.Composable:
        return sql.SQL("({})").format(sql.SQL(", ").join(
            sql.SQL("%s::{}").format(sql.SQL(t)) for t in self.key_types))

    def _upper_query(self, has_lower: bool) -> sql.Composed:
        where = sql.SQL("WHERE {} > {} ").format(self._key_row("t"), self._bound_row()) if has_lower else sql.SQL("")
        # ORDER BY names the table's columns, qualified: an output column `id::text AS id` would sort as text
        return sql.SQL("SELECT {cols} FROM {t} AS t {where}ORDER BY {order} OFFSET %s LIMIT 1").format(
            cols=sql.SQL(", ").join(sql.SQL("t.{}::text AS {}").format(sql.Identifier(k), sql.Identifier(f"k{i}"))
                                    for i, k in enumerate(self.keys)),
            t=self.st.qualified, where=where,
            order=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in self.keys))

    def _update_query(self, has_lower: bool, has_upper: bool) -> sql.Composed:
        conds = []
        if has_lower:
            conds.append(sql.SQL("{} > {}").format(self._key_row(), self._bound_row()))
        if has_upper:
            conds.append(sql.SQL("{} <= {}").format(self._key_row(), self._bound_row()))
        conds.append(sql.SQL("{} IS NULL").format(COL))
        return sql.SQL("UPDATE {} SET {} = %s WHERE {}").format(self.st.qualified, COL, sql.SQL(" AND ").join(conds))

    # -- the loop
    def run(self) -> tuple[int, int]:
        rb, ledger = self.rb, self.rb.ledger
        strategy = "keyset" if self.keys else "ctid"
        with rb.engine.connect() as conn:
            remaining = catalog.null_tenant_count(conn, rb.schema, self.st.name)
        cp = ledger.open_checkpoint(rb.control, self.st.name, strategy, self.keys, remaining)
        if list(cp["key_columns"]) != self.keys and cp["last_key"] is not None:
            # the key changed since the checkpoint was written: its position means nothing now
            rb.log(f"backfill {self.st.name}: checkpoint was on ({', '.join(cp['key_columns'])}), now "
                   f"({', '.join(self.keys)}); starting a new pass over the new key")
            ledger.restart(rb.control, self.st.name, strategy, self.keys)
            cp = ledger.checkpoint(rb.control, self.st.name)
        if cp["finished_at"] is not None and remaining:
            ledger.next_pass(rb.control, self.st.name, remaining)  # NULLs written after it finished
            cp = ledger.checkpoint(rb.control, self.st.name)
        before_rows, before_batches = cp["rows_updated"], cp["batches"]
        live = not headless()
        self.progress = Progress(f"backfill {self.st.name}", remaining, every_s=rb.params.backfill.progress_every_s,
                                 live=live, log=rb.log)
        if cp["last_key"] is not None:
            rb.log(f"backfill {self.st.name}: resuming after key {cp['last_key']} "
                   f"(pass {cp['pass']}, {cp['rows_updated']:,} rows already done)")
        passes = 0
        while remaining:
            cp = ledger.checkpoint(rb.control, self.st.name)
            if self.keys:
                self._keyset_pass(cp["last_key"])
            else:
                self._ctid_pass(cp["last_key"])
            passes += 1
            with rb.engine.connect() as conn:
                remaining = catalog.null_tenant_count(conn, rb.schema, self.st.name)
            if not remaining:
                break
            if cp["pass"] + 1 > rb.params.backfill.max_passes:
                raise RunbookError(
                    f"{self.st.name}: {remaining:,} rows still have NULL tenant_id after "
                    f"{rb.params.backfill.max_passes} passes; something writes NULL explicitly. Find it (the DEFAULT "
                    f"covers inserts that omit tenant_id), then re-run this notebook.")
            rb.log(f"backfill {self.st.name}: {remaining:,} NULL rows appeared meanwhile; sweeping again")
            ledger.next_pass(rb.control, self.st.name, remaining)
            self.progress.total += remaining
        self.progress.close()
        ledger.close_checkpoint(rb.control, self.st.name)
        cp = ledger.checkpoint(rb.control, self.st.name)
        return cp["rows_updated"] - before_rows, cp["batches"] - before_batches

    def _keyset_pass(self, last_key: list[str] | None) -> None:
        while True:
            has_lower = last_key is not None
            upper_sql = self._upper_query(has_lower)
            with self.rb.engine.connect() as conn:
                args = (list(last_key) if has_lower else []) + [self.batch_size - 1]
                upper = conn.exec_driver_sql(render(conn, upper_sql), tuple(args)).first()
            upper_key = list(upper) if upper is not None else None
            args = [self.system_id] + (list(last_key) if has_lower else []) + (upper_key or [])
            update = self._update_query(has_lower, upper_key is not None)
            new_last = upper_key
            self._batch(update, args, new_last if new_last is not None else last_key)
            if upper_key is None:
                return
            last_key = upper_key

    def _ctid_pass(self, last_key: list[str] | None) -> None:
        rb = self.rb
        with rb.engine.connect() as conn:
            pages, reltuples, relpages = conn.exec_driver_sql(
                "SELECT pg_relation_size(%s::oid) / current_setting('block_size')::int, reltuples, relpages "
                "FROM pg_class WHERE oid = %s::oid", (self.st.oid, self.st.oid)).one()
            if reltuples > 0 and relpages > 0:
                per_page = reltuples / relpages
            else:  # never analyzed: count the rows of the first pages instead
                sample = min(max(int(pages), 1), 10)
                rows = conn.exec_driver_sql(render(conn, sql.SQL("SELECT count(*) FROM {} WHERE ctid < %s::tid").format(
                    self.st.qualified)), (f"({sample},0)",)).scalar()
                per_page = rows / sample
        step = max(1, int(self.batch_size // max(1.0, per_page)))
        page = int(last_key[0]) if last_key else 0
        while page <= pages:
            upper = page + step
            query = sql.SQL("UPDATE {} SET {} = %s WHERE ctid >= %s::tid AND ctid < %s::tid AND {} IS NULL").format(
                self.st.qualified, COL, COL)
            self._batch(query, [self.system_id, f"({page},0)", f"({upper},0)"], [str(upper)])
            page = upper

    def _batch(self, update: sql.Composed, args: list, new_last: list[str] | None) -> None:
        """One batch and its checkpoint in one transaction; lock timeouts climb the retry ladder."""
        rb = self.rb
        attempts = rb.params.locks.retry.attempts
        executor = rb.executor()
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                with rb.engine.connect() as conn, conn.begin():
                    rows = conn.exec_driver_sql(render(conn, update), tuple(args)).rowcount
                    rb.ledger.advance_checkpoint(conn, self.st.name, new_last, rows)
                break
            except DBAPIError as exc:
                if not isinstance(exc.orig, pg_errors.LockNotAvailable):
                    raise RunbookError(f"{self.st.name}: backfill batch failed: {exc.orig}; the last committed "
                                       f"checkpoint is intact, fix the cause and re-run to resume") from None
                if attempt == attempts:
                    raise LockNotAcquired(
                        f"{self.st.name}: a backfill batch could not lock its rows after {attempts} tries of "
                        f"{rb.params.locks.lock_timeout_ms} ms; long transactions hold them. End them and re-run: "
                        f"it resumes from the last checkpoint.") from None
                rb.log(f"  {self.st.name}: batch waited on row locks (try {attempt}/{attempts}); retrying")
                time.sleep(executor.backoff_s(attempt))
        self.progress.advance(rows, batch_rows=rows, batch_s=time.monotonic() - started)
        pause = rb.params.backfill.pause_ms
        if pause:
            time.sleep(pause / 1000.0)
