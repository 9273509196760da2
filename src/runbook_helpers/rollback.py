"""Rollback: undo constrain, backfill and seed, in that order, back to the legacy database.

It works from what inspect recorded before the first change (legacy.py): the original keys and indexes,
whether tenant_id existed and which rows already had a value, whether the tenancy tables and the System
Tenant existed, each view's options. It refuses, naming tables and counts, while any row belongs to a
tenant other than the System Tenant and the legacy mapping's tenants (those rows would lose their tenant),
unless forced; what the legacy mapping inserted is deleted, as the ledger records it. Every statement
is a Step with its lock, like the forward phases: policies and constraints go with brief metadata locks,
indexes CONCURRENTLY, and the original keys come back NOT VALID, then VALIDATE, then swap.
"""

from __future__ import annotations

import pandas as pd
from psycopg import sql
from sqlalchemy import text

from . import catalog, distribution, drizzle, legacy, names, rls
from . import legacy_mapping as mapping
from .ddl import (ACCESS_EXCLUSIVE_META, ROW_EXCLUSIVE_BATCH, SHARE_ROW_EXCLUSIVE_META, SHARE_UPDATE_EXCLUSIVE, Step,
                  plan_frame, results_frame)
from .errors import RunbookError
from .names import TENANT_COLUMN
from .phases import seed
from .phases import state as table_states
from .sqltext import render

PHASE = "rollback"


def _created_tenants(conn, p) -> sql.Composable:
    """The ids of the tenants the legacy mapping created (none when it never ran)."""
    if not mapping.map_tables_exist(conn, p):
        return sql.SQL("SELECT NULL::bigint WHERE false")
    return sql.SQL("SELECT tenant_id FROM {} WHERE created").format(mapping.ledger_table(p, "org_tenants"))


def foreign_rows(rb) -> pd.DataFrame:
    """Rows per table that belong to a tenant other than the System Tenant and the tenants the legacy
    mapping created (rollback would orphan them: the application put them there)."""
    system = table_states.system_tenant_id(rb)
    rows = []
    with rb.engine.connect() as conn:
        ours = _created_tenants(conn, rb.params)
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


def _granted_roles(rb, before: dict) -> list[str]:
    """Roles the runbook granted privileges to (from the statement journal) that held none on the spec
    tables before the migration: their grants are revoked; anyone else's are left alone."""
    if not rb.ledger.exists(rb.control):
        return []
    journal = rb.ledger.journal(rb.control)
    if journal.empty:
        return []
    grants = journal[(journal["outcome"] == "applied") & journal["action"].str.startswith("grant ")]
    roles = {a.split()[1] for a in grants["action"]}
    legacy_acls = " ".join(t.get("acl") or "" for t in before.values())
    return sorted(r for r in roles if f"{r}=" not in legacy_acls)


