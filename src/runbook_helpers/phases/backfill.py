"""Phase 3: tenant_id on every core table, the rollout triggers, and a tenant for every row, by the
cheapest correct strategy.

In three passes, so that every trigger finds the columns it reads:
1. the column, where it is missing: `ADD COLUMN tenant_id bigint DEFAULT <System Tenant>` is metadata-only
   (existing rows read the value from the catalog, nothing is rewritten, ACCESS EXCLUSIVE is held for
   milliseconds). Never with REFERENCES in the same statement (that would scan the table under ACCESS
   EXCLUSIVE); the FK comes in constrain, NOT VALID.
2. the rollout triggers on every core table (tenancy/rollout.py), which give each row the application
   writes the tenant its own data implies, record what it writes, and replace the DEFAULT.
3. per table, the record of the application's writes is opened (one read that hashes every row), then
   the rows get their tenant:
   - fast default: nothing more (the default gave every row the System Tenant).
   - batched: the column existed with NULLs (a partly applied 0001): the batch engine (backfill/) fills
     them in keyset batches in key order, one transaction each, the checkpoint committed in the same
     transaction, batch size adapted to a target duration, optional parallel workers on disjoint key
     ranges, throttled when the application starts waiting on the backfill. Kill it anywhere: the re-run
     resumes from the checkpoints. Keyset columns: the params' `key`, else the primary key (composite keys
     compare as rows). A table with neither is walked in ctid page ranges.
   - mapped (legacy.enabled, a table with org_column or parent): the batch engine moves each row whose
     org maps to a real tenant from NULL or the System Tenant to that tenant, parents before children, a
     child taking its parent's tenant_id. Rows the application wrote since the record opened keep the
     tenant the trigger (or the writer) gave them. A partitioned table is walked leaf partition by leaf
     partition, each with its own checkpoint, as for the batched strategy.
   - done: the column is filled already.
The triggers stay for the rollout window: 06_finalize removes them once the application writes tenant_id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import pandas as pd
from psycopg import sql

from .. import faults
from ..backfill.assignment import Assignment, system_assignment
from ..backfill.engine import BatchedBackfill
from ..db import catalog, partitions, reconcile
from ..db.catalog import TableState
from ..db.ddl import ACCESS_EXCLUSIVE_META, ROW_EXCLUSIVE_BATCH, UNDO_PHASE, Step, plan_frame, results_frame
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError
from ..legacy import conflicts, mapping
from ..tenancy import rollout
from . import original_schema
from . import privileges
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
    if null_count is None or null_count > 0:
        return "batched"
    return "done"


def column_steps(st: TableState, system_id: int | None) -> list[Step]:
    """Pass 1: the column, where it is missing."""
    if st.has_column:
        return []
    spread = " (on the table and every partition)" if st.partitioned else ""
    return [Step(PHASE, st.name, "add tenant_id with the System Tenant for every existing row" + spread,
                 sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint DEFAULT {}").format(
                     st.qualified, COL, _tenant_literal(system_id)),
                 ACCESS_EXCLUSIVE_META + spread, "a constant default is stored in the catalog: no row is rewritten "
                 "or scanned" + ("; PostgreSQL adds the column to every partition, and to partitions created later"
                                 if spread else ""))]


def fill_step(st: TableState, system_id: int | None, strategy: str, batch_size: int,
              assignment: Assignment | None = None, leaves: list[str] | None = None) -> list[Step]:
    """Pass 3's batches, listed as one step with its lock (one per leaf partition of a partitioned table:
    `leaves`, the partitions the batches walk)."""
    keys = key_columns(st, None)
    how = f"keyset on ({', '.join(keys)})" if keys else "ctid page ranges (no primary key)"
    if strategy == "mapped":
        value = assignment.value if assignment is not None else sql.SQL("<the tenant of the row's org>")
        targets = [(f" of partition {leaf}", "; its own checkpoint", replace(st, name=leaf)) for leaf in leaves or []]
        return [Step(PHASE, st.name, f"give each row{of} its org's tenant in batches of {batch_size:,} ({how}{own})",
                     sql.SQL("UPDATE {} SET {} = {} WHERE <key range of one batch> AND <no tenant or the System "
                             "Tenant while the org maps elsewhere> AND <not written by the application since the "
                             "record opened>").format(assignment.target(target) if assignment is not None
                                                      else target.qualified, COL, value),
                     ROW_EXCLUSIVE_BATCH, "one short transaction per batch with its checkpoint; resumable; no table lock")
                for of, own, target in targets or [("", "", st)]]
    if strategy == "batched" and leaves:
        return [Step(PHASE, st.name, f"fill NULL tenant_id of partition {leaf} in batches of {batch_size:,} ({how}; "
                     f"its own checkpoint)", sql.SQL("UPDATE {} SET {} = {} WHERE <key range of one batch> AND {} IS "
                                                     "NULL").format(sql.Identifier(st.schema, leaf), COL,
                                                                    _tenant_literal(system_id), COL),
                     ROW_EXCLUSIVE_BATCH, "one short transaction per batch with its checkpoint; resumable; no table "
                     "lock") for leaf in leaves]
    if strategy == "batched":
        return [Step(PHASE, st.name, f"fill NULL tenant_id in batches of {batch_size:,} ({how})",
                     sql.SQL("UPDATE {} SET {} = {} WHERE <key range of one batch> AND {} IS NULL").format(
                         st.qualified, COL, _tenant_literal(system_id), COL),
                     ROW_EXCLUSIVE_BATCH, "one short transaction per batch with its checkpoint; resumable; no table lock")]
    return []


def project(st: TableState, system_id: int | None) -> TableState:
    """The table as backfill leaves it (for planning constrain before backfill has run): the column there,
    no DEFAULT (the rollout trigger gives new rows their tenant)."""
    return replace(st, has_column=True, column_type=st.column_type or "bigint", default=None)


def key_columns(st: TableState, override: list[str] | None) -> list[str]:
    return list(override) if override else list(st.pk_columns)


# --- the rollout triggers -----------------------------------------------------------------------

def rollout_table(rb, conn, st: TableState, system_id: int | None) -> rollout.RolloutTable:
    """What the rollout triggers of one table need: its key and pre-existing columns, and, with the legacy
    mapping, where its tenant comes from and which tables follow it."""
    p = rb.params
    spec = p.core_tables[st.name]
    legacy_on = mapping.enabled(p)
    parent = None
    if legacy_on and spec.parent is not None:
        parent = rollout.Parent(spec.parent.table, spec.parent.column, mapping.parent_key(conn, p, spec.parent.table))
    children = [(name, other.parent.column) for name, other in p.core_tables.items()
                if legacy_on and other.parent is not None and other.parent.table == st.name]
    return rollout.RolloutTable(
        schema=rb.schema, name=st.name, key=list(st.pk_columns), system_tenant=_tenant_literal(system_id),
        columns=[c for c in st.columns if c != TENANT_COLUMN], ledger=p.ledger_schema,
        org_column=spec.org_column if legacy_on else None, org_tenants="org_tenants" if legacy_on else None,
        parent=parent, children=children)


def _runbook_default(st: TableState, before: dict | None) -> bool:
    """Whether the column's DEFAULT is the runbook's (the fast default), not one the application had."""
    if not st.has_column:
        return True  # pass 1 adds it
    had = (before or {}).get("tenant_column_default")
    return st.default is not None and st.default != had


def rollout_steps(rb, conn, st: TableState, system_id: int | None, before: dict | None) -> list[Step]:
    """Pass 2: the triggers, where they are not there yet (and the window was not closed by 06_finalize)."""
    if st.has_column and (rollout.installed(conn, rb.schema, st.name)
                          or reconcile.closed(conn, rb.params.ledger_schema, st.name) is not None):
        return []
    table = rollout_table(rb, conn, st, system_id)
    return [rollout.install_step(PHASE, table, _runbook_default(st, before))]


def capture_steps(rb, conn, st: TableState, system_id: int | None) -> list[Step]:
    """Pass 3's first step: the record of the application's writes opens (tables with a primary key)."""
    if not st.pk_columns or rollout.capture_started(conn, rb.params.ledger_schema, st.name):
        return []
    return [rollout.capture_step(PHASE, rollout_table(rb, conn, st, system_id))]


# --- planning ------------------------------------------------------------------------------------

@dataclass
class TablePlan:
    state: TableState
    strategy: str
    null_count: int | None
    columns: list[Step] = field(default_factory=list)   # pass 1
    triggers: list[Step] = field(default_factory=list)  # pass 2
    fill: list[Step] = field(default_factory=list)      # pass 3: the record opens, then the batches
    assignment: Assignment | None = None
    to_map: int | None = None  # mapped tables: rows still to move to their org's tenant

    @property
    def steps(self) -> list[Step]:
        return self.columns + self.triggers + self.fill


def _mapped(rb, conn, st: TableState, system_id: int | None) -> tuple[str, int | None, Assignment | None, int]:
    """A table the legacy mapping covers: 'mapped' while rows are left to move to their org's tenant."""
    ready = system_id is not None and mapping.map_tables_exist(conn, rb.params)
    assignment = mapping.mapped_assignment(conn, rb.params, st.name, system_id) if ready else None
    nulls = catalog.null_tenant_count(conn, rb.schema, st.name) if st.has_column and not st.not_null else None
    if assignment is not None and st.has_column:
        # not the assignment's pending rows: a child's depend on parents this same run moves first
        pending = mapping.rows_not_where_their_org_says(conn, rb.params, st.name, system_id)
    else:  # before seed (a dry run): the rows whose org is a real tenant, and any NULLs
        pending = mapping.rows_to_map(conn, rb.params, st.name) + (nulls or 0)
    return ("mapped" if pending else strategy_for(st, system_id, nulls)), nulls, assignment, pending


