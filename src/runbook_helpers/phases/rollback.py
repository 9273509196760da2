"""Rollback (99_rollback): back to the database inspect recorded, from any phase.

Each phase owns its undo, as each pgroll operation has its rollback next to its start: validate,
constrain, backfill and seed offer undo_steps(rb, conn, before) next to their plan(), built from the
pre-change snapshot (original_schema.py) and the ledger. This phase only checks its preconditions and
composes those steps in reverse phase order. It refuses, naming tables and counts, while any row
belongs to a tenant other than the System Tenant and the legacy mapping's tenants (those rows would lose
their tenant), unless forced. Every statement is a Step with its lock, like the forward phases: policies
and constraints go with brief metadata locks, indexes CONCURRENTLY, and the original keys come back NOT
VALID, then VALIDATE, then swap. Once nothing is left to undo, the baseline is retired to the ledger's
past_baselines: the next run starts from a fresh 01_inspect.
"""

from __future__ import annotations

import pandas as pd
from psycopg import sql

from .. import drizzle
from ..db import catalog
from ..db.ddl import Step, plan_frame, results_frame
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError
from ..legacy import mapping
from . import backfill, constrain, distribute, finalize, original_schema, seed, validate
from . import state as table_states

PHASE = "rollback"
# the phases in reverse; inspect writes only the ledger; distribute's undo refuses once it changed anything
UNDO_ORDER = (distribute, finalize, validate, constrain, backfill, seed)


def foreign_rows(rb) -> pd.DataFrame:
    """Rows per table that belong to a tenant other than the System Tenant and the tenants the legacy
    mapping created (rollback would orphan them: the application put them there)."""
    system = table_states.system_tenant_id(rb)
    rows = []
    with rb.engine.connect() as conn:
        ours = mapping.created_tenants(conn, rb.params)
        for name in rb.params.tables:
            st = catalog.table_state(conn, rb.schema, name)
            if not st.has_column:
                continue
            where = sql.SQL("{c} IS DISTINCT FROM %s AND {c} IS NOT NULL AND {c} NOT IN ({ours})").format(
                c=sql.Identifier(TENANT_COLUMN), ours=ours)
            query = sql.SQL("SELECT count(*) FROM {} WHERE ").format(st.qualified) + where
            count = conn.exec_driver_sql(render(conn, query), (system,)).scalar()
            if count:
                rows.append({"table": name, "rows of other tenants": int(count)})
        if catalog.relation_oid(conn, rb.schema, "tenants") is not None:
            others = conn.exec_driver_sql(render(conn, sql.SQL(
                "SELECT count(*) FROM {} WHERE uuid <> %s::uuid AND id NOT IN ({})").format(
                sql.Identifier(rb.schema, "tenants"), ours)), (str(rb.params.system_tenant.uuid),)).scalar()
            if others:
                rows.append({"table": "tenants", "rows of other tenants": int(others)})
    return pd.DataFrame(rows, columns=["table", "rows of other tenants"])


def steps(rb) -> list[Step]:
    """Every phase's undo, in reverse phase order, read fresh from the catalog (a re-run resumes)."""
    with rb.engine.connect() as conn:
        before = original_schema.snapshot(conn, rb.params.ledger_schema, rb.params.tables)
        return [step for phase in UNDO_ORDER for step in phase.undo_steps(rb, conn, before)]


def plan(rb) -> pd.DataFrame:
    with rb.engine.connect() as conn:
        return plan_frame(steps(rb), conn)


def apply(rb, force: bool = False) -> pd.DataFrame:
    """Refuses while other tenants own rows, unless forced; then runs the plan and clears what the ledger
    recorded about the undone work (checkpoints, the legacy mapping)."""
    others = foreign_rows(rb)
    if len(others) and not force:
        listing = ", ".join(f"{r.table}: {r._2:,}" for r in others.itertuples())
        raise RunbookError(f"rows belong to tenants other than the System Tenant ({listing}); rolling back would "
                           f"strip them of their tenant. Move them first, or run with force=True (--force) if that "
                           f"is intended. Nothing was changed.")
    results = rb.executor().run_all(steps(rb))
    if not rb.dry_run:
        backfill.forget(rb)
        seed.forget(rb)
        drizzle.forget(rb.control, rb.params)
        if not steps(rb):
            retire_baseline(rb)
    return results_frame(results)


def retire_baseline(rb) -> int:
    """Once the rollback reached its end state: the baseline moves to the ledger's past_baselines under this
    rollback (its phase run and run id), its per-row part goes, so the next run's 01_inspect measures the tables
    as the application has left them meanwhile. The pre-change snapshot stays: the database is back in the shape
    it records, and a re-run of this phase reads it. Returns the tables retired (0: none left to retire)."""
    rb.ensure_ledger()
    with rb.engine.begin() as conn:  # both or neither
        return rb.ledger.archive_baseline(conn, rb.phase_run_id, rb.run_id)


ROLLED_BACK = "the database is back to its shape before the migration"
RETIRED = ("; its baseline is retired to the ledger's past_baselines (under the rollback that retired it): the "
           "next 01_inspect captures a fresh one")


def assert_rolled_back(rb) -> str:
    if rb.dry_run:
        return "dry run: nothing was changed"
    left = steps(rb)
    if left:
        raise RunbookError("rollback incomplete: " + "; ".join(s.label for s in left[:10])
                           + ". Re-run 99_rollback: it resumes.")
    retired = not len(rb.ledger.baseline(rb.control)) and len(rb.ledger.past_baselines(rb.control))
    return ROLLED_BACK + (RETIRED if retired else "")
