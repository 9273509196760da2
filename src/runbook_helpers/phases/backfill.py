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
4. each table whose rows the batches rewrote: VACUUM (ANALYZE) (db/vacuum.py; plain VACUUM, reads and writes
   continue), unless backfill.vacuum_after is false. The plan says first what the batches will cost (cost():
   rows, WAL, time, growth, checkpoints; the model is backfill/cost.py), and apply records every core table's
   size before it changes anything (validate shows before and after).
The triggers stay for the rollout window: 06_finalize removes them once the application writes tenant_id.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import pandas as pd
from psycopg import sql

from .. import faults
from ..backfill import cost as cost_model
from ..backfill.assignment import Assignment, system_assignment
from ..backfill.engine import BatchedBackfill
from ..backfill.keyspace import one_batch, space_for
from ..db import catalog, partitions, reconcile, sizes, vacuum
from ..db.catalog import TableState
from ..db.ddl import ACCESS_EXCLUSIVE_META, ROW_EXCLUSIVE_BATCH, UNDO_PHASE, Step, on_table, plan_frame, results_frame
from ..db.names import SYSTEM_TENANT_ID_UNKNOWN, TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError
from ..legacy import conflicts, mapping
from ..tenancy import rollout
from . import original_schema
from . import privileges
from . import state as table_states

PHASE = "backfill"
COL = sql.Identifier(TENANT_COLUMN)
UNKNOWN_ID = sql.SQL(SYSTEM_TENANT_ID_UNKNOWN)


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


def column_steps(st: TableState, system_id: int | None, every: tuple[str, ...] = ()) -> list[Step]:
    """Pass 1: the column, where it is missing (`every`: a partitioned table's partitions, which it reaches)."""
    if st.has_column:
        return []
    spread = " (on the table and every partition)" if st.partitioned else ""
    return [Step(PHASE, st.name, "add tenant_id with the System Tenant for every existing row" + spread,
                 sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint DEFAULT {}").format(
                     st.qualified, COL, _tenant_literal(system_id)),
                 on_table("ACCESS EXCLUSIVE", brief=True, scope="and every partition" if spread else "", spread=every),
                 "a constant default is stored in the catalog: no row is rewritten "
                 "or scanned" + ("; PostgreSQL adds the column to every partition, and to partitions created later"
                                 if spread else ""))]


def fill_step(conn, st: TableState, system_id: int | None, strategy: str, batch_size: int,
              assignment: Assignment | None = None, leaves: list[str] | None = None,
              keys: list[str] | None = None) -> list[Step]:
    """Pass 3's batches, listed as one step with its lock (one per leaf partition of a partitioned table:
    `leaves`, the partitions the batches walk): the UPDATE one batch runs, its key-range bounds as placeholders
    (`params` says what each holds), exactly as the batch engine renders it."""
    keys = key_columns(st, keys)
    how = f"keyset on ({', '.join(keys)})" if keys else "ctid page ranges (no primary key)"
    if strategy not in ("mapped", "batched"):
        return []
    assign = assignment or system_assignment_for(system_id)
    targets = [(f" of partition {leaf}", "; its own checkpoint", replace(st, name=leaf)) for leaf in leaves or []]
    out = []
    for of, own, target in targets or [("", "", st)]:
        statement, held = one_batch(conn, space_for(conn, target, keys), assign)
        action = (f"give each row{of} its org's tenant in batches of {batch_size:,} ({how}{own})" if strategy == "mapped"
                  else f"fill NULL tenant_id{of} in batches of {batch_size:,} ({how}{own})")
        lock = ROW_EXCLUSIVE_BATCH if target is st else on_table("ROW EXCLUSIVE", note=ROW_EXCLUSIVE_BATCH.note,
                                                                   relation=target.name)
        out.append(Step(PHASE, st.name, action, sql.SQL(statement), lock,
                        "one short transaction per batch with its checkpoint; resumable; no table lock",
                        params=held))
    return out


