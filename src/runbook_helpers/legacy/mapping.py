"""The legacy mapping: the rows of a tenant source become tenants, legacy users become users, memberships
become user_tenants, and each core row gets the tenant of its org (params `legacy`: `source` names the
tables and columns, `roles` the role maps; `org_column`/`parent` per core table).

"org" below is a row of the tenant source's table (the demo's `org`; a rental shop's `store`), "user" a row
of its users table (the demo's `"user"`, the shop's `staff`). Everything here is SQL over those tables, so
it runs inside the database at any size and the plan shows each statement. Determinism: a tenant's uuid is
uuid3(legacy.tenant_uuid_namespace, its uuid column) computed in SQL (the same value Python's uuid.uuid3
gives), or uuid3(namespace, '<table>:<key>') where the source has no uuid column; a user keeps its legacy
uuid (or gets uuid3(namespace, '<table>:<key>')). What maps to what is recorded in the ledger (org_tenants, user_map, with
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
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError

ROW = "mapped_row"  # how a mapped assignment names the row it fills: the same for a table and its partitions

# the maps key on the source's own key types (bigint, text, uuid, …): {org_type} and {user_type}
MAP_TABLES_SQL = """
CREATE TABLE IF NOT EXISTS {l}.org_tenants (
  org_id {org_type} PRIMARY KEY,
  tenant_uuid uuid NOT NULL,
  tenant_id bigint NOT NULL,
  created boolean NOT NULL
);
CREATE TABLE IF NOT EXISTS {l}.user_map (
  legacy_user_id {user_type} PRIMARY KEY,
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
                                   f"its rows all go to the System Tenant; give it one, or map {name} by org_column "
                                   f"({p.where('core_tables', name, 'parent')}). Nothing was changed.")
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


def source(p):
    """The tenant source of the params (legacy.source); legacy.enabled guarantees there is one."""
    if p.legacy.source is None:
        raise RunbookError("legacy.source: the params name no tenant source; name it in the application's spec "
                           "(see params/apps/demo.yaml). Nothing was changed.")
    return p.legacy.source


def org_table(p) -> sql.Identifier:
    return sql.Identifier(p.schema_, source(p).tenants.table)


def org_key(alias: str, p) -> sql.Identifier:
    """The tenant source's key column of the row `alias` (the demo's o.id, the shop's s.store_id)."""
    return sql.Identifier(alias, source(p).tenants.key)


def user_table(p) -> sql.Identifier:
    return sql.Identifier(p.schema_, source(p).users.table)


def tenants_label(p) -> str:
    return source(p).tenants.table


def users_label(p) -> str:
    return source(p).users.table


def memberships_label(p) -> str:
    """How listings name the membership sources as a whole: the first one's table (the demo's org_user)."""
    return source(p).memberships[0].table


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
                f"{fk.cols[0]}}} ({p.where('core_tables', fk.child)}). Nothing was changed.")


# the key types a map can hold, by family: two columns of one family compare without a cast (an integer column
# with a bigint key, a varchar column with a text key); across families a comparison would fail at run time
KEY_FAMILIES = {"smallint": "integer", "integer": "integer", "bigint": "integer", "text": "text",
                "character varying": "text", "character": "text", "uuid": "uuid"}


def key_family(type_name: str) -> str | None:
    """'integer', 'text' or 'uuid' for a column's type (format_type without modifiers; arrays: their element's)."""
    return KEY_FAMILIES.get(type_name.removesuffix("[]"))


def key_type(conn: Connection, p, part: str) -> str:
    """The SQL type of the tenant source's key (part "tenants") or its users' key ("users"), as the ledger's maps
    declare it: integers widened to bigint, the others as they are (text, varchar(n) as text, uuid)."""
    spec = getattr(source(p), part)
    found = (_columns(conn, p.schema_, spec.table) or {}).get(spec.key)
    family = key_family(found) if found else "integer"  # planning before the tables exist: as the demo's
    return {"integer": "bigint", "text": "text", "uuid": "uuid"}[family or "integer"]


