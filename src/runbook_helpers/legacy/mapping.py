"""The legacy mapping: orgs become tenants, legacy users become users, memberships become user_tenants,
and each core row gets the tenant of its org (params `legacy`, and `org_column`/`parent` per core table).

Everything here is SQL over the legacy tables `org`, `"user"` and `org_user`, so it runs inside the
database at any size and the plan shows each statement. Determinism: a tenant's uuid is
uuid3(legacy.tenant_uuid_namespace, org.uuid) computed in SQL (the same value Python's uuid.uuid3 gives),
a user keeps its legacy uuid. What maps to what is recorded in the ledger (org_tenants, user_map, with
whether the runbook created the row), which the backfill reads and rollback undoes.

Nothing is guessed: a user whose normalised email another legacy user already has is not migrated
(never merged); a (user, org) pair whose sources name different roles gets the least privileged of them;
a row whose org is gone gets the System Tenant; a child follows its parent's tenant even where its own
org says otherwise. Each of these is listed by checks.ambiguities().
"""

from __future__ import annotations

from uuid import UUID

from psycopg import sql
from sqlalchemy.engine import Connection

from ..backfill.assignment import Assignment
from ..db import catalog
from ..db.fingerprint import row_key
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError

ORG, USER, MEMBERSHIP = "org", "user", "org_user"
NO_ORG = -1  # the effective org of a row that goes to the System Tenant

MAP_TABLES_SQL = """
CREATE TABLE IF NOT EXISTS {l}.org_tenants (
  org_id bigint PRIMARY KEY,
  tenant_uuid uuid NOT NULL,
  tenant_id bigint NOT NULL,
  created boolean NOT NULL
);
CREATE TABLE IF NOT EXISTS {l}.user_map (
  legacy_user_id bigint PRIMARY KEY,
  user_id bigint NOT NULL,
  created boolean NOT NULL
)"""


def enabled(p) -> bool:
    return bool(p.legacy.enabled)


def mapped_tables(p) -> dict[str, object]:
    """The core tables whose rows go to their org's tenant (org_column or parent), parents first."""
    specs = {t: s for t, s in p.core_tables.items() if s.org_column or s.parent}
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise RunbookError(f"core_tables: the parents of {name} form a cycle ({' -> '.join(path + (name,))}); "
                               f"a row's tenant must come from an org in the end. Nothing was changed.")
        parent = specs[name].parent
        if parent is not None:
            if parent.table not in specs:
                raise RunbookError(f"core_tables.{name}.parent: {parent.table} has neither org_column nor parent, so "
                                   f"its rows all go to the System Tenant; give it one, or map {name} by org_column. "
                                   f"Nothing was changed.")
            visit(parent.table, path + (name,))
        order.append(name)

    for name in specs:
        visit(name, ())
    return {name: specs[name] for name in order}


def ordered(p, tables: list[str]) -> list[str]:
    """`tables` in spec order, except that a mapped parent always comes before its children."""
    out: list[str] = []

    def emit(name: str) -> None:
        if name in out:
            return
        parent = p.core_tables[name].parent if enabled(p) else None
        if parent is not None and parent.table in tables:
            emit(parent.table)
        out.append(name)

    for name in tables:
        emit(name)
    return out


def org_table(p) -> sql.Identifier:
    return sql.Identifier(p.schema_, ORG)


def ledger_table(p, name: str) -> sql.Identifier:
    return sql.Identifier(p.ledger_schema, name)


def map_tables_exist(conn: Connection, p) -> bool:
    return catalog.relation_oid(conn, p.ledger_schema, "user_map") is not None and \
        catalog.relation_oid(conn, p.ledger_schema, "org_tenants") is not None


def created_tenants(conn: Connection, p) -> sql.Composable:
    """A query for the ids of the tenants the legacy mapping created (none when it never ran)."""
    if not map_tables_exist(conn, p):
        return sql.SQL("SELECT NULL::bigint WHERE false")
    return sql.SQL("SELECT tenant_id FROM {} WHERE created").format(ledger_table(p, "org_tenants"))