def system_assignment_for(system_id: int | None) -> Assignment:
    """The System Tenant's assignment; before seed inserted it, with its id as a placeholder."""
    if system_id is not None:
        return system_assignment(system_id)
    return Assignment(UNKNOWN_ID, sql.SQL("{} IS NULL").format(COL))


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
    every = tuple(p.name for p in partitions.tree(conn, st)) if st.partitioned else ()
    return [rollout.install_step(PHASE, table, _runbook_default(st, before), every)]


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
    after: list[Step] = field(default_factory=list)     # pass 4: VACUUM (ANALYZE) of what the batches rewrote
    after_relations: list[str] = field(default_factory=list)  # the relation each of those vacuums

    @property
    def steps(self) -> list[Step]:
        return self.columns + self.triggers + self.fill + self.after

    @property
    def rows_to_rewrite(self) -> int:
        """Rows the batches will write a new version of (exact: counted by the plan)."""
        if self.strategy == "batched":
            return int(self.null_count or 0)
        if self.strategy == "mapped":
            return int(self.to_map or 0)
        return 0


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


VACUUM_DUE_SQL = """
SELECT EXISTS (SELECT 1 FROM {ckpt} c WHERE c.table_name = %s AND c.rows_updated > 0 AND c.finished_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {journal} j WHERE j.phase = %s AND j.statement = %s AND j.outcome = 'applied'
                  AND j.finished_at >= c.finished_at))
"""


def vacuum_steps(rb, conn, st: TableState, strategy: str, leaves: list[str]) -> tuple[list[Step], list[str]]:
    """Pass 4, unless backfill.vacuum_after is false: VACUUM (ANALYZE) of each relation the batches will
    rewrite, and of each one an earlier run rewrote without vacuuming it after (killed in between): its
    checkpoint finished after the journal's last VACUUM of it."""
    if not rb.params.backfill.vacuum_after:
        return [], []
    names = (leaves or [leaf.name for leaf in partitions.leaves(partitions.tree(conn, st))]) if st.partitioned \
        else [st.name]
    ledger = rb.params.ledger_schema
    known = rb.ledger.exists(conn) and catalog.relation_oid(conn, ledger, "backfill_checkpoints") is not None
    out: list[tuple[Step, str]] = []
    for name in names:
        what = f" (partition {name})" if name != st.name else ""
        step = vacuum.vacuum_step(PHASE, st.name, sql.Identifier(st.schema, name), what,
                                  relname=name if name != st.name else None)
        due = strategy in ("batched", "mapped") and (name in leaves or not st.partitioned)
        if not due and known:
            due = bool(conn.exec_driver_sql(render(conn, sql.SQL(VACUUM_DUE_SQL).format(
                ckpt=sql.Identifier(ledger, "backfill_checkpoints"), journal=sql.Identifier(ledger, "statement_journal"))),
                (name, PHASE, render(conn, step.statement))).scalar())
        if due:
            out.append((step, name))
    return [s for s, _ in out], [n for _, n in out]


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
            planned = assignment
            if strategy == "mapped" and planned is None:  # before seed: as it will be once the mapping exists
                planned = mapping.mapped_assignment(conn, rb.params, name, _tenant_literal(system_id))
            fill = capture_steps(rb, conn, after, system_id) + fill_step(
                conn, after, system_id, strategy, rb.params.batch_size_for(name), planned, leaves,
                rb.params.core_tables[name].key)
            after, relations = vacuum_steps(rb, conn, st, strategy, leaves)
            every = tuple(p.name for p in partitions.tree(conn, st)) if st.partitioned else ()
            out.append(TablePlan(st, strategy, nulls, column_steps(st, system_id, every),
                                 rollout_steps(rb, conn, st, system_id, before.get(name)), fill, assignment, to_map,
                                 after, relations))
    rb._backfill_plans = (time.monotonic(), out)  # for cost() of the plan just shown (not for apply)
    return out


def execution_order(table_plans: list[TablePlan]) -> list[Step]:
    """Every column first, then every trigger (a parent's trigger reads its children's column), then per
    table the record and the batches, then the vacuums."""
    return ([s for tp in table_plans for s in tp.columns] + [s for tp in table_plans for s in tp.triggers]
            + [s for tp in table_plans for s in tp.fill] + [s for tp in table_plans for s in tp.after])


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


# --- the cost, before anything runs ---------------------------------------------------------------