def steps(rb) -> list[Step]:
    p = rb.params
    schema = rb.schema
    out: list[Step] = []
    with rb.engine.connect() as conn:
        before = legacy.tables(conn, p.ledger_schema)
        objects = legacy.objects(conn, p.ledger_schema)
        missing = [t for t in p.tables if t not in before]
        if missing:
            raise RunbookError(f"no record of how {', '.join(missing)} looked before the migration (inspect records it "
                               f"with the baseline); rollback cannot restore them safely. Nothing was changed.")
        tenants_oid = catalog.relation_oid(conn, schema, "tenants")
        states = {t: catalog.table_state(conn, schema, t, tenants_oid) for t in p.tables}

        # 0. Drizzle: forget what the hand-over recorded, so `drizzle-kit migrate` sees those as pending again
        for m in drizzle.recorded_by_runbook(conn, p):
            out.append(Step(PHASE, None, f"forget Drizzle's record of {m.tag}", drizzle.forget_statement(p, m),
                            "ROW EXCLUSIVE on the Drizzle migrations table (one row)",
                            "the schema goes back to before this migration, so Drizzle must see it as pending"))
        # 1. row level security, its roles' grants, views back to their options
        for name, st in states.items():
            for pol in rls.policies(conn, st.oid) if st.oid else []:
                if pol["polname"].startswith("tenant_isolation_"):
                    out.append(Step(PHASE, name, f"drop policy {pol['polname']}", sql.SQL("DROP POLICY {} ON {}").format(
                        sql.Identifier(pol["polname"]), st.qualified), ACCESS_EXCLUSIVE_META, "catalog change only"))
            if st.rls_forced:
                out.append(Step(PHASE, name, "stop forcing row level security",
                                sql.SQL("ALTER TABLE {} NO FORCE ROW LEVEL SECURITY").format(st.qualified),
                                ACCESS_EXCLUSIVE_META, "catalog change only"))
            if st.rls_enabled:
                out.append(Step(PHASE, name, "disable row level security",
                                sql.SQL("ALTER TABLE {} DISABLE ROW LEVEL SECURITY").format(st.qualified),
                                ACCESS_EXCLUSIVE_META, "catalog change only"))
        for (kind, view), record in objects.items():
            if kind != "view":
                continue
            options = conn.execute(text("SELECT reloptions FROM pg_class WHERE oid = to_regclass(:v)"),
                                   {"v": view}).scalar()
            had = [o for o in (record["detail"] or {}).get("reloptions", []) if o.startswith("security_invoker")]
            has = [o for o in (options or []) if o.startswith("security_invoker")]
            if has and not had:
                out.append(Step(PHASE, None, f"reset security_invoker on view {view}",
                                sql.SQL("ALTER VIEW {} RESET (security_invoker)").format(sql.SQL(view)),
                                ACCESS_EXCLUSIVE_META, "catalog change only"))
        for role in _granted_roles(rb, before):
            targets = [t for t in p.tables + p.shared_tables if catalog.relation_oid(conn, schema, t) is not None]
            if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is None:
                continue
            holds = conn.execute(text(
                "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "  CROSS JOIN LATERAL aclexplode(c.relacl) a WHERE n.nspname = :s AND (c.relname = ANY(:t) "
                "  OR c.relkind = 'S') AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :r)) "
                "OR EXISTS (SELECT 1 FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a "
                "  WHERE n.nspname = :s AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :r))"),
                {"r": role, "s": schema, "t": targets}).scalar()
            if not holds:
                continue
            out.append(Step(PHASE, None, f"revoke what {role} was granted",
                            sql.SQL("REVOKE ALL ON {} FROM {}").format(sql.SQL(", ").join(
                                sql.Identifier(schema, t) for t in targets), sql.Identifier(role)),
                            "none (privileges only)", "the role itself stays: roles belong to the whole server"))
            out.append(Step(PHASE, None, f"revoke {role}'s usage of the schema and its sequences",
                            sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {r}; REVOKE USAGE ON SCHEMA {s} "
                                    "FROM {r}").format(s=sql.Identifier(schema), r=sql.Identifier(role)),
                            "none (privileges only)", "locks no table"))

        # 2. composite keys back to the original ones
        out += _restore_keys(conn, schema, states, before)

        # 3. constrain: index, foreign key to tenants, NOT NULL, default
        for name, st in states.items():
            was = before[name]
            for index in _tenant_indexes(conn, st.oid):
                if index not in was["indexes"]:
                    out.append(Step(PHASE, name, f"drop index {index}",
                                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, index)),
                                    SHARE_UPDATE_EXCLUSIVE, "CONCURRENTLY: reads and writes continue", transactional=False))
            legacy_names = {c["conname"] for c in was["constraints"]}
            if st.fk_name and st.fk_name not in legacy_names:
                out.append(Step(PHASE, name, "drop the foreign key to tenants",
                                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(st.qualified, sql.Identifier(st.fk_name)),
                                SHARE_ROW_EXCLUSIVE_META, "catalog change only"))
            if st.check_name:
                out.append(Step(PHASE, name, "drop the NOT NULL check", sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    st.qualified, sql.Identifier(st.check_name)), ACCESS_EXCLUSIVE_META, "catalog change only"))
            if not was["had_tenant_column"]:
                if st.has_column:
                    out.append(Step(PHASE, name, "drop tenant_id", sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
                        st.qualified, sql.Identifier(TENANT_COLUMN)), ACCESS_EXCLUSIVE_META,
                        "dropping a column is a catalog change; the space is reclaimed by later rewrites"))
                continue
            if st.not_null and not was["tenant_column_not_null"]:
                out.append(Step(PHASE, name, "drop NOT NULL on tenant_id",
                                sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(
                                    st.qualified, sql.Identifier(TENANT_COLUMN)), ACCESS_EXCLUSIVE_META,
                                "catalog change only"))
            if (st.default or None) != (was["tenant_column_default"] or None):
                statement = (sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(
                    st.qualified, sql.Identifier(TENANT_COLUMN)) if not was["tenant_column_default"] else
                    sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                        st.qualified, sql.Identifier(TENANT_COLUMN), sql.SQL(was["tenant_column_default"])))
                out.append(Step(PHASE, name, "restore the column default", statement, ACCESS_EXCLUSIVE_META,
                                "catalog change only"))
            keys = sql.SQL(", ").join(sql.SQL("t2.{}::text").format(sql.Identifier(k)) for k in was["key_columns"])
            legacy_values = sql.SQL(
                "SELECT t2.ctid AS row_id, t2.{c} AS now, lv.tenant_id AS was FROM {t} AS t2 LEFT JOIN {v} AS lv "
                "ON lv.table_name = {name} AND lv.key = json_build_array({keys})::jsonb").format(
                    c=sql.Identifier(TENANT_COLUMN), t=st.qualified,
                    v=sql.Identifier(p.ledger_schema, "legacy_tenant_values"), name=sql.Literal(name), keys=keys)
            differing = conn.exec_driver_sql(render(conn, sql.SQL(
                "SELECT count(*) FROM ({}) AS x WHERE x.now IS DISTINCT FROM x.was").format(legacy_values))).scalar()
            if differing:
                out.append(Step(PHASE, name, f"put back the tenant_id of before the migration ({differing:,} rows)",
                                sql.SQL("UPDATE {t} AS t SET {c} = x.was FROM ({lv}) AS x WHERE t.ctid = x.row_id "
                                        "AND x.now IS DISTINCT FROM x.was").format(
                                    t=st.qualified, c=sql.Identifier(TENANT_COLUMN), lv=legacy_values),
                                ROW_EXCLUSIVE_BATCH, "one UPDATE of the rows the backfill filled (no table lock)",
                                long_scan=True))

        # 4. seed: the legacy mapping's users, tenants and memberships, the System Tenant, and the tables,
        # where they did not exist before
        system = table_states.system_tenant_id(rb)
        existed = {name: objects.get(("table", name), {}).get("existed", True) for name in seed.CONVENTIONS}
        if existed["tenants"] and existed["users"] and existed["user_tenants"]:
            out += _mapping_steps(conn, p)
        if system is not None and not objects.get(("system tenant", str(p.system_tenant.uuid)), {}).get("existed", True) \
                and existed["tenants"]:
            out.append(Step(PHASE, "tenants", "delete the System Tenant", sql.SQL("DELETE FROM {} WHERE uuid = {}").format(
                sql.Identifier(schema, "tenants"), sql.Literal(str(p.system_tenant.uuid))),
                "ROW EXCLUSIVE on tenants (one row)", "nothing refers to it any more"))
        for name in ("user_tenants", "users", "tenants"):
            if not existed[name] and catalog.relation_oid(conn, schema, name) is not None:
                out.append(Step(PHASE, name, f"drop {name}", sql.SQL("DROP TABLE {}").format(
                    sql.Identifier(schema, name)), "ACCESS EXCLUSIVE on a table the runbook created",
                    "the application did not have this table before the migration"))
    return out