def _columns(conn: Connection, schema: str, table: str) -> dict[str, str] | None:
    """column -> type of a table (None when there is no such table)."""
    oid = catalog.relation_oid(conn, schema, table)
    if oid is None:
        return None
    return dict(conn.exec_driver_sql(
        "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
        "AND NOT attisdropped", (oid,)).all())


def check_legacy_tables(conn: Connection, p) -> None:
    """Every table and column the tenant source and the core tables' org_column/parent name exists; an
    error names the params file and key that named it."""
    src = source(p)
    wanted: list[tuple[tuple[str, ...], str, str | None]] = []   # (params key, table, column)
    for part, spec in (("tenants", src.tenants), ("users", src.users)):
        wanted.append((("legacy", "source", part, "table"), spec.table, None))
        wanted += [(("legacy", "source", part, f), spec.table, getattr(spec, f)) for f in type(spec).model_fields
                   if f != "table" and getattr(spec, f)]
    for i, m in enumerate(src.memberships):
        at = ("legacy", "source", "memberships", str(i))
        wanted.append((at + ("table",), m.table, None))
        wanted += [(at + (f,), m.table, getattr(m, f)) for f in ("user", "tenant", "role") if getattr(m, f)]
    for table, spec in p.core_tables.items():
        if spec.org_column:
            wanted.append((("core_tables", table, "org_column"), table, spec.org_column))
        if spec.parent is not None:
            wanted.append((("core_tables", table, "parent", "column"), table, spec.parent.column))
    # the columns that hold a key of the tenant source or of its users, each with the key it must compare to
    org_key_at = ("legacy", "source", "tenants", "key")
    user_key_at = ("legacy", "source", "users", "key")
    holds: dict[tuple[str, ...], tuple[str, ...]] = {}
    for i, m in enumerate(src.memberships):
        holds[("legacy", "source", "memberships", str(i), "user")] = user_key_at
        holds[("legacy", "source", "memberships", str(i), "tenant")] = org_key_at
    for table, spec in p.core_tables.items():
        if spec.org_column:
            holds[("core_tables", table, "org_column")] = org_key_at
    problems: list[str] = []
    seen: dict[str, dict[str, str] | None] = {}
    found: dict[tuple[str, ...], tuple[str, str, str]] = {}  # params key -> (table, column, type)
    for loc, table, column in wanted:
        if table not in seen:
            seen[table] = _columns(conn, p.schema_, table)
        cols = seen[table]
        if cols is None and column is None:
            problems.append(f"table {p.schema_}.{table} does not exist ({p.where(*loc)})")
        elif cols is not None and column is not None and column not in cols:
            problems.append(f"column {table}.{column} does not exist ({p.where(*loc)})")
        elif cols is not None and column is not None:
            found[loc] = (table, column, cols[column])
    for loc in (org_key_at, user_key_at):
        table, column, type_name = found.get(loc, ("", "", "integer"))
        if type_name.endswith("[]") or key_family(type_name) is None:
            problems.append(f"column {table}.{column} is {type_name}: a key of the tenant source must be an integer, "
                            f"text or uuid column ({p.where(*loc)}); name such a column, e.g. a unique surrogate")
    for loc, key_at in holds.items():
        if loc in found and key_at in found and key_family(found[key_at][2]) is not None:
            table, column, type_name = found[loc]
            key_table, key_column, key_type_name = found[key_at]
            if key_family(type_name) != key_family(key_type_name):
                problems.append(f"column {table}.{column} is {type_name} but holds keys of {key_table}.{key_column}, "
                                f"which is {key_type_name} ({p.where(*loc)})")
    if problems:
        raise RunbookError(f"legacy.enabled is true but the tenant source does not fit the database: "
                           f"{'; '.join(problems)}. Fix the names in that file, or set legacy.enabled: false for this "
                           f"environment. Nothing was changed.")


# --- tenant uuids ----------------------------------------------------------------------------------

