"""Seed's part of the legacy mapping: a tenant per row of the tenant source, a user per legacy user, a
membership per (user, org), from the tables and columns legacy.source names.

Each is one set-based INSERT … ON CONFLICT DO NOTHING that also records what it mapped in the ledger
(org_tenants, user_map), and each is planned only while something is left to insert, so a re-run plans
nothing. The tenancy tables only grow: no existing row is updated or deleted.
"""

from __future__ import annotations

from psycopg import sql
from sqlalchemy.engine import Connection

from ..db import catalog
from ..db.ddl import NEW_OBJECT, UNDO_PHASE, Step, on_table
from ..db.sqltext import render
from ..errors import RunbookError
from . import mapping

PHASE = "seed"


def _count(conn: Connection, query: sql.Composable) -> int:
    return int(conn.exec_driver_sql(render(conn, query)).scalar())


def _column_or_now(alias: str, column: str | None) -> sql.Composable:
    return sql.Identifier(alias, column) if column else sql.SQL("now()")


def _tenants(p, orgs: sql.Composable | None = None) -> tuple[sql.Composable, sql.Composable]:
    """`orgs`: where the orgs come from (aliased o): the tenant source's table, or a signup trigger's new row."""
    s, ot = p.schema_, mapping.ledger_table(p, "org_tenants")
    spec = mapping.source(p).tenants
    wanted = sql.SQL("SELECT {key} AS org_id, {uuid} AS uuid, o.{name}::text AS name, {created} AS created_at, "
                     "{updated} AS updated_at FROM {orgs} "
                     "WHERE NOT EXISTS (SELECT 1 FROM {ot} m WHERE m.org_id = {key})").format(
        key=mapping.org_key("o", p), uuid=mapping.org_tenant_uuid(p), name=sql.Identifier(spec.name),
        created=_column_or_now("o", spec.created_at), updated=_column_or_now("o", spec.updated_at),
        orgs=orgs or sql.SQL("{} o").format(mapping.org_table(p)), ot=ot)
    insert = sql.SQL(
        "WITH wanted AS ({wanted}), "
        "ins AS (INSERT INTO {tenants} (uuid, name, created_at, updated_at) "
        "  SELECT uuid, name, created_at, updated_at FROM wanted ON CONFLICT (uuid) DO NOTHING RETURNING id, uuid) "
        "INSERT INTO {ot} (org_id, tenant_uuid, tenant_id, created) "
        "SELECT w.org_id, w.uuid, coalesce(ins.id, t.id), ins.id IS NOT NULL FROM wanted w "
        "LEFT JOIN ins ON ins.uuid = w.uuid LEFT JOIN {tenants} t ON t.uuid = w.uuid "
        "WHERE ins.id IS NOT NULL OR t.id IS NOT NULL ON CONFLICT (org_id) DO NOTHING").format(
        wanted=wanted, tenants=sql.Identifier(s, "tenants"), ot=ot)
    return insert, sql.SQL("SELECT count(*) FROM ({}) x").format(wanted)


def user_candidates(p, only: sql.Composable | None = None) -> sql.Composable:
    """Legacy users with their normalised email; n = 1 for the first (lowest key) of each email. `only`: a condition
    on the user row u (a signup trigger's: the users with the new user's email, among whom n is the same)."""
    spec = mapping.source(p).users
    key, email = sql.Identifier("u", spec.key), sql.Identifier("u", spec.email)
    name = sql.SQL("u.{}::text").format(sql.Identifier(spec.name)) if spec.name else sql.SQL("NULL::text")
    return sql.SQL(
        "SELECT {key} AS id, {uuid} AS uuid, lower(btrim({email})) AS email, {name} AS display_name, "
        "{created} AS created_at, {updated} AS updated_at, "
        "row_number() OVER (PARTITION BY lower(btrim({email})) ORDER BY {key}) AS n, "
        "first_value({key}) OVER (PARTITION BY lower(btrim({email})) ORDER BY {key}) AS first_id "
        "FROM {user} u WHERE {only}").format(
        only=only or sql.SQL("true"), key=key, uuid=mapping.derived_uuid(p, spec, "u"), email=email, name=name,
        created=_column_or_now("u", spec.created_at), updated=_column_or_now("u", spec.updated_at),
        user=mapping.user_table(p))


def email_taken(p, alias: str) -> sql.Composable:
    """A legacy user (a row of user_candidates) whose normalised email a users row of another uuid holds."""
    return sql.SQL("EXISTS (SELECT 1 FROM {users} us WHERE us.email = {a}.email AND us.uuid <> {a}.uuid)").format(
        users=sql.Identifier(p.schema_, "users"), a=sql.Identifier(alias))