COST_COLUMNS = ["table", "strategy", "rows to rewrite", "rows from", "HOT updates (%)", "WAL (MB)",
                "full-page images (MB)", "time (s)", "heap growth (MB)", "index growth (MB)", "row size from"]
MB = 1024 * 1024
PLAN_REUSE_S = 60.0  # cost() reuses a plan this recent (its counts are full scans); apply always plans afresh


@dataclass
class CostReport:
    """Per table what the batches will cost (the model: backfill/cost.py), a totals row, and what it means
    for the server: checkpoints forced, the rate the time assumes, growth VACUUM will not give back."""
    table: pd.DataFrame
    warnings: list[str]
    wal_bytes: float
    checkpoints: int
    rate: str  # where the time's rate comes from

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{line}</li>" for line in self.warnings)
        return self.table.to_html(index=False) + (f"<ul>{notes}</ul>" if notes else "")

    def __repr__(self) -> str:
        return self.table.to_string(index=False) + "".join(f"\n- {line}" for line in self.warnings)


def _relations(conn, tp: TablePlan) -> list[tuple[TableState, int]]:
    """The relations the batches rewrite with the rows each gets: a partitioned table's leaves share the
    counted rows in proportion to their reltuples (the count is of the whole table)."""
    rows = tp.rows_to_rewrite
    if not tp.state.partitioned:
        return [(tp.state, rows)]
    leaves = [leaf.state for leaf in partitions.leaves(partitions.tree(conn, tp.state))]
    weights = [max(leaf.estimated_rows, 0) for leaf in leaves]
    total = sum(weights) or len(leaves)
    shares = [int(rows * (w if sum(weights) else 1) / total) for w in weights]
    if shares:
        shares[-1] += rows - sum(shares)
    return list(zip(leaves, shares))


def cost(rb, table_plans: list[TablePlan] | None = None, checkpoints_seen: int | None = None) -> CostReport:
    """What the batches will cost, per table and in all, before anything runs: rows to rewrite (exact), WAL
    (with full-page images), time at the measured rate, heap and index growth; and how many checkpoints the
    WAL forces against max_wal_size (a warning, never a refusal). Reads only the catalog and pg_stats, and
    the counts of the plan this session made in the last minute (the plan just shown), else a fresh plan's.
    `checkpoints_seen`: the cost as if that many checkpoints fall inside the run (default: those its WAL forces)."""
    if table_plans is None:
        made, recent = getattr(rb, "_backfill_plans", (None, None))
        fresh = made is not None and time.monotonic() - made < PLAN_REUSE_S
        table_plans = recent if fresh else plans(rb)
    ledger = rb.params.ledger_schema
    with rb.engine.connect() as conn:
        srv = cost_model.server(conn)
        measured = sql.Identifier(ledger, "backfill_checkpoints") \
            if catalog.relation_oid(conn, ledger, "backfill_checkpoints") is not None else None
        rate = cost_model.rate(conn, measured)
        work = []
        for tp in table_plans:
            key = key_columns(tp.state, rb.params.core_tables[tp.state.name].key)
            rels = _relations(conn, tp) if tp.rows_to_rewrite else []
            work.append((tp, [(cost_model.shape(conn, rel, key, srv.block_size), n) for rel, n in rels if n]))
    costs, forced = cost_model.estimate_run([item for _, items in work for item in items], srv, rate,
                                          checkpoints_seen)
    rows, at = [], 0
    total = cost_model.NOTHING
    for tp, items in work:
        c = cost_model.NOTHING
        for one in costs[at:at + len(items)]:
            c = c + one
        at += len(items)
        total = total + c
        how = {"batched": "exact: NULL tenant_id counted", "mapped": "exact: rows to map counted"}.get(
            tp.strategy, "none: " + ("metadata only" if tp.strategy == "fast default" else "nothing to do"))
        rows.append(_cost_row(tp.state.name, tp.strategy, c, how, rate))
    rows.append(_cost_row("total", "", total, "", rate))
    seconds = sum(rate.seconds(c) for c in costs)
    return CostReport(pd.DataFrame(rows, columns=COST_COLUMNS), _cost_warnings(total, seconds, forced, srv, rate),
                      total.wal_bytes, forced, rate.source)