def tenant_uuid(namespace: UUID, name: sql.Composable) -> sql.Composable:
    """uuid3(namespace, name) in SQL: md5 of the namespace's 16 bytes and the name, version and variant set."""
    digest = sql.SQL("md5(decode({ns}, 'hex') || convert_to({name}, 'UTF8'))").format(
        ns=sql.Literal(namespace.hex), name=name)
    return sql.SQL(
        "overlay(overlay({h} placing '3' from 13 for 1) placing substr('89ab', "
        "(('x' || substr({h}, 17, 1))::bit(4)::int & 3) + 1, 1) from 17 for 1)::uuid").format(h=digest)


def derived_uuid(p, spec, alias: str) -> sql.Composable:
    """A row's own uuid column, or uuid3(namespace, '<table>:<key>') where the source has none."""
    if spec.uuid:
        return sql.Identifier(alias, spec.uuid)
    return tenant_uuid(p.legacy.tenant_uuid_namespace, sql.SQL("{} || {}::text").format(
        sql.Literal(f"{spec.table}:"), sql.Identifier(alias, spec.key)))


def org_tenant_uuid(p, org_alias: str = "o") -> sql.Composable:
    """A tenant's uuid: uuid3(namespace, the source row's uuid), or the derived uuid of a source without one."""
    spec = source(p).tenants
    if not spec.uuid:
        return derived_uuid(p, spec, org_alias)
    return tenant_uuid(p.legacy.tenant_uuid_namespace, sql.SQL("{}::text").format(sql.Identifier(org_alias, spec.uuid)))


# --- roles -----------------------------------------------------------------------------------------

def _values(rows: list[tuple], names: str) -> sql.Composable:
    if not rows:
        rows = [tuple(None for _ in names.split(","))]
    return sql.SQL("(VALUES {}) AS {}").format(
        sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Literal, r))) for r in rows),
        sql.SQL(names))


def _candidates(p, m) -> sql.Composable:
    """One row per (user, org, role) a membership source names: a join table or a plain column of the
    user table, or parallel arrays (paired by position; where their lengths differ, every role is named)."""
    maps = p.legacy.roles.maps
    table = sql.Identifier(p.schema_, m.table)
    label = sql.Literal(m.label)
    role_map = _values(list(maps.get(m.role_map, {}).items()), "r(legacy, role)")
    fixed = sql.SQL("{}::text").format(sql.Literal(m.default_role))
    if not m.arrays:
        role = sql.SQL("ou.{}::text").format(sql.Identifier(m.role)) if m.role else sql.SQL("NULL::text")
        mapped = sql.SQL("coalesce(r.role, CASE WHEN {role} IS NULL THEN {fixed} END)").format(role=role, fixed=fixed) \
            if m.default_role else sql.SQL("r.role")
        return sql.SQL(
            "SELECT ou.{user} AS user_id, ou.{tenant} AS org_id, {label} AS source, {role} AS legacy_role, {mapped} AS role "
            "FROM {table} ou LEFT JOIN {role_map} ON r.legacy = {role} "
            "WHERE ou.{user} IS NOT NULL AND ou.{tenant} IS NOT NULL").format(
            user=sql.Identifier(m.user), tenant=sql.Identifier(m.tenant), label=label, role=role, mapped=mapped,
            table=table, role_map=role_map)
    if m.role:
        roles = sql.Identifier("u", m.role)
        paired = sql.SQL(
            "LEFT JOIN LATERAL (SELECT x.role_id FROM unnest({roles}) WITH ORDINALITY AS x(role_id, j) "
            "WHERE cardinality({roles}) <> cardinality({orgs}) OR x.j = a.k) rr ON true").format(
            roles=roles, orgs=sql.Identifier("u", m.tenant))
        role = sql.SQL("rr.role_id::text")
    else:
        paired, role = sql.SQL(""), sql.SQL("NULL::text")
    mapped = sql.SQL("coalesce(r.role, CASE WHEN {role} IS NULL THEN {fixed} END)").format(role=role, fixed=fixed) \
        if m.default_role else sql.SQL("r.role")
    return sql.SQL(
        "SELECT u.{user}, a.org_id, {label}, {role}, {mapped} "
        "FROM {table} u CROSS JOIN LATERAL unnest(u.{orgs}) WITH ORDINALITY AS a(org_id, k) {paired} "
        "LEFT JOIN {role_map} ON r.legacy = {role} "
        "WHERE a.org_id IS NOT NULL").format(
        user=sql.Identifier(m.user), label=label, role=role, mapped=mapped, table=table,
        orgs=sql.Identifier(m.tenant), paired=paired, role_map=role_map)


