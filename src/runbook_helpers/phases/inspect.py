"""Phase 1: preflight, inventory, baseline and the plan. Writes only the runbook's own ledger schema.

The baseline (row count and fingerprint of the pre-existing columns of every core table, and per row of a table
with a primary key its key and hash) is captured on the first run only and never overwritten: it is what
05_validate proves the migration preserved. A completed 99_rollback retires it (to the ledger's past_baselines),
so the next run's 01_inspect captures a fresh one.
"""

from __future__ import annotations

import pandas as pd
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from .. import drizzle
from ..db.reading import ReadingFrame
from ..db import baseline_rows, catalog, database, fingerprint, partitions, sizes
from ..db import privileges as db_privileges
from ..db.ddl import plan_frame
from ..db.names import TENANT_COLUMN
from ..errors import RunbookError
from ..legacy import conflicts, mapping
from . import backfill, constrain, original_schema, privileges, seed, unlisted
from . import state as table_states

PHASE = "inspect"
OK, WARN, FAIL = "ok", "warn", "FAIL"


def preflight(rb) -> pd.DataFrame:
    """One row per check: ok / warn / FAIL, what was found, and what to do about it."""
    rows: list[dict] = []

    def add(check: str, status: str, detail: str, fix: str = "") -> None:
        rows.append({"check": check, "status": status, "detail": detail, "fix": fix})

    p = rb.params
    ident = rb.identity
    add("server version", OK if ident.server_version_num >= 130000 else FAIL,
        f"PostgreSQL {ident.server_version}", "" if ident.server_version_num >= 130000 else "upgrade to 13 or newer")
    one_session, found = database.connection_kind(rb.engine)
    add("one server session per connection (no transaction pooler)", OK if one_session else FAIL, found,
        "" if one_session else "connect directly to PostgreSQL: in the DSN put the server's own host and port "
                               "instead of the pooler's (e.g. port 5432, not pgbouncer's 6432)")
    with rb.engine.connect() as conn:
        core = table_states.core_states(rb, conn)
        shared = table_states.shared_states(rb, conn)
        missing = [f"core table {n} ({p.where('core_tables', n)})" for n, s in core.items() if not s.exists]
        missing += [f"shared table {n} ({p.where('shared_tables', n)})" for n, s in shared.items() if not s.exists]
        add("spec tables exist", FAIL if missing else OK,
            f"not found in schema {rb.schema}: {', '.join(missing)}" if missing
            else f"{len(core)} core and {len(shared)} shared tables found",
            "correct the table names in the params file named, or replace the inherited mapping in your env "
            "(core_tables: !replace, see base.yaml)" if missing else "")
        _privilege_rows(rb, conn, add)
        wrong_type = [f"{n} ({s.column_type})" for n, s in core.items() if s.has_column and s.column_type != "bigint"]
        add("existing tenant_id columns are bigint", FAIL if wrong_type else OK,
            f"tenant_id of another type: {', '.join(wrong_type)}" if wrong_type else "no conflicting tenant_id column",
            "convert the column to bigint first (tenants.id is bigint)" if wrong_type else "")
        add("partitioned core tables are named by their parent", *_partition_readiness(rb, conn, core))
        on_shared = [n for n, s in shared.items() if s.has_column]
        add("shared tables carry no tenant_id", WARN if on_shared else OK,
            f"shared tables with tenant_id: {', '.join(on_shared)}" if on_shared else "shared tables are left alone",
            "move them to core_tables if they are per tenant" if on_shared else "")
        sessions = catalog.sessions_in_the_way(conn, rb.schema, p.tables + p.shared_tables,
                                               p.inspect.long_transaction_s, p.database.application_name)
        add("sessions in the way", WARN if len(sessions) else OK,
            "; ".join(f"pid {r.pid} ({r.application_name or r.user}, {r.state}, {r.transaction_age}): {r.locks or r.query}"
                      for r in sessions.itertuples()) if len(sessions) else "no long transactions or locks on spec tables",
            "DDL waits at most lock_timeout and retries; long transactions will make it retry" if len(sessions) else "")
        invalid = catalog.invalid_indexes(conn, rb.schema, p.tables + p.shared_tables)
        add("no INVALID indexes", WARN if len(invalid) else OK,
            ", ".join(f"{r.table}.{r.index}" for r in invalid.itertuples()) if len(invalid) else "none",
            "tenant_id leftovers are rebuilt by constrain; drop or REINDEX the others" if len(invalid) else "")
        mapped = mapping.mapped_tables(p) if mapping.enabled(p) else {}
        batched = [n for n, s in core.items() if ((s.has_column and not s.not_null) or n in mapped)
                   and s.row_update_triggers]
        skip = catalog.can_skip_triggers(conn)
        listing = ", ".join(f"{n} ({', '.join(core[n].row_update_triggers)})" for n in batched)
        add("no row triggers on batched tables", WARN if batched and not skip else OK,
            "none" if not batched else (f"skipped for the backfill's own updates (session_replication_role = "
                                        f"replica): {listing}" if skip else
                                        f"BEFORE UPDATE triggers will fire for every backfilled row on: {listing}"),
            "check the triggers leave pre-existing columns unchanged, or the fingerprint check will fail; or run as "
            "a role that may SET session_replication_role" if batched and not skip else "")
    if p.rls.enabled:
        with rb.engine.connect() as conn:
            role = conn.execute(text("SELECT rolsuper, rolbypassrls FROM pg_roles "
                                     "WHERE rolname = current_user")).mappings().one()
        bypass = role["rolsuper"] or role["rolbypassrls"]
        add("migration role bypasses row level security", OK if bypass else FAIL,
            f"{ident.user} is {'superuser' if role['rolsuper'] else ('BYPASSRLS' if bypass else 'subject to RLS')}",
            "" if bypass else f"ALTER ROLE {ident.user} BYPASSRLS (counts and fingerprints must see every row once "
                              f"FORCE ROW LEVEL SECURITY is on)")
    else:
        add("row level security", OK, "off (rls.enabled: false)")
    if mapping.enabled(p) and not missing:
        add("legacy mapping can run", *_legacy_readiness(rb))
    if not missing:
        add("no conflicts between tenants", *_conflict_readiness(rb))
    return pd.DataFrame(rows, columns=["check", "status", "detail", "fix"])