def _cost_row(name: str, strategy: str, c: cost_model.Cost, how: str, rate: cost_model.Rate) -> dict:
    return {"table": name, "strategy": strategy, "rows to rewrite": c.rows, "rows from": how,
            "HOT updates (%)": round(100 * c.hot_share), "WAL (MB)": round(c.wal_bytes / MB, 1),
            "full-page images (MB)": round(c.fpi_bytes / MB, 1),
            "time (s)": round(rate.seconds(c), 1),
            "heap growth (MB)": round(c.heap_growth / MB, 1), "index growth (MB)": round(c.index_growth / MB, 1),
            "row size from": c.width_from}


def _cost_warnings(total: cost_model.Cost, seconds: float, forced: int, srv: cost_model.Server,
                   rate: cost_model.Rate) -> list[str]:
    if not total.rows:
        return ["no rows to rewrite: the backfill changes metadata only (no WAL to speak of, no growth)"]
    wal, budget = total.wal_bytes, srv.wal_per_checkpoint
    out = [f"time at {rate.source}"]
    line = (f"WAL: about {wal / MB:,.0f} MB, {wal / srv.max_wal_size:.1f}x max_wal_size ({srv.max_wal_size / MB:,.0f} "
            f"MB; a checkpoint starts every {budget / MB:,.0f} MB of WAL = max_wal_size / (1 + "
            f"checkpoint_completion_target {srv.checkpoint_completion_target:g}))")
    if forced and wal >= budget:
        every = seconds / forced if forced else 0
        line += f": it forces about {forced} checkpoint{'s' if forced != 1 else ''}, one every {every:,.0f} s"
        if every < srv.checkpoint_warning_s:
            line += (f", under checkpoint_warning ({srv.checkpoint_warning_s} s): the server log will say "
                     f"\"checkpoints are occurring too frequently\". Each checkpoint makes the next change of every "
                     f"page log a full-page image again. For the run, raise max_wal_size to about "
                     f"{math.ceil(wal * (1 + srv.checkpoint_completion_target) / 1024 ** 3)} GB, or slow the batches "
                     f"(backfill.pause_ms, backfill.throttle)")
    else:
        line += ": no checkpoint forced by WAL volume" + (
            f" ({forced} by checkpoint_timeout)" if forced else "")
    out.append(line)
    out.append(f"replicas and WAL archiving receive the same {wal / MB:,.0f} MB")
    if srv.wal_compression not in ("off", "false", "0"):
        out.append(f"wal_compression is {srv.wal_compression}: the full-page images will be smaller than estimated")
    growth = total.heap_growth + total.index_growth
    out.append(f"growth: about {growth / MB:,.0f} MB ({total.heap_growth / MB:,.0f} MB heap, "
               f"{total.index_growth / MB:,.0f} MB indexes; {100 * total.hot_share:.0f}% of the updates stay on "
               f"their page (HOT)). VACUUM after the batches makes the dead versions' space reusable; it does not "
               f"shrink the files")
    return out


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
        record_sizes(rb, table_plans)
    started = {tp.state.name: time.monotonic() for tp in table_plans}
    step_results += executor.run_all([s for tp in table_plans for s in tp.columns])
    step_results += executor.run_all([s for tp in table_plans for s in tp.triggers])
    for tp in table_plans:
        step_results += executor.run_all([s for s in tp.fill if not s.params])  # not the batches: the engine runs them
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
                        "rows (baseline)": int(baseline.get(tp.state.name, 0)), "rows by default": by_default, "rows updated": updated, "batches": batches,
                        "outcome": "dry run" if rb.dry_run else ("nothing to do" if not tp.steps else "done"),
                        "seconds": round(time.monotonic() - started[tp.state.name], 2), "throttled s": round(paused, 2),
                        "max replica lag s": None if worst_lag is None else round(worst_lag, 2)})
    if any(tp.after for tp in table_plans) and not rb.dry_run:
        vacuum.settle_statistics(rb.engine, rb.control)  # the batches' dead rows counted before, not after
    for tp in table_plans:  # pass 4: VACUUM (ANALYZE) what the batches rewrote
        for step, relation in zip(tp.after, tp.after_relations):
            if rb.dry_run:
                step_results.append(executor.run(step))
                continue
            with rb.engine.connect() as conn:
                oid = catalog.relation_oid(conn, tp.state.schema, relation)
            with vacuum.VacuumProgress(rb.engine, oid, f"backfill {relation}", rb.params.backfill.progress_every_s,
                                       rb.log):
                step_results.append(executor.run(step))
    frame = pd.DataFrame(summary, columns=["table", "strategy", "rows (baseline)", "rows by default", "rows updated",
                                           "batches", "outcome", "seconds", "throttled s", "max replica lag s"])
    prog = pd.concat(progress, ignore_index=True) if progress else pd.DataFrame(
        columns=["label", "elapsed_s", "rows_done", "batch_rows", "batch_s", "batch_size", "pace_ms", "canary_p99_ms",
                 "replica_lag_s"])
    return BackfillReport(frame, prog, results_frame(step_results))


