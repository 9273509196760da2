"""Phase 3: tenant_id on every core table, and a tenant for every row, by the cheapest correct strategy.

- fast default: the column is absent and every row goes to the System Tenant, so
  `ADD COLUMN tenant_id bigint DEFAULT <id>` is metadata-only: existing rows read the default from the
  catalog, nothing is rewritten, ACCESS EXCLUSIVE is held for milliseconds. Never with REFERENCES in the
  same statement (that would scan the table under ACCESS EXCLUSIVE); the FK comes in constrain, NOT VALID.
- batched: the column exists with NULLs (a partly applied 0001). First SET DEFAULT, so rows the
  application inserts meanwhile get the System Tenant; then the batch engine (backfill/): keyset batches
  in key order, one transaction each, the checkpoint committed in the same transaction, batch size
  adapted to a target duration, optional parallel workers on disjoint key ranges, throttled when the
  application starts waiting on the backfill. Kill it anywhere: the re-run resumes from the checkpoints.
  Keyset columns: the params' `key`, else the primary key (composite keys compare as rows). A table with
  neither is walked in ctid page ranges (PostgreSQL 14+ scans those ranges directly; 13 scans per batch).
- default only: the column exists and is filled, but new rows would get NULL: SET DEFAULT.
- mapped (legacy.enabled, a table with org_column or parent): the fast default first where the column is
  absent (so no row is ever without a tenant, and new rows get the System Tenant), then the batch engine
  moves each row whose org maps to a real tenant from NULL or the System Tenant to that tenant. Parents
  are filled before their children, and a child takes its parent's tenant_id. Same checkpoints, progress
  and throttling as above.
The DEFAULT stays for the rollout window; backfill.keep_default: false removes it in constrain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pandas as pd
from psycopg import sql

from .. import faults
from ..backfill.assignment import Assignment
from ..backfill.engine import BatchedBackfill
from ..db import catalog
from ..db.catalog import TableState
from ..db.ddl import ACCESS_EXCLUSIVE_META, ROW_EXCLUSIVE_BATCH, UNDO_PHASE, Step, plan_frame, results_frame
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError
from ..legacy import mapping
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


def plan_table(st: TableState, system_id: int | None, strategy: str, batch_size: int,
               assignment: Assignment | None = None) -> list[Step]:
    """The statements for one table. The batched UPDATE loop is listed as one step with its lock."""
    tenant = _tenant_literal(system_id)
    if strategy == "mapped" and not st.has_column:
        return plan_table(st, system_id, "fast default", batch_size) + plan_table(
            replace(st, has_column=True, default=str(system_id)), system_id, strategy, batch_size, assignment)
    if strategy == "fast default":
        return [Step(PHASE, st.name, "add tenant_id with the System Tenant as default",
                     sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint DEFAULT {}").format(st.qualified, COL, tenant),
                     ACCESS_EXCLUSIVE_META,
                     "a constant default is stored in the catalog: no row is rewritten or scanned")]
    steps: list[Step] = []
    if strategy in ("batched", "default only", "mapped") and (
            system_id is None or table_states.default_value(st.default) != system_id):
        steps.append(Step(PHASE, st.name, "default new rows to the System Tenant",
                          sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(st.qualified, COL, tenant),
                          ACCESS_EXCLUSIVE_META,
                          "changes only the catalog; rows the application inserts meanwhile get a tenant"))
    if strategy == "mapped":
        keys = key_columns(st, None)
        how = f"keyset on ({', '.join(keys)})" if keys else "ctid page ranges (no primary key)"
        value = assignment.value if assignment is not None else sql.SQL("<the tenant of the row's org>")
        steps.append(Step(PHASE, st.name, f"give each row its org's tenant in batches of {batch_size:,} ({how})",
                          sql.SQL("UPDATE {} SET {} = {} WHERE <key range of one batch> AND <no tenant or the System "
                                  "Tenant while the org maps elsewhere>").format(st.qualified, COL, value),
                          ROW_EXCLUSIVE_BATCH,
                          "one short transaction per batch with its checkpoint; resumable; no table lock"))
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
    assignment: Assignment | None = None
    to_map: int | None = None  # mapped tables: rows still to move to their org's tenant


def _mapped_plan(rb, conn, st: TableState, system_id: int | None) -> TablePlan:
    """A table the legacy mapping covers: 'mapped' while rows are left to move to their org's tenant."""
    ready = system_id is not None and mapping.map_tables_exist(conn, rb.params)
    assignment = mapping.mapped_assignment(conn, rb.params, st.name, system_id) if ready else None
    nulls = catalog.null_tenant_count(conn, rb.schema, st.name) if st.has_column and not st.not_null else None
    if assignment is not None and st.has_column:
        pending = assignment.count(conn, st)
    else:  # before seed (a dry run): the rows whose org is a real tenant, and any NULLs
        pending = mapping.rows_to_map(conn, rb.params, st.name) + (nulls or 0)
    strategy = "mapped" if pending else strategy_for(st, system_id, nulls)
    steps = plan_table(st, system_id, strategy, rb.params.batch_size_for(st.name), assignment)
    return TablePlan(st, strategy, nulls, steps, assignment, pending)