def _privilege_rows(rb, conn, add) -> None:
    """One FAIL row per privilege the plan needs and the migration role lacks (each with its GRANT), else one ok
    row; a warning when a plain autovacuum in the way cannot be cancelled."""
    lacking = [m for m in db_privileges.missing(conn, privileges.needs(rb, conn)) if m.privilege != "BYPASSRLS"]
    user = rb.identity.user
    for m in lacking:
        add(f"privilege: {m.privilege}", FAIL, m.detail, m.grant)
    if not lacking:
        superuser = db_privileges.attributes(conn)["rolsuper"]
        add("privileges of the migration role", OK, f"{user} is superuser" if superuser else
            f"{user} holds every privilege the plan needs (ledger, schema, table owners, roles, statistics)")
    can, how = db_privileges.can_cancel_autovacuum(conn)
    add("may cancel a plain autovacuum in the way", OK if can else WARN,
        f"{user}: {how}" if can else f"{user} may not ({how}): a DDL statement behind a plain autovacuum waits until "
        f"PostgreSQL cancels it (deadlock_timeout) and may use up a try of the lock ladder",
        "" if can else (f"GRANT pg_signal_autovacuum_worker TO {user}" if rb.identity.server_version_num >= 180000
                        else "PostgreSQL 18 has pg_signal_autovacuum_worker for it; meanwhile lock_timeout_ms above "
                             "deadlock_timeout (1 s) lets PostgreSQL cancel it"))


