"""Phase 6 (06_finalize): close the rollout window once the application writes tenant_id itself.

It counts, per core table, the rows whose writes since `since` still needed the rollout trigger to give
them their tenant (the ledger's rollout_assists), and refuses while any did, unless forced: without the
trigger those writes would fail on NOT NULL, or land where the writer said. It reconciles one last time
(the record of the application's writes ends here; validate afterwards shows this result), refusing if
that fails, then removes the rollout triggers and their functions. It leaves exactly the end state the
application's schema declares: tenant_id NOT NULL with its foreign key and index, and the keys and
policies constrain made; no DEFAULT, no trigger. Rollback still works afterwards (it finds no trigger).
"""

from __future__ import annotations

import json
from datetime import datetime

import pandas as pd
from psycopg import sql

from ..db import catalog, partitions, reconcile
from ..db.ddl import UNDO_PHASE, Step, plan_frame, results_frame
from ..db.sqltext import render
from ..errors import RunbookError
from ..legacy import mapping as legacy_mapping
from ..legacy import signups as legacy_signups
from ..tenancy import rollout
from . import backfill
from . import state as table_states

PHASE = "finalize"
COLUMNS = ["table", "writes that needed the trigger", "last such write", "rollout trigger"]


def parse_since(since: str | datetime | None) -> datetime | None:
    """`since` as given by a notebook parameter or the command line (ISO 8601, with a time zone)."""
    if since is None or isinstance(since, datetime):
        return since
    try:
        parsed = datetime.fromisoformat(str(since))
    except ValueError:
        raise RunbookError(f"since={since!r} is not a time: give it as ISO 8601 with a time zone, e.g. "
                           f"2026-12-01T09:00:00+00:00 (when the tenant-aware release went out). Nothing was "
                           f"changed.") from None
    if parsed.tzinfo is None:
        raise RunbookError(f"since={since!r} has no time zone; add one (e.g. +00:00). Nothing was changed.")
    return parsed


def assists(rb, since: str | datetime | None = None) -> pd.DataFrame:
    """Per core table: rows whose writes since `since` (default: since the window opened) needed the
    trigger, the last such write, and whether the trigger is still there."""
    when = parse_since(since)
    ledger = rb.params.ledger_schema
    rows = []
    with rb.engine.connect() as conn:
        have_log = catalog.relation_oid(conn, ledger, "rollout_assists") is not None
        for name in rb.params.tables:
            count, last = 0, None
            if have_log:
                count, last = conn.exec_driver_sql(render(conn, sql.SQL(
                    "SELECT count(*), max(last_at) FROM {} WHERE table_name = %s AND (%s::timestamptz IS NULL "
                    "OR last_at >= %s::timestamptz)").format(sql.Identifier(ledger, "rollout_assists"))),
                    (name, when, when)).one()
            present = rollout.installed(conn, rb.schema, name)
            rows.append({"table": name, "writes that needed the trigger": int(count),
                         "last such write": last.isoformat() if last else "none",
                         "rollout trigger": "installed" if present else "removed"})
    return pd.DataFrame(rows, columns=COLUMNS)


def steps(rb) -> list[Step]:
    out: list[Step] = []
    system_id = table_states.system_tenant_id(rb)
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            present = rollout.installed(conn, rb.schema, name)
            if present:
                out += rollout.remove_steps(PHASE, backfill.rollout_table(rb, conn, st, system_id), present,
                                            "catalog change only; the application writes tenant_id itself now")
        if legacy_mapping.enabled(rb.params):
            out += legacy_signups.remove_steps(conn, rb.params, PHASE, "catalog change only; the tenant-aware "
                                               "application creates the tenants of new orgs itself now")
    return out


def plan(rb) -> pd.DataFrame:
    with rb.engine.connect() as conn:
        return plan_frame(steps(rb), conn)


def _preconditions(rb) -> None:
    with rb.engine.connect() as conn:
        open_ = [n for n, st in table_states.core_states(rb, conn).items() if not (st.not_null and st.fk_valid)]
    if open_:
        raise RunbookError(f"{', '.join(open_)}: tenant_id is not NOT NULL with a validated foreign key yet; run "
                           f"04_constrain and 05_validate first (the trigger is what keeps the application's writes "
                           f"working until then). Nothing was changed.")