def _users(p, only: sql.Composable | None = None) -> tuple[sql.Composable, sql.Composable]:
    s, um = p.schema_, mapping.ledger_table(p, "user_map")
    users = sql.Identifier(s, "users")
    wanted = sql.SQL(
        "SELECT c.* FROM ({cand}) c WHERE c.n = 1 "
        "AND NOT EXISTS (SELECT 1 FROM {um} m WHERE m.legacy_user_id = c.id) "
        "AND NOT {taken}").format(cand=user_candidates(p, only), um=um, taken=email_taken(p, "c"))
    insert = sql.SQL(
        "WITH wanted AS ({wanted}), "
        "ins AS (INSERT INTO {users} (uuid, email, name, created_at, updated_at) "
        "  SELECT uuid, email, display_name, created_at, updated_at FROM wanted ON CONFLICT DO NOTHING "
        "  RETURNING id, uuid) "
        "INSERT INTO {um} (legacy_user_id, user_id, created) "
        "SELECT w.id, coalesce(ins.id, us.id), ins.id IS NOT NULL FROM wanted w "
        "LEFT JOIN ins ON ins.uuid = w.uuid LEFT JOIN {users} us ON us.uuid = w.uuid "
        "WHERE ins.id IS NOT NULL OR us.id IS NOT NULL ON CONFLICT (legacy_user_id) DO NOTHING").format(
        wanted=wanted, users=users, um=um)
    return insert, sql.SQL("SELECT count(*) FROM ({}) x").format(wanted)


def _memberships(p, only: sql.Composable | None = None) -> tuple[sql.Composable, sql.Composable]:
    """`only`: a condition on the candidates c (user_id, org_id): a signup trigger's, for the new row's pairs."""
    ut = sql.Identifier(p.schema_, "user_tenants")
    rows = sql.SQL(
        "SELECT um.user_id, ot.tenant_id, pr.role FROM pairs pr "
        "JOIN {um} um ON um.legacy_user_id = pr.user_id JOIN {ot} ot ON ot.org_id = pr.org_id "
        "WHERE NOT EXISTS (SELECT 1 FROM {ut} x WHERE x.user_id = um.user_id AND x.tenant_id = ot.tenant_id)").format(
        um=mapping.ledger_table(p, "user_map"),
        ot=mapping.ledger_table(p, "org_tenants"), ut=ut)
    cte = mapping.pairs_cte(p, only)
    insert = sql.SQL("WITH {cte} INSERT INTO {ut} (user_id, tenant_id, role) {rows} "
                     "ON CONFLICT (user_id, tenant_id) DO NOTHING").format(cte=cte, ut=ut, rows=rows)
    return insert, sql.SQL("WITH {} SELECT count(*) FROM ({}) x").format(cte, rows)


def tenant_statement(p, orgs: sql.Composable) -> sql.Composable:
    """The tenants of the orgs `orgs` (aliased o) names, with their map: a signup trigger's, for its new row."""
    return _tenants(p, orgs)[0]


def user_statement(p, only: sql.Composable) -> sql.Composable:
    return _users(p, only)[0]


def membership_statement(p, only: sql.Composable) -> sql.Composable:
    return _memberships(p, only)[0]