def check_children(conn: Connection, p) -> None:
    """A table that references a mapped table must follow it: otherwise child and parent rows end in
    different tenants (and a (tenant_id, …) foreign key could never be valid)."""
    mapped = mapped_tables(p)
    for fk in catalog.foreign_keys(conn, p.schema_, list(p.core_tables)):
        if p.cross_tenant.rule(fk.child, fk.name) == "child":
            continue  # accepted across tenants (cross_tenant.foreign_keys): the child keeps its own tenant
        if fk.parent in mapped and fk.child not in mapped and fk.child != fk.parent:
            raise RunbookError(
                f"core_tables.{fk.child}: it references {fk.parent} ({', '.join(fk.cols)}), whose rows go to their "
                f"org's tenant, but has no mapping itself; give it parent: {{table: {fk.parent}, column: "
                f"{fk.cols[0]}}}. Nothing was changed.")


def check_legacy_tables(conn: Connection, p) -> None:
    missing = [t for t in (ORG, USER, MEMBERSHIP) if catalog.relation_oid(conn, p.schema_, t) is None]
    if missing:
        raise RunbookError(f"legacy.enabled is true but {', '.join(missing)} do(es) not exist in schema {p.schema_}; "
                           f"set legacy.enabled: false for this environment. Nothing was changed.")


# --- tenant uuids ----------------------------------------------------------------------------------

def tenant_uuid(namespace: UUID, name: sql.Composable) -> sql.Composable:
    """uuid3(namespace, name) in SQL: md5 of the namespace's 16 bytes and the name, version and variant set."""
    digest = sql.SQL("md5(decode({ns}, 'hex') || convert_to({name}, 'UTF8'))").format(
        ns=sql.Literal(namespace.hex), name=name)
    return sql.SQL(
        "overlay(overlay({h} placing '3' from 13 for 1) placing substr('89ab', "
        "(('x' || substr({h}, 17, 1))::bit(4)::int & 3) + 1, 1) from 17 for 1)::uuid").format(h=digest)


def org_tenant_uuid(p, org_alias: str = "o") -> sql.Composable:
    return tenant_uuid(p.legacy.tenant_uuid_namespace, sql.SQL("{}::text").format(sql.Identifier(org_alias, "uuid")))


# --- roles -----------------------------------------------------------------------------------------

def _values(rows: list[tuple], names: str) -> sql.Composable:
    if not rows:
        rows = [tuple(None for _ in names.split(","))]
    return sql.SQL("(VALUES {}) AS {}").format(
        sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Literal, r))) for r in rows),
        sql.SQL(names))