def plans(rb) -> list[TablePlan]:
    system_id = table_states.system_tenant_id(rb)
    mapped = mapping.mapped_tables(rb.params) if mapping.enabled(rb.params) else {}
    out = []
    with rb.engine.connect() as conn:
        states = table_states.core_states(rb, conn)
        before = original_schema.tables(conn, rb.params.ledger_schema)
        for name in mapping.ordered(rb.params, list(states)):
            st = states[name]
            if not st.exists:
                raise RunbookError(f"core table {name!r} ({rb.params.where('core_tables', name)}) does not exist in "
                                   f"schema {rb.schema!r}; fix the spec in that file (or replace the inherited "
                                   f"core_tables with `!replace`) or create the table. Nothing was changed.")
            assignment, to_map = None, None
            if name in mapped:
                strategy, nulls, assignment, to_map = _mapped(rb, conn, st, system_id)
            else:
                nulls = catalog.null_tenant_count(conn, rb.schema, name) if st.has_column and not st.not_null else None
                strategy = strategy_for(st, system_id, nulls)
            after = project(st, system_id) if not st.has_column else st
            # the leaves the batches walk: those with NULLs; mapped, every leaf (a child's rows wait on parents
            # this same run moves first, so what is pending is counted when its turn comes)
            leaves = [leaf.name for leaf in partitions.leaves(partitions.tree(conn, st))
                      if strategy == "mapped" or (strategy == "batched" and
                                                  catalog.null_tenant_count(conn, rb.schema, leaf.name))]
            fill = capture_steps(rb, conn, after, system_id) + fill_step(
                after, system_id, strategy, rb.params.batch_size_for(name), assignment, leaves)
            out.append(TablePlan(st, strategy, nulls, column_steps(st, system_id),
                                 rollout_steps(rb, conn, st, system_id, before.get(name)), fill, assignment, to_map))
    return out