def pairs_cte(p, only: sql.Composable | None = None) -> sql.Composable:
    """CTEs `candidates` (one row per source of a (user, org) pair, with its mapped role) and `pairs`
    (one row per pair: the roles named (NULL when none is), the role its membership gets — the least
    privileged named, or the least privileged of all when none is — and whether the org exists). `only`: a
    condition on the candidates c (user_id, org_id), which PostgreSQL pushes into each source."""
    roles = p.legacy.roles
    ranks = _values([(role, i) for i, role in enumerate(roles.order)], "k(role, rank)")
    candidates = sql.SQL("\n  UNION ALL\n  ").join(_candidates(p, m) for m in source(p).memberships)
    candidates = sql.SQL("SELECT * FROM ({}) AS c(user_id, org_id, source, legacy_role, role) WHERE {}").format(
        candidates, only or sql.SQL("true"))  # named here: the first source may be an array one
    return sql.SQL("""candidates AS (
  {candidates}
), pairs AS (
  SELECT c.user_id, c.org_id,
         array_agg(DISTINCT c.role) FILTER (WHERE c.role IS NOT NULL) AS roles,
         string_agg(DISTINCT c.source || ': ' || c.role, '; ') AS sources,
         coalesce((array_agg(c.role ORDER BY k.rank) FILTER (WHERE c.role IS NOT NULL))[1], {least}) AS role,
         EXISTS (SELECT 1 FROM {org} o WHERE {key} = c.org_id) AS org_exists
  FROM candidates c LEFT JOIN {ranks} ON k.role = c.role
  GROUP BY c.user_id, c.org_id
)""").format(candidates=candidates, org=org_table(p), key=org_key("o", p), ranks=ranks,
             least=sql.Literal(least_role(p)))


def least_role(p) -> str:
    return p.legacy.roles.order[0]


def unknown_roles(conn: Connection, p) -> list[str]:
    """Legacy roles the role map does not cover: 'org_user.role owner2 (3 rows)'."""
    query = sql.SQL("WITH {} SELECT source, legacy_role, count(*) FROM candidates "
                    "WHERE role IS NULL AND legacy_role IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2").format(pairs_cte(p))
    rows = conn.exec_driver_sql(render(conn, query)).all()
    column = {m.label: f"{m.table}.{m.role}" for m in source(p).memberships}
    return [f"{column.get(src, src)} {legacy!r} ({n:,} rows)" for src, legacy, n in rows]


# --- what a row's tenant is -------------------------------------------------------------------------

def parent_key(conn: Connection, p, table: str) -> str:
    """The parent's key column (with composite keys on, the primary key is (tenant_id, id): id is the key)."""
    st = catalog.table_state(conn, p.schema_, table)
    cols = [c for c in st.pk_columns if c != TENANT_COLUMN]
    if len(cols) != 1:
        children = [t for t, s in p.core_tables.items() if s.parent is not None and s.parent.table == table]
        where = "; ".join(p.where("core_tables", t, "parent") for t in children)
        raise RunbookError(f"core_tables.*.parent: {table} needs a one-column primary key to be a parent "
                           f"(it has {', '.join(st.pk_columns) or 'none'}; named in {where}). Nothing was changed.")
    return cols[0]