def _tenant_indexes(conn, oid: int | None) -> list[str]:
    if oid is None:
        return []
    return [r[0] for r in conn.execute(text(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_attribute a ON "
        "a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = :oid AND a.attname = :col "
        "AND NOT i.indisprimary ORDER BY 1"), {"oid": oid, "col": TENANT_COLUMN})]


def _restore_keys(conn, schema: str, states, before) -> list[Step]:
    """Original primary keys and foreign keys between tenant tables, where the composite-key step replaced them."""
    out: list[Step] = []
    current_fks = {fk.name: fk for fk in distribution.foreign_keys(conn, schema, list(states))}
    swaps = []
    for name, st in states.items():
        legacy_pk = next((c for c in before[name]["constraints"] if c["contype"] == "p"), None)
        if legacy_pk is None or not st.pk_columns or st.pk_columns == before[name]["key_columns"]:
            continue
        index = names.truncate(f"{legacy_pk['conname']}_restore")
        valid = distribution.index_valid(conn, schema, index)
        if valid is False:
            out.append(Step(PHASE, name, f"drop INVALID index {index}", sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                sql.Identifier(schema, index)), SHARE_UPDATE_EXCLUSIVE, "CONCURRENTLY", transactional=False))
        if not valid:
            out.append(Step(PHASE, name, f"build the unique index on ({', '.join(before[name]['key_columns'])})",
                            sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} ({})").format(
                                sql.Identifier(index), st.qualified,
                                sql.SQL(", ").join(map(sql.Identifier, before[name]["key_columns"]))),
                            SHARE_UPDATE_EXCLUSIVE, "CONCURRENTLY: reads and writes continue", transactional=False,
                            long_scan=True, on_failure=sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                                sql.Identifier(schema, index))))
        current_pk = distribution.pk_name(conn, st.oid)
        swaps.append(Step(PHASE, name, f"restore the primary key {legacy_pk['conname']}",
                          sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}, ADD CONSTRAINT {} PRIMARY KEY USING INDEX {}").format(
                              st.qualified, sql.Identifier(current_pk), sql.Identifier(legacy_pk["conname"]),
                              sql.Identifier(index)), ACCESS_EXCLUSIVE_META, "one statement, no scan"))
    for name, st in states.items():
        for con in before[name]["constraints"]:
            if con["contype"] != "f" or con["conname"] in current_fks:
                continue
            if not any(f" REFERENCES {t}(" in con["definition"] for t in states):
                continue
            out.append(Step(PHASE, name, f"restore {con['conname']} NOT VALID",
                            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(
                                st.qualified, sql.Identifier(con["conname"]), sql.SQL(con["definition"])),
                            SHARE_ROW_EXCLUSIVE_META, "NOT VALID skips the scan"))
            out.append(Step(PHASE, name, f"validate {con['conname']}",
                            sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(st.qualified,
                                                                                   sql.Identifier(con["conname"])),
                            SHARE_UPDATE_EXCLUSIVE, "scans without blocking reads or writes", long_scan=True))
    legacy_names = {c["conname"] for t in states for c in before[t]["constraints"]}
    for fk in current_fks.values():
        if TENANT_COLUMN in fk.cols and fk.name not in legacy_names:
            out.append(Step(PHASE, fk.child, f"drop {fk.name}", sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(schema, fk.child), sql.Identifier(fk.name)), ACCESS_EXCLUSIVE_META, "catalog change only"))
    return out + swaps