def execution_order(table_plans: list[TablePlan]) -> list[Step]:
    """Every column first, then every trigger (a parent's trigger reads its children's column), then per
    table the record and the batches."""
    return ([s for tp in table_plans for s in tp.columns] + [s for tp in table_plans for s in tp.triggers]
            + [s for tp in table_plans for s in tp.fill])


def plan(rb) -> pd.DataFrame:
    """Every statement in the order it runs, with its lock."""
    with rb.engine.connect() as conn:
        return plan_frame(execution_order(plans(rb)), conn)


def strategies(rb) -> pd.DataFrame:
    rows = [{"table": p.state.name, "strategy": p.strategy,
             "rows with NULL tenant_id": "n/a (column absent)" if p.null_count is None and not p.state.has_column
             else (p.null_count if p.null_count is not None else 0),
             "rows to map to their org's tenant": p.to_map if p.to_map is not None else "n/a (not mapped)",
             "rollout trigger": "to install" if p.triggers else "installed"}
            for p in plans(rb)]
    return pd.DataFrame(rows, columns=["table", "strategy", "rows with NULL tenant_id",
                                       "rows to map to their org's tenant", "rollout trigger"])


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
    if not rb.dry_run:
        privileges.require(rb)
        conflicts.require_resolved(rb)
    executor = rb.executor()
    summary, progress, step_results = [], [], []
    table_plans = plans(rb)
    unmapped = [tp.state.name for tp in table_plans if tp.strategy == "mapped" and tp.assignment is None]
    if unmapped and not rb.dry_run:
        raise RunbookError(f"the legacy mapping is not in the ledger yet ({', '.join(unmapped)} map to their org's "
                           f"tenant): run 02_seed first. Nothing was changed.")
    if not rb.dry_run:
        rb.ledger.ensure(rb.control)  # a ledger from an older runbook gains the rollout window's tables
    started = {tp.state.name: time.monotonic() for tp in table_plans}
    step_results += executor.run_all([s for tp in table_plans for s in tp.columns])
    step_results += executor.run_all([s for tp in table_plans for s in tp.triggers])
    for tp in table_plans:
        step_results += executor.run_all([s for s in tp.fill if s.lock != ROW_EXCLUSIVE_BATCH])
        updated, batches, paused, worst_lag = 0, 0, 0.0, None
        if tp.strategy in ("batched", "mapped") and not rb.dry_run:
            assignment = tp.assignment
            if tp.strategy == "mapped" and not tp.state.has_column:
                with rb.engine.connect() as conn:  # the column exists now: count what the mapping moves
                    assignment = mapping.mapped_assignment(conn, rb.params, tp.state.name, system_id)
            with rb.engine.connect() as conn:
                state = table_states.core_state(rb, conn, tp.state.name)
                targets = [(state, tp.to_map)]
                if state.partitioned:  # leaf by leaf, each with its own checkpoint; the parent's triggers are
                    # the leaves' too (PostgreSQL 13 and 14 list a partition's copies of them as internal)
                    pending = assignment or system_assignment(system_id)
                    targets = [(replace(leaf.state, triggers=leaf.state.triggers or state.triggers), n)
                               for leaf in partitions.leaves(partitions.tree(conn, state))
                               if (n := pending.count(conn, leaf.state))]
            for target, total in targets:
                job = BatchedBackfill(rb, target, system_id, assignment, core_table=tp.state.name)
                outcome = job.run(total)
                updated, batches, paused = updated + outcome.rows, batches + outcome.batches, paused + outcome.paused_s
                if outcome.max_replica_lag_s is not None:
                    worst_lag = max(worst_lag or 0.0, outcome.max_replica_lag_s)
                progress.append(job.progress.frame())
        added = not tp.state.has_column
        by_default = int(baseline.get(tp.state.name, 0)) if added and not rb.dry_run else 0
        faults.point("backfill.after_table", tp.state.name)
        summary.append({"table": tp.state.name, "strategy": tp.strategy,
                        "rows by default": by_default, "rows updated": updated, "batches": batches,
                        "outcome": "dry run" if rb.dry_run else ("nothing to do" if not tp.steps else "done"),
                        "seconds": round(time.monotonic() - started[tp.state.name], 2), "throttled s": round(paused, 2),
                        "max replica lag s": None if worst_lag is None else round(worst_lag, 2)})
    frame = pd.DataFrame(summary, columns=["table", "strategy", "rows by default", "rows updated", "batches",
                                           "outcome", "seconds", "throttled s", "max replica lag s"])
    prog = pd.concat(progress, ignore_index=True) if progress else pd.DataFrame(
        columns=["label", "elapsed_s", "rows_done", "batch_rows", "batch_s", "batch_size", "pace_ms", "canary_p99_ms",
                 "replica_lag_s"])
    return BackfillReport(frame, prog, results_frame(step_results))