def _partition_readiness(rb, conn, core: dict) -> tuple[str, str, str]:
    """A partitioned core table is migrated through its parent: a partition named in the spec would be
    migrated twice (and its parent not at all)."""
    named = [f"{n} (a partition of {catalog.partition_parent(conn, s.oid)})" for n, s in core.items() if s.is_partition]
    if named:
        return FAIL, f"partitions named as core tables: {', '.join(named)}", \
            "name the partitioned parent in core_tables instead; its partitions get everything from it"
    parted = {n: s for n, s in core.items() if s.partitioned}
    if not parted:
        return OK, "no partitioned core tables", ""
    counts = {n: len(partitions.tree(conn, s)) for n, s in parted.items()}
    return OK, "partitioned: " + ", ".join(f"{n} ({c} partitions)" for n, c in counts.items()) + \
        "; each is migrated through its parent, scans and batches partition by partition", ""


def _conflict_readiness(rb) -> tuple[str, str, str]:
    """Every foreign key between tenant tables stays within one tenant (or has a rule), and every tenant_id
    already set names a tenant: checked before anything changes (see tenant_conflicts for the listing)."""
    try:
        problems = conflicts.failures(rb)
    except RunbookError as exc:
        return FAIL, str(exc).removesuffix(" Nothing was changed."), "fix legacy or core_tables in params"
    except DBAPIError as exc:  # e.g. a role that may not read the tables (the privilege check says so too)
        return FAIL, f"could not read the core tables: {str(exc.orig).splitlines()[0]}", \
            "connect as a role that may read every core table"
    if problems:
        return FAIL, "; ".join(problems), "see tenant_conflicts (01_inspect) for every key with its sample rows"
    return OK, "every foreign key between tenant tables stays within one tenant, or has a rule; every tenant_id " \
               "names a tenant", ""


def tenant_conflicts(rb) -> pd.DataFrame:
    """Per foreign key between tenant tables: the rows whose two sides would land in different tenants, with
    sample keys and the rule from params; per table with tenant_id: values that name no tenant. Plain reads,
    one query per key; archived as tenant_conflicts.csv."""
    return conflicts.report(rb)


def _legacy_readiness(rb) -> tuple[str, str, str]:
    """The legacy tables exist, every legacy role is in the role map, no child of a mapped table is left
    unmapped: checked here, so a bad mapping stops inspect before anything is written."""
    p = rb.params
    try:
        with rb.engine.connect() as conn:
            mapping.check_legacy_tables(conn, p)
            mapping.check_children(conn, p)
            unknown = mapping.unknown_roles(conn, p)
    except RunbookError as exc:
        return FAIL, str(exc).removesuffix(" Nothing was changed."), "fix legacy or core_tables in params"
    if unknown:
        return FAIL, f"legacy roles without a mapping: {'; '.join(unknown)}", "add them to legacy.roles in params"
    mapped = mapping.mapped_tables(p)
    return OK, f"{len(mapped)} core tables map to their org's tenant: {', '.join(mapped)}", ""


def drizzle_status(rb) -> pd.DataFrame:
    """The application's Drizzle migrations: applied, pending or DRIFTED, and which of them its next
    `drizzle-kit migrate` would run (empty when params name no drizzle folder)."""
    return drizzle.status(rb)


def assert_ready(pre: pd.DataFrame) -> str:
    """Raise if any preflight check failed (the notebook's last cell: papermill marks the run failed)."""
    failed = pre[pre["status"] == FAIL]
    if len(failed):
        lines = "\n".join(f"  - {r.check}: {r.detail} -> {r.fix}" for r in failed.itertuples())
        raise RunbookError(f"preflight failed; fix these and re-run 01_inspect (nothing was changed):\n{lines}")
    warned = int((pre["status"] == WARN).sum())
    return f"preflight passed ({warned} warning{'s' if warned != 1 else ''})"


def _tenant_state(conn, rb, st) -> str:
    if not st.has_column:
        return "absent"
    if st.not_null:
        return "NOT NULL"
    if st.estimated_rows < rb.params.inspect.exact_count_below:
        return f"nullable, {catalog.null_tenant_count(conn, rb.schema, st.name):,} NULL"
    return "nullable (NULLs not counted: large table)"