def plan(rb) -> pd.DataFrame:
    with rb.engine.connect() as conn:
        return plan_frame(steps(rb), conn)


def _mapping_steps(conn, p) -> list[Step]:
    """Delete what the legacy mapping inserted (the ledger says which rows it created), memberships first."""
    if not mapping.map_tables_exist(conn, p):
        return []
    s = p.schema_
    created_users = sql.SQL("SELECT user_id FROM {} WHERE created").format(mapping.ledger_table(p, "user_map"))
    created_tenants = _created_tenants(conn, p)
    out = []
    for table, action, where in (
            ("user_tenants", "delete the memberships the legacy mapping created",
             sql.SQL("tenant_id IN ({}) OR user_id IN ({})").format(created_tenants, created_users)),
            ("users", "delete the users the legacy mapping created", sql.SQL("id IN ({})").format(created_users)),
            ("tenants", "delete the tenants the legacy mapping created", sql.SQL("id IN ({})").format(created_tenants))):
        target = sql.Identifier(s, table)
        n = conn.exec_driver_sql(render(conn, sql.SQL("SELECT count(*) FROM {} WHERE ").format(target) + where)).scalar()
        if n:
            out.append(Step(PHASE, table, f"{action} ({n:,} rows)", sql.SQL("DELETE FROM {} WHERE ").format(target) + where,
                            f"ROW EXCLUSIVE on {table} ({n:,} rows)",
                            "only rows the ledger records as created by this runbook; no core row refers to them any more"))
    return out


def apply(rb, force: bool = False) -> pd.DataFrame:
    """Refuses while other tenants own rows, unless forced; then runs the plan and forgets the checkpoints."""
    others = foreign_rows(rb)
    if len(others) and not force:
        listing = ", ".join(f"{r.table}: {r._2:,}" for r in others.itertuples())
        raise RunbookError(f"rows belong to tenants other than the System Tenant ({listing}); rolling back would "
                           f"strip them of their tenant. Move them first, or run with force=True (--force) if that "
                           f"is intended. Nothing was changed.")
    results = rb.executor().run_all(steps(rb))
    if not rb.dry_run and rb.ledger.exists(rb.control):
        rb.control.exec_driver_sql(render(rb.control, sql.SQL("DELETE FROM {}").format(
            sql.Identifier(rb.params.ledger_schema, "backfill_checkpoints"))))
        if mapping.map_tables_exist(rb.control, rb.params):  # the mapped rows are gone: so is their record
            for table in ("org_tenants", "user_map"):
                rb.control.exec_driver_sql(render(rb.control, sql.SQL("DELETE FROM {}").format(
                    mapping.ledger_table(rb.params, table))))
    return results_frame(results)


def assert_rolled_back(rb) -> str:
    if rb.dry_run:
        return "dry run: nothing was changed"
    left = steps(rb)
    if left:
        raise RunbookError("rollback incomplete: " + "; ".join(f"{s.table}: {s.action}" for s in left[:10])
                           + ". Re-run 99_rollback: it resumes.")
    return "the database is back to its shape before the migration"