def close_record(rb) -> pd.DataFrame:
    """The last reconciliation of the window, stored per table (validate shows it from now on); raises if a
    row the application did not write changed."""
    ledger = rb.params.ledger_schema
    rows, failed = [], []
    with rb.engine.connect() as conn:
        states = table_states.core_states(rb, conn)
    for name, st in states.items():
        proof = reconcile.reconcile(rb.engine, ledger, st)
        if proof is None:
            continue
        rows.append({"table": name, "expected": proof.expected_digest, "actual": proof.actual_digest,
                     "passed": proof.passed})
        if not proof.passed:
            failed.append(f"{name}: expected {proof.expected_digest}, got {proof.actual_digest}")
        elif not rb.dry_run:
            rb.control.exec_driver_sql(render(rb.control, sql.SQL(
                "INSERT INTO {} (table_name, reconciled) VALUES (%s, %s::jsonb) ON CONFLICT (table_name) DO NOTHING"
            ).format(sql.Identifier(ledger, "capture_end"))), (name, json.dumps(reconcile.as_record(proof))))
    if failed:
        raise RunbookError("rows the application did not write changed since the window opened: " + "; ".join(failed)
                           + ". The window stays open: compare with 05_validate and find the cause. Nothing was "
                             "changed.")
    return pd.DataFrame(rows, columns=["table", "expected", "actual", "passed"])


def apply(rb, since: str | datetime | None = None, force: bool = False) -> pd.DataFrame:
    """Refuses while writes since `since` still needed the trigger (unless forced) or before constrain; then
    closes the record and removes the triggers."""
    _preconditions(rb)
    needed = assists(rb, since)
    still = needed[(needed["writes that needed the trigger"] > 0) & (needed["rollout trigger"] == "installed")]
    if len(still) and not force:
        listing = ", ".join(f"{r.table}: {r._2:,} (last {r._3})" for r in still.itertuples())
        raise RunbookError(f"the application still writes rows without their tenant ({listing}); without the "
                           f"rollout trigger those writes would fail. Deploy the release that writes tenant_id, then "
                           f"re-run with since=<when it went out>, or force=True (--force) to close the window "
                           f"anyway. Nothing was changed.")
    if rb.dry_run:
        return results_frame(rb.executor().run_all(steps(rb)))
    close_record(rb)
    return results_frame(rb.executor().run_all(steps(rb)))


def status(rb) -> pd.DataFrame:
    """Per core table: the end state (deterministic: for nbval)."""
    rows = []
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            rows.append({"table": name, "tenant_id": "NOT NULL" if st.not_null else "nullable",
                         "default": st.default or "none",
                         "rollout trigger": "installed" if rollout.installed(conn, rb.schema, name) else "removed"})
    return pd.DataFrame(rows, columns=["table", "tenant_id", "default", "rollout trigger"])


def assert_finalized(rb) -> str:
    if rb.dry_run:
        return "dry run: nothing was changed"
    frame = status(rb)
    left = frame[(frame["rollout trigger"] != "removed") | (frame["default"] != "none")]
    if len(left):
        raise RunbookError("finalize incomplete for " + ", ".join(left["table"]) + "; re-run 06_finalize: it resumes")
    return f"the rollout window is closed: {len(frame)} core tables without trigger or DEFAULT, as the schema declares"


def undo_steps(rb, conn, before) -> list[Step]:
    """The rollout triggers back where finalize removed them, first of all rollback's steps: rollback hands the
    database back to the legacy application, whose inserts name no tenant_id and, without the trigger, fail on
    NOT NULL until constrain's undo drops it; the tenant-aware release keeps working beside them (the trigger
    keeps a tenant_id it is given). Backfill's undo removes them again, with the column."""
    out: list[Step] = []
    system_id = table_states.system_tenant_id(rb)
    closed = False
    for name, st in table_states.core_states(rb, conn).items():
        if backfill.closed_by_finalize(conn, rb, name, st):
            closed = True
            every = tuple(p.name for p in partitions.tree(conn, st)) if st.partitioned else ()
            out.append(rollout.install_step(UNDO_PHASE, backfill.rollout_table(rb, conn, st, system_id), False, every))
    if closed and legacy_mapping.enabled(rb.params) and legacy_mapping.map_tables_exist(conn, rb.params):
        out += legacy_signups.install_steps(conn, rb.params, UNDO_PHASE)  # seed's undo removes them again
    return out