def inventory(rb) -> pd.DataFrame:
    """One row per spec table: size, key, tenant_id state, FK, index, triggers, views, partitioning, RLS."""
    rows = []
    with rb.engine.connect() as conn:
        states = [("core", st) for st in table_states.core_states(rb, conn).values()]
        states += [("shared", st) for st in table_states.shared_states(rb, conn).values()]
        for kind, st in states:
            if not st.exists:
                rows.append({"table": st.name, "kind": kind, "rows": None, "counted": "missing"})
                continue
            count, how = catalog.count_rows(conn, st, rb.params.inspect.exact_count_below)
            rows.append({
                "table": st.name, "kind": kind, "rows": count, "counted": how, "size": sizes.readable(st.size_bytes),
                "primary key": ", ".join(st.pk_columns) or "none",
                "tenant_id": _tenant_state(conn, rb, st),
                "foreign key": "validated" if st.fk_valid else ("NOT VALID" if st.fk_name else "absent"),
                "index": "valid" if st.index_name else ("INVALID" if st.invalid_tenant_indexes else "absent"),
                "triggers": ", ".join(st.triggers) or "",
                "dependent views": ", ".join(st.views) or "",
                "partitioning": _partitioning(conn, st),
                "rls": ("on, forced" if st.rls_forced else "on") if st.rls_enabled else "off",
            })
    cols = ["table", "kind", "rows", "counted", "size", "primary key", "tenant_id", "foreign key", "index",
            "triggers", "dependent views", "partitioning", "rls"]
    return pd.DataFrame(rows, columns=cols)


def unlisted_tables(rb) -> pd.DataFrame:
    """Every table of the schema in neither core_tables nor shared_tables (the runbook's own excepted): its rows,
    size, foreign keys to and from the core tables and what to do; or one line saying there is none. The runbook
    migrates only what the spec names, so nothing else may go unmentioned."""
    return unlisted.frame(rb)


def _partitioning(conn, st) -> str:
    if st.is_partition:
        return "partition"
    if not st.partitioned:
        return "no"
    parts = partitions.tree(conn, st)
    return (f"{partitions.key_definition(conn, st.oid)}: {len(parts)} partitions, "
            f"{len(partitions.leaves(parts))} with rows")


def partition_inventory(rb) -> pd.DataFrame:
    """One row per partition of every partitioned core table: its level, bounds, rows and tenant_id state
    (empty when no core table is partitioned)."""
    rows = []
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            for part in partitions.tree(conn, st):
                ps = part.state
                count, how = catalog.count_rows(conn, ps, rb.params.inspect.exact_count_below) if part.leaf \
                    else (None, "sub-partitioned")
                rows.append({"table": name, "partition": part.name, "parent": part.parent, "level": part.level,
                             "bound": part.bound, "rows": count, "counted": how, "size": sizes.readable(ps.size_bytes),
                             "tenant_id": _tenant_state(conn, rb, ps) if part.leaf else "",
                             "rls": ("on, forced" if ps.rls_forced else "on") if ps.rls_enabled else "off"})
    cols = ["table", "partition", "parent", "level", "bound", "rows", "counted", "size", "tenant_id", "rls"]
    return pd.DataFrame(rows, columns=cols)


def unique_constraints(rb) -> pd.DataFrame:
    """Unique constraints/indexes on core tables that leave out tenant_id: uniqueness stays global."""
    with rb.engine.connect() as conn:
        return catalog.unique_without_tenant(conn, rb.schema, rb.params.tables)