def steps(rb, conn: Connection, tables_ready: bool, before_mapping: list[Step] = ()) -> list[Step]:
    """The mapping's statements, after the tenancy tables and the System Tenant; `before_mapping` (the signup
    triggers) between the creation of the maps and the first insert. Raises, changing nothing, when the legacy
    tables are missing or a legacy role is not in the role map."""
    p = rb.params
    mapping.check_legacy_tables(conn, p)
    mapping.check_children(conn, p)  # the parent chains are sound, and no child is left behind
    unknown = mapping.unknown_roles(conn, p)
    if unknown:
        raise RunbookError(f"legacy roles without a mapping: {'; '.join(unknown)}. Add them to legacy.roles in "
                           f"params (org_user or role_ids, and order). Nothing was changed.")
    out: list[Step] = []
    maps_exist = mapping.map_tables_exist(conn, p)
    if not maps_exist:
        out.append(Step(PHASE, None, "create the mapping tables in the ledger (org_tenants, user_map)",
                        sql.SQL(mapping.MAP_TABLES_SQL).format(
                            l=sql.Identifier(p.ledger_schema), org_type=sql.SQL(mapping.key_type(conn, p, "tenants")),
                            user_type=sql.SQL(mapping.key_type(conn, p, "users"))), NEW_OBJECT,
                        "new tables in the runbook's own schema"))
    out += before_mapping
    ready = maps_exist and tables_ready
    legacy_orgs = _count(conn, sql.SQL("SELECT count(*) FROM {}").format(mapping.org_table(p)))
    tenants, pending_tenants = _tenants(p)
    n = _count(conn, pending_tenants) if ready else legacy_orgs
    if n:
        src = mapping.source(p).tenants
        how = f"uuid3 of {src.table}.{src.uuid}" if src.uuid else f"uuid3 of '{src.table}:' and {src.key}"
        out.append(Step(PHASE, "tenants", f"a tenant for each of {n:,} legacy orgs ({src.table}; {how})",
                        tenants, on_table("ROW EXCLUSIVE", note="inserts only"),
                        "inserts keyed by a derived uuid with ON CONFLICT DO NOTHING; re-runs insert nothing", planned_rows=n))
    users, pending_users = _users(p)
    n = _count(conn, pending_users) if ready else _count(conn, sql.SQL(
        "SELECT count(*) FROM ({}) c WHERE c.n = 1").format(user_candidates(p)))
    if n:
        out.append(Step(PHASE, "users", f"a user for each of {n:,} legacy users (email lower-cased and trimmed; "
                        f"a duplicate email is listed, never merged)", users, on_table("ROW EXCLUSIVE", note="inserts only"),
                        "inserts keyed by the legacy uuid with ON CONFLICT DO NOTHING; re-runs insert nothing", planned_rows=n))
    memberships, pending_memberships = _memberships(p)
    # memberships join the ledger's maps, which the tenants and users steps above fill: while either is planned
    # (a first run, or the first after a rollback emptied the maps) they are counted from the legacy pairs
    upstream = any(step.table in ("tenants", "users") for step in out)
    n = _count(conn, pending_memberships) if ready and not upstream else _count(conn, sql.SQL(
        "WITH {} SELECT count(*) FROM pairs WHERE org_exists").format(mapping.pairs_cte(p)))
    if n:
        sources = ", ".join(m.label for m in mapping.source(p).memberships)
        out.append(Step(PHASE, "user_tenants", f"{'up to ' if upstream else ''}{n:,} memberships from {sources} (roles through legacy.roles)", memberships, on_table("ROW EXCLUSIVE", ("users", "ROW SHARE"), ("tenants", "ROW SHARE"), note="inserts only; its foreign keys check users and tenants"),
                        "inserts with ON CONFLICT (user_id, tenant_id) DO NOTHING; re-runs insert nothing", planned_rows=n))
    return out


def tenants_ready(conn: Connection, schema: str) -> bool:
    return all(catalog.relation_oid(conn, schema, t) is not None for t in ("tenants", "users", "user_tenants"))


# --- undo ------------------------------------------------------------------------------------------

def undo_steps(conn: Connection, p) -> list[Step]:
    """Delete what the legacy mapping inserted (the ledger says which rows it created), memberships first."""
    if not mapping.map_tables_exist(conn, p):
        return []
    s = p.schema_
    created_users = sql.SQL("SELECT user_id FROM {} WHERE created").format(mapping.ledger_table(p, "user_map"))
    created_tenants = mapping.created_tenants(conn, p)
    out = []
    for table, action, where in (
            ("user_tenants", "delete the memberships the legacy mapping created",
             sql.SQL("tenant_id IN ({}) OR user_id IN ({})").format(created_tenants, created_users)),
            ("users", "delete the users the legacy mapping created", sql.SQL("id IN ({})").format(created_users)),
            ("tenants", "delete the tenants the legacy mapping created", sql.SQL("id IN ({})").format(created_tenants))):
        target = sql.Identifier(s, table)
        n = _count(conn, sql.SQL("SELECT count(*) FROM {} WHERE ").format(target) + where)
        if n:
            out.append(Step(UNDO_PHASE, table, f"{action} ({n:,} rows)",
                            sql.SQL("DELETE FROM {} WHERE ").format(target) + where,
                            on_table("ROW EXCLUSIVE", *catalog.delete_locks(conn, s, table), note=f"{n:,} rows"),
                            "only rows the ledger records as created by this runbook; no core row refers to them any more"))
    return out


def forget(control: Connection, p) -> None:
    """After the undo: the mapped rows are gone, so is their record in the ledger."""
    if mapping.map_tables_exist(control, p):
        for table in ("org_tenants", "user_map"):
            control.exec_driver_sql(render(control, sql.SQL("DELETE FROM {}").format(mapping.ledger_table(p, table))))