def effective_org(conn: Connection, p, table: str, row: sql.Composable) -> sql.Composable:
    """The key of the org a row of `table` belongs to, from legacy data alone: its parent's where the parent row
    exists (even where the parent has no org: the row follows it to the System Tenant), else its own org column's
    where that org exists, else NULL (the System Tenant). A found parent decides through a one-element array,
    which is not NULL where its element is, so this works for a key of any type."""
    spec = p.core_tables[table]
    parts: list[sql.Composable] = []
    if spec.parent is not None:
        parent_row = sql.Identifier(f"p_{table}")
        parts.append(sql.SQL("(SELECT ARRAY[{eff}] FROM {pt} AS {pr} WHERE {pr}.{pk} = {row}.{col})").format(
            eff=effective_org(conn, p, spec.parent.table, parent_row), pt=sql.Identifier(p.schema_, spec.parent.table),
            pr=parent_row, pk=sql.Identifier(parent_key(conn, p, spec.parent.table)), row=row,
            col=sql.Identifier(spec.parent.column)))
    if spec.org_column:
        parts.append(sql.SQL("ARRAY[(SELECT {key} FROM {org} o WHERE {key} = {row}.{col})]").format(
            key=org_key("o", p), org=org_table(p), row=row, col=sql.Identifier(spec.org_column)))
    if not parts:
        return sql.SQL("NULL")
    return sql.SQL("(COALESCE({}))[1]").format(sql.SQL(", ").join(parts))


def tenant_of_org(p, org: sql.Composable, system_id: int) -> sql.Composable:
    return sql.SQL("COALESCE((SELECT m.tenant_id FROM {ot} m WHERE m.org_id = {org}), {system})").format(
        ot=ledger_table(p, "org_tenants"), org=org, system=sql.Literal(int(system_id)))


def misplaced_rows_query(conn: Connection, p, table: str, system_id: int) -> sql.Composable:
    """The rows of `table` whose tenant_id is not the one the legacy data implies (effective_org, then the
    ledger's org_tenants), counted in a form Citus plans once the tables are distributed: no correlated
    subquery (Citus refuses one on a local table, like the ledger's, or on a distributed table not correlated on
    the distribution column). The small side is computed first, as MATERIALIZED CTEs: the orgs with their
    mapped tenant (the tenant source and the ledger, local tables: one row per org), and per parent table its
    rows' effective org by key; the table itself is then joined to them (on PostgreSQL plain hash joins, on
    Citus each shard joins the intermediate results). The same statement serves both, with the same meaning as
    tenant_of_org(effective_org(…)). A parent table's keys and orgs travel to the coordinator and back to the
    workers: one row per parent row, two integers each."""
    ctes: dict[str, sql.Composable] = {"orgmap": sql.SQL(
        "SELECT {key} AS org_id, m.tenant_id FROM {org} o LEFT JOIN {ot} m ON m.org_id = {key}").format(
        key=org_key("o", p), org=org_table(p), ot=ledger_table(p, "org_tenants"))}

    def org_of(name: str, row: str) -> tuple[sql.Composable, list[sql.Composable]]:
        """The effective org of the row `row` of `name` (an expression) and the joins it needs."""
        spec = p.core_tables[name]
        own: sql.Composable = sql.SQL("NULL")
        joins: list[sql.Composable] = []
        if spec.org_column:
            alias = sql.Identifier(f"{row}_org")
            joins.append(sql.SQL("LEFT JOIN orgmap {a} ON {a}.org_id = {r}.{col}").format(
                a=alias, r=sql.Identifier(row), col=sql.Identifier(spec.org_column)))
            own = sql.SQL("{}.org_id").format(alias)
        if spec.parent is None:
            return own, joins
        cte = effective(spec.parent.table)
        alias = sql.Identifier(f"{row}_parent")
        joins.insert(0, sql.SQL("LEFT JOIN {cte} {a} ON {a}.key = {r}.{col}").format(
            cte=sql.Identifier(cte), a=alias, r=sql.Identifier(row), col=sql.Identifier(spec.parent.column)))
        # a found parent decides, even where it has no org (NULL: the System Tenant)
        return sql.SQL("CASE WHEN {a}.key IS NOT NULL THEN {a}.org ELSE {own} END").format(a=alias, own=own), joins

    done: dict[str, str] = {}  # parent table -> its CTE

    def effective(name: str) -> str:
        if name not in done:
            org, joins = org_of(name, "t")  # its own parent's CTE first
            done[name] = f"effective_org_{len(done)}"
            ctes[done[name]] = sql.SQL("SELECT t.{pk} AS key, {org} AS org FROM {t} t {joins}").format(
                pk=sql.Identifier(parent_key(conn, p, name)), org=org, t=sql.Identifier(p.schema_, name),
                joins=sql.SQL(" ").join(joins))
        return done[name]

    org, joins = org_of(table, "x")
    return sql.SQL("WITH {ctes} SELECT count(*) FROM {t} x {joins} LEFT JOIN orgmap x_tenant ON x_tenant.org_id = "
                   "{org} WHERE x.{c} IS DISTINCT FROM COALESCE(x_tenant.tenant_id, {system})").format(
        ctes=sql.SQL(", ").join(sql.SQL("{} AS MATERIALIZED ({})").format(sql.Identifier(n), q)
                                for n, q in ctes.items()),
        t=sql.Identifier(p.schema_, table), joins=sql.SQL(" ").join(joins), org=org,
        c=sql.Identifier(TENANT_COLUMN), system=sql.Literal(int(system_id)))