def pairs_cte(p) -> sql.Composable:
    """CTEs `candidates` (one row per source of a (user, org) pair, with its mapped role) and `pairs`
    (one row per pair: the roles named (NULL when none is), the role its membership gets — the least
    privileged named, or the least privileged of all when none is — and whether the org exists)."""
    roles = p.legacy.roles
    s = p.schema_
    org_user_map = _values([(k, v) for k, v in roles.org_user.items()], "r(legacy, role)")
    role_id_map = _values([(str(k), v) for k, v in roles.role_ids.items()], "r(legacy, role)")
    ranks = _values([(role, i) for i, role in enumerate(roles.order)], "k(role, rank)")
    return sql.SQL("""candidates AS (
  SELECT ou.user_id, ou.org_id, 'org_user' AS source, ou.role::text AS legacy_role, r.role
  FROM {org_user} ou LEFT JOIN {org_user_map} ON r.legacy = ou.role::text
  UNION ALL
  SELECT u.id, a.org_id, 'user.role_ids', rr.role_id::text, r.role
  FROM {user} u CROSS JOIN LATERAL unnest(u.org_ids) WITH ORDINALITY AS a(org_id, k)
  LEFT JOIN LATERAL (SELECT x.role_id FROM unnest(u.role_ids) WITH ORDINALITY AS x(role_id, j)
                     WHERE cardinality(u.role_ids) <> cardinality(u.org_ids) OR x.j = a.k) rr ON true
  LEFT JOIN {role_id_map} ON r.legacy = rr.role_id::text
  WHERE a.org_id IS NOT NULL
), pairs AS (
  SELECT c.user_id, c.org_id,
         array_agg(DISTINCT c.role) FILTER (WHERE c.role IS NOT NULL) AS roles,
         string_agg(DISTINCT c.source || ': ' || c.role, '; ') AS sources,
         coalesce((array_agg(c.role ORDER BY k.rank) FILTER (WHERE c.role IS NOT NULL))[1], {least}) AS role,
         EXISTS (SELECT 1 FROM {org} o WHERE o.id = c.org_id) AS org_exists
  FROM candidates c LEFT JOIN {ranks} ON k.role = c.role
  GROUP BY c.user_id, c.org_id
)""").format(org_user=sql.Identifier(s, MEMBERSHIP), user=sql.Identifier(s, USER), org=sql.Identifier(s, ORG),
             org_user_map=org_user_map, role_id_map=role_id_map, ranks=ranks, least=sql.Literal(least_role(p)))


def least_role(p) -> str:
    return p.legacy.roles.order[0]


def unknown_roles(conn: Connection, p) -> list[str]:
    """Legacy roles the role map does not cover: 'org_user.role owner2 (3 rows)'."""
    query = sql.SQL("WITH {} SELECT source, legacy_role, count(*) FROM candidates "
                    "WHERE role IS NULL AND legacy_role IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2").format(pairs_cte(p))
    rows = conn.exec_driver_sql(render(conn, query)).all()
    return [f"{'org_user.role' if src == 'org_user' else 'user.role_ids'} {legacy!r} ({n:,} rows)"
            for src, legacy, n in rows]


# --- what a row's tenant is -------------------------------------------------------------------------

def parent_key(conn: Connection, p, table: str) -> str:
    """The parent's key column (with composite keys on, the primary key is (tenant_id, id): id is the key)."""
    st = catalog.table_state(conn, p.schema_, table)
    cols = [c for c in st.pk_columns if c != TENANT_COLUMN]
    if len(cols) != 1:
        raise RunbookError(f"core_tables.*.parent: {table} needs a one-column primary key to be a parent "
                           f"(it has {', '.join(st.pk_columns) or 'none'}). Nothing was changed.")
    return cols[0]


def effective_org(conn: Connection, p, table: str, row: sql.Composable) -> sql.Composable:
    """The org a row of `table` belongs to, from legacy data alone: its parent's (where the parent row
    exists), else its own org column's (where that org exists), else NO_ORG (the System Tenant)."""
    spec = p.core_tables[table]
    parts: list[sql.Composable] = []
    if spec.parent is not None:
        parent_row = sql.Identifier(f"p_{table}")
        parts.append(sql.SQL("(SELECT {eff} FROM {pt} AS {pr} WHERE {pr}.{pk} = {row}.{col})").format(
            eff=effective_org(conn, p, spec.parent.table, parent_row), pt=sql.Identifier(p.schema_, spec.parent.table),
            pr=parent_row, pk=sql.Identifier(parent_key(conn, p, spec.parent.table)), row=row,
            col=sql.Identifier(spec.parent.column)))
    if spec.org_column:
        parts.append(sql.SQL("(SELECT o.id FROM {org} o WHERE o.id = {row}.{col})").format(
            org=org_table(p), row=row, col=sql.Identifier(spec.org_column)))
    parts.append(sql.Literal(NO_ORG))
    return sql.SQL("COALESCE({})").format(sql.SQL(", ").join(parts))