def plans(rb) -> list[TablePlan]:
    system_id = table_states.system_tenant_id(rb)
    mapped = mapping.mapped_tables(rb.params) if mapping.enabled(rb.params) else {}
    out = []
    with rb.engine.connect() as conn:
        states = table_states.core_states(rb, conn)
        for name in mapping.ordered(rb.params, list(states)):
            st = states[name]
            if not st.exists:
                raise RunbookError(f"core table {name!r} does not exist in schema {rb.schema!r}; fix the spec "
                                   f"(params core_tables) or create the table. Nothing was changed.")
            if name in mapped:
                out.append(_mapped_plan(rb, conn, st, system_id))
                continue
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
             else (p.null_count if p.null_count is not None else 0),
             "rows to map to their org's tenant": p.to_map if p.to_map is not None else "n/a (not mapped)"}
            for p in plans(rb)]
    return pd.DataFrame(rows, columns=["table", "strategy", "rows with NULL tenant_id",
                                       "rows to map to their org's tenant"])


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
    table_plans = plans(rb)
    unmapped = [tp.state.name for tp in table_plans if tp.strategy == "mapped" and tp.assignment is None]
    if unmapped and not rb.dry_run:
        raise RunbookError(f"the legacy mapping is not in the ledger yet ({', '.join(unmapped)} map to their org's "
                           f"tenant): run 02_seed first. Nothing was changed.")
    for tp in table_plans:
        started = time.monotonic()
        ddl_steps = [s for s in tp.steps if s.lock != ROW_EXCLUSIVE_BATCH]
        step_results += executor.run_all(ddl_steps)
        updated, batches, paused = 0, 0, 0.0
        if tp.strategy in ("batched", "mapped") and not rb.dry_run:
            job = BatchedBackfill(rb, tp.state, system_id, tp.assignment)
            outcome = job.run(tp.to_map)
            updated, batches, paused = outcome.rows, outcome.batches, outcome.paused_s
            progress.append(job.progress.frame())
        added = tp.strategy == "fast default" or (tp.strategy == "mapped" and not tp.state.has_column)
        by_default = int(baseline.get(tp.state.name, 0)) if added and not rb.dry_run else 0
        faults.point("backfill.after_table", tp.state.name)
        summary.append({"table": tp.state.name, "strategy": tp.strategy,
                        "rows by default": by_default, "rows updated": updated, "batches": batches,
                        "outcome": "dry run" if rb.dry_run else ("nothing to do" if tp.strategy == "done" else "done"),
                        "seconds": round(time.monotonic() - started, 2), "throttled s": round(paused, 2)})
    frame = pd.DataFrame(summary, columns=["table", "strategy", "rows by default", "rows updated", "batches",
                                           "outcome", "seconds", "throttled s"])
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


# --- undo (run by 99_rollback) ---------------------------------------------------------------------

def undo_steps(rb, conn, before) -> list[Step]:
    """What reverses backfill, from the pre-change snapshot: tenant_id dropped where it did not exist before;
    where it did (a partly applied 0001), its default and every row's value of before put back."""
    out: list[Step] = []
    for name, st in table_states.core_states(rb, conn).items():
        was = before.tables[name]
        if not was["had_tenant_column"]:
            if st.has_column:
                out.append(Step(UNDO_PHASE, name, "drop tenant_id", sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
                    st.qualified, COL), ACCESS_EXCLUSIVE_META,
                    "dropping a column is a catalog change; the space is reclaimed by later rewrites"))
            continue
        if (st.default or None) != (was["tenant_column_default"] or None):
            statement = (sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(st.qualified, COL)
                         if not was["tenant_column_default"] else
                         sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                             st.qualified, COL, sql.SQL(was["tenant_column_default"])))
            out.append(Step(UNDO_PHASE, name, "restore the column default", statement, ACCESS_EXCLUSIVE_META,
                            "catalog change only"))
        keys = sql.SQL(", ").join(sql.SQL("t2.{}::text").format(sql.Identifier(k)) for k in was["key_columns"])
        values_before = sql.SQL(
            "SELECT t2.ctid AS row_id, t2.{c} AS now, lv.tenant_id AS was FROM {t} AS t2 LEFT JOIN {v} AS lv "
            "ON lv.table_name = {name} AND lv.key = json_build_array({keys})::jsonb").format(
                c=COL, t=st.qualified, v=sql.Identifier(rb.params.ledger_schema, "legacy_tenant_values"),
                name=sql.Literal(name), keys=keys)
        differing = conn.exec_driver_sql(render(conn, sql.SQL(
            "SELECT count(*) FROM ({}) AS x WHERE x.now IS DISTINCT FROM x.was").format(values_before))).scalar()
        if differing:
            out.append(Step(UNDO_PHASE, name, f"put back the tenant_id of before the migration ({differing:,} rows)",
                            sql.SQL("UPDATE {t} AS t SET {c} = x.was FROM ({lv}) AS x WHERE t.ctid = x.row_id "
                                    "AND x.now IS DISTINCT FROM x.was").format(t=st.qualified, c=COL, lv=values_before),
                            ROW_EXCLUSIVE_BATCH, "one UPDATE of the rows the backfill filled (no table lock)",
                            long_scan=True))
    return out


def forget(rb) -> None:
    """After the undo: the checkpoints describe rows that no longer carry a tenant."""
    if rb.ledger.exists(rb.control):
        rb.control.exec_driver_sql(render(rb.control, sql.SQL("DELETE FROM {}").format(
            sql.Identifier(rb.params.ledger_schema, "backfill_checkpoints"))))