def mapped_assignment(conn: Connection, p, table: str, system_id: int | sql.Composable) -> Assignment:
    """The tenant of the parent row (filled before its children), else of the row's own org, else the
    System Tenant. Pending: NULL; a child whose parent has another tenant (whoever wrote it: a child
    follows its parent); a row on the System Tenant whose org maps elsewhere: the fast default's, and one the
    application inserted under an org that had no tenant yet (an org created during the window before the signup
    triggers existed: seed gives it its tenant, the batches then move its rows; validate expects them there too).
    `system_id` may be a placeholder in a plan made before seed."""
    spec = p.core_tables[table]
    me = sql.Identifier(ROW)  # the batches alias the table (or the leaf partition) they update so
    col = sql.Identifier(TENANT_COLUMN)
    system = system_id if isinstance(system_id, sql.Composable) else sql.Literal(int(system_id))
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
    if parent_tenant is None:
        pending = sql.SQL("({col} IS NULL OR ({moved}))").format(col=col, moved=moved)
    else:
        pending = sql.SQL("({col} IS NULL OR {col} IS DISTINCT FROM coalesce({pt}, {col}) OR ({pt} IS NULL AND "
                          "{moved}))").format(col=col, pt=parent_tenant, moved=moved)
    return Assignment(value, pending, alias=ROW)


def rows_to_map(conn: Connection, p, table: str) -> int:
    """Rows of a mapped table whose org is a real tenant (planning, before the column or mapping exists)."""
    row = sql.Identifier(p.schema_, table)
    query = sql.SQL("SELECT count(*) FROM {t} WHERE {eff} IS NOT NULL").format(
        t=row, eff=effective_org(conn, p, table, row))
    return int(conn.exec_driver_sql(render(conn, query)).scalar())


def rows_not_where_their_org_says(conn: Connection, p, table: str, system_id: int) -> int:
    """Rows whose tenant_id is not (yet) the one the legacy data implies, their parents' included: what a
    backfill still has to move, before any of this run's batches."""
    row = sql.Identifier(p.schema_, table)
    target = tenant_of_org(p, effective_org(conn, p, table, row), system_id)
    query = sql.SQL("SELECT count(*) FROM {t} WHERE {c} IS DISTINCT FROM {target}").format(
        t=row, c=sql.Identifier(TENANT_COLUMN), target=target)
    return int(conn.exec_driver_sql(render(conn, query)).scalar())