def record_sizes(rb, table_plans: list[TablePlan]) -> None:
    """Every core table's size before backfill changes it, in the ledger (once: a re-run keeps the first)."""
    with rb.engine.connect() as conn:
        for tp in table_plans:
            if tp.state.oid is not None:
                size = sizes.measure(conn, tp.state.oid)
                rb.ledger.record_sizes(rb.control, tp.state.name, size.heap, size.indexes, size.total, rb.run_id)


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
    where it did (a partly applied 0001), its default and every row's value of before put back. The VACUUM
    (ANALYZE) after the batches needs no undo: it removed only dead row versions and refreshed statistics."""
    out: list[Step] = []
    states = table_states.core_states(rb, conn)
    for name, st in states.items():  # the triggers first: nothing may assign or record while the rest is undone
        present = rollout.installed(conn, rb.schema, name)
        if closed_by_finalize(conn, rb, name, st):  # finalize's undo puts them back first
            present = set(rollout.TRIGGERS)
        out += rollout.undo_steps(rollout_table(rb, conn, st, None), present)
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
            # each row's value of before looked up by its key, in a subquery PostgreSQL evaluates again on the newest
            # version of a row the application updates meanwhile (READ COMMITTED re-checks the WHERE there): a
            # join on the row versions the statement's snapshot saw (ctid) skipped such a row, leaving it its
            # migrated tenant ("rollback incomplete" under the live application)
            row_keys = sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(k)) for k in was["key_columns"])
            was_of_row = sql.SQL("(SELECT lv.tenant_id FROM {v} AS lv WHERE lv.table_name = {name} "
                                 "AND lv.key = json_build_array({keys})::jsonb)").format(
                v=sql.Identifier(rb.params.ledger_schema, "legacy_tenant_values"), name=sql.Literal(name), keys=row_keys)
            out.append(Step(UNDO_PHASE, name, f"put back the tenant_id of before the migration ({differing:,} rows)",
                            sql.SQL("UPDATE {t} AS t SET {c} = {was} WHERE t.{c} IS DISTINCT FROM {was}").format(
                                t=st.qualified, c=COL, was=was_of_row),
                            ROW_EXCLUSIVE_BATCH, "one UPDATE of the rows the backfill filled (no table lock)",
                            long_scan=True))
    return out


def closed_by_finalize(conn, rb, name: str, st: TableState) -> bool:
    """06_finalize removed the table's rollout triggers (the window is closed): rollback puts them back first."""
    return (st.has_column and not rollout.installed(conn, rb.schema, name)
            and reconcile.closed(conn, rb.params.ledger_schema, name) is not None)


def forget(rb) -> None:
    """After the undo: the checkpoints describe rows that no longer carry a tenant, and the rollout window's
    record of the application's writes describes a window that is closed."""
    if rb.ledger.exists(rb.control):
        for table in ("backfill_checkpoints", "capture_start", "capture_end", "app_writes", "rollout_assists",
                      "table_sizes"):
            if catalog.relation_oid(rb.control, rb.params.ledger_schema, table) is not None:
                rb.control.exec_driver_sql(render(rb.control, sql.SQL("DELETE FROM {}").format(
                    sql.Identifier(rb.params.ledger_schema, table))))