def assert_filled(rb) -> str:
    """The notebook's last cell: every core table has tenant_id and its rollout triggers, and no row is
    without a tenant."""
    if rb.dry_run:
        return "dry run: nothing was changed"
    problems = []
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            if not st.has_column:
                problems.append(f"{name}: tenant_id absent")
                continue
            if not st.not_null and (n := catalog.null_tenant_count(conn, rb.schema, name)):
                problems.append(f"{name}: {n:,} rows with NULL tenant_id")
            if not rollout.installed(conn, rb.schema, name) and \
                    reconcile.closed(conn, rb.params.ledger_schema, name) is None:  # (06_finalize removes them)
                problems.append(f"{name}: no rollout trigger")
    if problems:
        raise RunbookError("backfill incomplete: " + "; ".join(problems) + ". Re-run 03_backfill: it resumes.")
    return f"every row of {len(rb.params.tables)} core tables has a tenant, and the rollout triggers give new rows theirs"


# --- undo (run by 99_rollback) ---------------------------------------------------------------------

def undo_steps(rb, conn, before) -> list[Step]:
    """What reverses backfill, from the pre-change snapshot: tenant_id dropped where it did not exist before;
    where it did (a partly applied 0001), its default and every row's value of before put back."""
    out: list[Step] = []
    states = table_states.core_states(rb, conn)
    for name, st in states.items():  # the triggers first: nothing may assign or record while the rest is undone
        out += rollout.undo_steps(rollout_table(rb, conn, st, None), rollout.installed(conn, rb.schema, name))
    for name, st in states.items():
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
            "SELECT t2.tableoid AS rel, t2.ctid AS row_id, t2.{c} AS now, lv.tenant_id AS was FROM {t} AS t2 "
            "LEFT JOIN {v} AS lv "
            "ON lv.table_name = {name} AND lv.key = json_build_array({keys})::jsonb").format(
                c=COL, t=st.qualified, v=sql.Identifier(rb.params.ledger_schema, "legacy_tenant_values"),
                name=sql.Literal(name), keys=keys)
        differing = conn.exec_driver_sql(render(conn, sql.SQL(
            "SELECT count(*) FROM ({}) AS x WHERE x.now IS DISTINCT FROM x.was").format(values_before))).scalar()
        if differing:
            out.append(Step(UNDO_PHASE, name, f"put back the tenant_id of before the migration ({differing:,} rows)",
                            sql.SQL("UPDATE {t} AS t SET {c} = x.was FROM ({lv}) AS x WHERE t.tableoid = x.rel "
                                    "AND t.ctid = x.row_id AND x.now IS DISTINCT FROM x.was").format(t=st.qualified, c=COL, lv=values_before),
                            ROW_EXCLUSIVE_BATCH, "one UPDATE of the rows the backfill filled (no table lock)",
                            long_scan=True))
    return out


def forget(rb) -> None:
    """After the undo: the checkpoints describe rows that no longer carry a tenant, and the rollout window's
    record of the application's writes describes a window that is closed."""
    if rb.ledger.exists(rb.control):
        for table in ("backfill_checkpoints", "capture_start", "capture_end", "app_writes", "rollout_assists"):
            if catalog.relation_oid(rb.control, rb.params.ledger_schema, table) is not None:
                rb.control.exec_driver_sql(render(rb.control, sql.SQL("DELETE FROM {}").format(
                    sql.Identifier(rb.params.ledger_schema, table))))