def capture_baseline(rb, pre: pd.DataFrame | None = None) -> pd.DataFrame:
    """Counts and fingerprints of every core table, stored on the first run only, never overwritten.

    Nothing is stored (not even the ledger created) while preflight has a FAIL or in a dry run: bad input
    must leave the database as it was.
    """
    blocked = pre is not None and bool((pre["status"] == FAIL).any())
    with rb.engine.connect() as conn:
        states = table_states.core_states(rb, conn)
    missing = [n for n, st in states.items() if not st.exists]
    if missing:
        where = "; ".join(f"{n} ({rb.params.where('core_tables', n)})" for n in missing)
        raise RunbookError(f"core table(s) {where} do not exist; fix the spec first (see preflight). "
                           f"Nothing was changed.")
    store = not rb.dry_run and not blocked
    if store:
        rb.ensure_ledger()
    stored = rb.ledger.baseline(rb.control).set_index("table_name")
    rows = []
    for name, st in states.items():
        if name in stored.index:
            kept = stored.loc[name]
            rows.append({"table": name, "rows": int(kept["row_count"]), "fingerprint": kept["fingerprint"],
                         "columns": len(kept["columns"]), "status": f"kept from {kept['captured_at']:%Y-%m-%d %H:%M:%S %Z}"})
            continue
        columns = [c for c in st.columns if c != TENANT_COLUMN]
        if store:  # with a primary key, each row's key and hash too (validate lists by key what changes before
            # the record of the application's writes opens)
            count, fp, captured = baseline_rows.capture(rb.engine, rb.params.ledger_schema, st, columns, rb.run_id)
            status = "captured now" if captured else "kept (captured concurrently)"
        else:
            count, fp = fingerprint.measure(rb.engine, rb.schema, name, columns)
            status = "measured (dry run: not stored)" if rb.dry_run else "measured (preflight failed: not stored)"
        rows.append({"table": name, "rows": count, "fingerprint": fp, "columns": len(columns), "status": status})
    if store:
        original_schema.capture(rb)  # the keys, columns and objects rollback restores
    return pd.DataFrame(rows, columns=["table", "rows", "fingerprint", "columns", "status"])


def full_plan(rb) -> pd.DataFrame:
    """What seed, backfill and constrain will do, table by table, with the lock each statement takes."""
    steps = seed.steps(rb)
    system_id = table_states.system_tenant_id(rb)
    table_plans = backfill.plans(rb)
    steps += backfill.execution_order(table_plans)
    with rb.engine.connect() as conn:
        for tp in table_plans:
            def planned(st):
                return backfill.project(st, system_id)
            parts = constrain.partitions_of(rb, conn, tp.state, planned)
            steps += constrain.plan_table(planned(tp.state), rb.schema, parts, conn)
    steps += constrain.extra_steps(rb)
    with rb.engine.connect() as conn:
        return plan_frame(steps, conn)


def cost(rb) -> "backfill.CostReport":
    """What backfill's batches will cost (rows, WAL, time, growth, checkpoints), before anything runs."""
    return backfill.cost(rb)


def plan_summary(plan: pd.DataFrame, inventory_frame: pd.DataFrame) -> pd.DataFrame:
    """Per core table: strategy and the number of statements per phase (deterministic: for nbval)."""
    core = inventory_frame[inventory_frame["kind"] == "core"]["table"].tolist()
    rows = []
    for table in core:
        mine = plan[plan["table"] == table]
        rows.append({"table": table,
                     "backfill": "; ".join(mine[mine["phase"] == "backfill"]["action"]) or "nothing",
                     "constrain statements": int((mine["phase"] == "constrain").sum())})
    return pd.DataFrame(rows, columns=["table", "backfill", "constrain statements"])


def lint(rb) -> pd.DataFrame:
    """The tenancy lint as things stand (05_validate enforces it; before constrain most rules are to do)."""
    from ..tenancy import lint as lint_mod
    return lint_mod.run(rb)


def lint_summary(frame: pd.DataFrame) -> pd.DataFrame:
    from ..tenancy import lint as lint_mod
    return lint_mod.summary(frame)


def distribution_readiness(rb) -> pd.DataFrame:
    """Ready for sharding by tenant_id with Citus? Each finding with what to do; 07_distribute's plan is checked for
    statement shapes Citus refuses (distribution.composite_keys makes keys composite in constrain)."""
    from ..distribution import readiness
    from . import distribute
    return ReadingFrame(readiness.readiness(rb, planned=distribute.analyse(rb).steps))