def tenant_of_org(p, org: sql.Composable, system_id: int) -> sql.Composable:
    return sql.SQL("COALESCE((SELECT m.tenant_id FROM {ot} m WHERE m.org_id = {org}), {system})").format(
        ot=ledger_table(p, "org_tenants"), org=org, system=sql.Literal(int(system_id)))


def mapped_assignment(conn: Connection, p, table: str, system_id: int) -> Assignment:
    """The tenant of the parent row (filled before its children), else of the row's own org, else the
    System Tenant. Pending: NULL; a child whose parent has another tenant (whoever wrote it: a child
    follows its parent); a row still on the System Tenant (the fast default) whose org maps elsewhere,
    unless the application inserted it since the record opened (its writer, or the rollout trigger, chose
    its tenant then; an update that left tenant_id alone chose nothing)."""
    spec = p.core_tables[table]
    me = sql.Identifier(p.schema_, table)
    col = sql.Identifier(TENANT_COLUMN)
    system = sql.Literal(int(system_id))
    parts: list[sql.Composable] = []
    parent_tenant = None
    if spec.parent is not None:
        parent_tenant = sql.SQL("(SELECT pr.{c} FROM {pt} AS pr WHERE pr.{pk} = {me}.{col})").format(
            c=col, pt=sql.Identifier(p.schema_, spec.parent.table),
            pk=sql.Identifier(parent_key(conn, p, spec.parent.table)), me=me, col=sql.Identifier(spec.parent.column))
        parts.append(parent_tenant)
    if spec.org_column:
        parts.append(sql.SQL("(SELECT m.tenant_id FROM {ot} m WHERE m.org_id = {me}.{col})").format(
            ot=ledger_table(p, "org_tenants"), me=me, col=sql.Identifier(spec.org_column)))
    value = sql.SQL("COALESCE({}, {})").format(sql.SQL(", ").join(parts), system)
    moved = sql.SQL("{col} = {system} AND {value} <> {system}").format(col=col, system=system, value=value)
    key = catalog.table_state(conn, p.schema_, table).pk_columns
    if key and catalog.relation_oid(conn, p.ledger_schema, "app_writes") is not None:
        moved = moved + sql.SQL(" AND NOT EXISTS (SELECT 1 FROM {log} AS w WHERE w.table_name = {name} "
                                "AND w.key = {key} AND w.first_op = 'INSERT')").format(
            log=ledger_table(p, "app_writes"), name=sql.Literal(table), key=row_key(me, key))
    if parent_tenant is None:
        pending = sql.SQL("({col} IS NULL OR ({moved}))").format(col=col, moved=moved)
    else:
        pending = sql.SQL("({col} IS NULL OR {col} IS DISTINCT FROM coalesce({pt}, {col}) OR ({pt} IS NULL AND "
                          "{moved}))").format(col=col, pt=parent_tenant, moved=moved)
    return Assignment(value, pending)


def rows_to_map(conn: Connection, p, table: str) -> int:
    """Rows of a mapped table whose org is a real tenant (planning, before the column or mapping exists)."""
    row = sql.Identifier(p.schema_, table)
    query = sql.SQL("SELECT count(*) FROM {t} WHERE {eff} <> {none}").format(
        t=row, eff=effective_org(conn, p, table, row), none=sql.Literal(NO_ORG))
    return int(conn.exec_driver_sql(render(conn, query)).scalar())


def rows_not_where_their_org_says(conn: Connection, p, table: str, system_id: int) -> int:
    """Rows whose tenant_id is not (yet) the one the legacy data implies, their parents' included: what a
    backfill still has to move, before any of this run's batches."""
    row = sql.Identifier(p.schema_, table)
    target = tenant_of_org(p, effective_org(conn, p, table, row), system_id)
    query = sql.SQL("SELECT count(*) FROM {t} WHERE {c} IS DISTINCT FROM {target}").format(
        t=row, c=sql.Identifier(TENANT_COLUMN), target=target)
    return int(conn.exec_driver_sql(render(conn, query)).scalar())
