"""Row level security: fail-closed policies, the application role, and setting the tenant safely.

Every tenant table gets ENABLE and FORCE ROW LEVEL SECURITY and one policy per command, all built on

    tenant_id = NULLIF(current_setting('<setting>', true), '')::bigint

`current_setting(…, true)` is NULL when the setting was never set and '' once a SET LOCAL of it has been
reverted; NULLIF turns '' into NULL; `tenant_id = NULL` is never true. So a session that forgot the
tenant sees no rows and can write none: the policy fails closed, with no cast error. Policies apply TO
PUBLIC, so every role without BYPASSRLS (the table owner included, thanks to FORCE) is isolated.

Policies are created before RLS is enabled, so there is no moment with RLS on and no policy. Enabling
RLS is the moment the application must set the tenant (set_tenant below). The legacy application, which
cannot yet, connects as `rls.legacy_role`, whose contract `rls.legacy_access` declares: every tenant's
rows (`all_tenants`: it is the trusted application that owns every org's data until it becomes
tenant-aware; the lint records that as accepted, with `rls.legacy_reason`) or the System Tenant's only.
Either is one more permissive policy per table, `tenant_legacy_access ... TO <legacy role>`: no role
setting (which would reach new sessions only, and every database on the server), so sessions the legacy
application opened before RLS was enabled keep working, and rollback removes it with the others.
"""

from __future__ import annotations

import operator
import re
import weakref
from typing import Any

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..db import catalog, partitions, roles
from ..db.ddl import ACCESS_EXCLUSIVE_META, NEW_OBJECT, PRIVILEGES_ONLY, UNDO_PHASE, Lock, Step
from ..db.names import TENANT_COLUMN, truncate

PHASE = "constrain"
COMMANDS = ("select", "insert", "update", "delete")
TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


def tenant_expression(setting: str) -> sql.Composed:
    return sql.SQL("{} = NULLIF(current_setting({}, true), '')::bigint").format(
        sql.Identifier(TENANT_COLUMN), sql.Literal(setting))


LEGACY_POLICY = "tenant_legacy_access"


def policy_name(command: str) -> str:
    return truncate(f"tenant_isolation_{command}")


def is_runbook_policy(name: str) -> bool:
    return name.startswith("tenant_isolation_") or name == LEGACY_POLICY


def legacy_policy_statement(st_qualified: sql.Composable, role: str, access: str,
                            system_tenant: sql.Composable) -> sql.Composed:
    """The legacy role's contract as a policy: every row, or the System Tenant's rows only."""
    expr = sql.SQL("true") if access == "all_tenants" else sql.SQL("{} = {}").format(
        sql.Identifier(TENANT_COLUMN), system_tenant)
    return sql.SQL("CREATE POLICY {} ON {} AS PERMISSIVE FOR ALL TO {} USING ({}) WITH CHECK ({})").format(
        sql.Identifier(LEGACY_POLICY), st_qualified, sql.Identifier(role), expr, expr)


def policy_statement(st_qualified: sql.Composable, command: str, setting: str) -> sql.Composed:
    expr = tenant_expression(setting)
    name = sql.Identifier(policy_name(command))
    if command == "insert":
        body = sql.SQL("WITH CHECK ({})").format(expr)
    elif command == "update":
        body = sql.SQL("USING ({}) WITH CHECK ({})").format(expr, expr)
    else:
        body = sql.SQL("USING ({})").format(expr)
    return sql.SQL("CREATE POLICY {} ON {} AS PERMISSIVE FOR {} TO PUBLIC {}").format(
        name, st_qualified, sql.SQL(command.upper()), body)


POLICIES_SQL = text("""
SELECT p.polname, p.polcmd, p.polpermissive,
       pg_get_expr(p.polqual, p.polrelid) AS using_expr,
       pg_get_expr(p.polwithcheck, p.polrelid) AS check_expr,
       (SELECT array_agg(CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r) END) FROM unnest(p.polroles) r) AS roles
FROM pg_policy p WHERE p.polrelid = :oid ORDER BY p.polname
""")


def policies(conn: Connection, oid: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(POLICIES_SQL, {"oid": oid}).mappings()]


def table_steps(st, setting: str, existing: list[dict[str, Any]], views: list[str],
                legacy: tuple[str, str, sql.Composable] | None = None) -> list[Step]:
    """Policies first (inert while RLS is off), then ENABLE and FORCE, then views made security_invoker.
    `legacy`: (role, access, System Tenant id) of the legacy application's contract."""
    steps: list[Step] = []
    names = {p["polname"] for p in existing}
    for command in COMMANDS:
        if policy_name(command) not in names:
            steps.append(Step(PHASE, st.name, f"create the {command.upper()} tenant policy",
                              policy_statement(st.qualified, command, setting), ACCESS_EXCLUSIVE_META,
                              "catalog change only; inert until row level security is enabled"))
    if legacy is not None and LEGACY_POLICY not in names:
        role, access, system = legacy
        seen = "every tenant's rows" if access == "all_tenants" else "the System Tenant's rows"
        steps.append(Step(PHASE, st.name, f"let the legacy role {role} see {seen}",
                          legacy_policy_statement(st.qualified, role, access, system), ACCESS_EXCLUSIVE_META,
                          "catalog change only; the legacy application keeps working, in sessions opened before "
                          "and after row level security alike"))
    if not st.rls_enabled:
        steps.append(Step(PHASE, st.name, "enable row level security",
                          sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(st.qualified),
                          ACCESS_EXCLUSIVE_META, "catalog change only; from now on sessions must set the tenant"))
    if not st.rls_forced:
        steps.append(Step(PHASE, st.name, "force row level security on the table owner too",
                          sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(st.qualified),
                          ACCESS_EXCLUSIVE_META, "catalog change only; the owner no longer bypasses the policies"))
    for view in views:
        steps.append(Step(PHASE, st.name, f"make view {view} security_invoker",
                          sql.SQL("ALTER VIEW {} SET (security_invoker = true)").format(sql.SQL(view)),
                          view_lock(view),
                          "catalog change only; the view now applies the caller's policies instead of its owner's"))
    return steps


def view_lock(view: str) -> Lock:
    """ALTER VIEW: ACCESS EXCLUSIVE on the view (`view` as the catalog lists it, maybe schema-qualified)."""
    return Lock(((view.split(".")[-1].strip('"'), "ACCESS EXCLUSIVE"),), brief=True)


ROLE_SQL = text("""
SELECT rolname, rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = :name
""")


GRANTED_SQL = text("""
SELECT has_schema_privilege(:role, :schema, 'USAGE') AS schema_usage,
       (SELECT coalesce(bool_and(has_table_privilege(:role, c.oid, 'SELECT, INSERT, UPDATE, DELETE')
                                 AND has_table_privilege(:role, c.oid, 'SELECT')
                                 AND has_table_privilege(:role, c.oid, 'INSERT')
                                 AND has_table_privilege(:role, c.oid, 'UPDATE')
                                 AND has_table_privilege(:role, c.oid, 'DELETE')), true)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = :schema AND c.relname = ANY(:tables)) AS tables_ok,
       (SELECT coalesce(bool_and(has_table_privilege(:role, c.oid, 'SELECT')), true)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = :schema AND c.relname = ANY(:shared)) AS shared_ok,
       (SELECT coalesce(bool_and(has_sequence_privilege(:role, c.oid, 'USAGE')), true)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = :schema AND c.relkind = 'S') AS sequences_ok
""")


def role_steps(conn: Connection, schema: str, role: str, tables: list[str], shared: list[str],
               legacy_role: str | None) -> tuple[list[Step], list[Step]]:
    """Create the application role (and the legacy one) if missing, and grant what they lack: read and
    write on tenant tables, read on shared ones, the schema and its sequences. Nothing when all is there.
    Returns (creations, grants): the grants go last, once every table's policies are in force (steps)."""
    steps: list[Step] = []
    creations: list[Step] = []
    for name in (role, legacy_role):
        if not name:
            continue
        exists = conn.execute(ROLE_SQL, {"name": name}).first() is not None
        if not exists:
            # roles belong to the whole server: another database's migration may create the same role at the same
            # moment. ROLES_LOCK serializes this database's sessions; the other database's creation is caught
            # (duplicate_object, or unique_violation when both found it missing), and the role is verified next
            creations.append(Step(PHASE, None, f"create role {name}", sql.SQL(
                "DO $$ BEGIN PERFORM pg_advisory_xact_lock({lock}); CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS "
                "NOCREATEDB NOCREATEROLE; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$").format(
                    lock=sql.Literal(roles.ROLES_LOCK), role=sql.Identifier(name)), NEW_OBJECT,
                "a new role without login: the application team gives it a login and password"))
            granted = {"schema_usage": False, "tables_ok": False, "shared_ok": False, "sequences_ok": False}
        else:
            granted = dict(conn.execute(GRANTED_SQL, {"role": name, "schema": schema, "tables": tables,
                                                      "shared": shared}).mappings().one())
        who = sql.Identifier(name)
        if not granted["schema_usage"]:
            steps.append(Step(PHASE, None, f"grant {name} usage on schema {schema}",
                              sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), who),
                              PRIVILEGES_ONLY, "locks no table"))
        if not granted["tables_ok"]:
            steps.append(Step(PHASE, None, f"grant {name} {TABLE_PRIVILEGES} on the tenant tables",
                              sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(TABLE_PRIVILEGES), sql.SQL(", ").join(
                                  sql.Identifier(schema, t) for t in tables), who),
                              PRIVILEGES_ONLY, "no TRUNCATE, no REFERENCES: both would sidestep the policies"))
        if shared and not granted["shared_ok"]:
            steps.append(Step(PHASE, None, f"grant {name} SELECT on the shared tables",
                              sql.SQL("GRANT SELECT ON {} TO {}").format(sql.SQL(", ").join(
                                  sql.Identifier(schema, t) for t in shared), who),
                              PRIVILEGES_ONLY, "shared tables are read by every tenant"))
        if not granted["sequences_ok"]:
            steps.append(Step(PHASE, None, f"grant {name} usage on the schema's sequences",
                              sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(sql.Identifier(schema), who),
                              PRIVILEGES_ONLY, "inserts draw serial ids"))
    return creations, steps


VIEWS_SQL = text("""
SELECT DISTINCT c.relname AS table, v.oid::regclass::text AS view
FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE d.classid = 'pg_rewrite'::regclass AND n.nspname = :schema AND c.relname = ANY(:tables) AND v.oid <> c.oid
  AND v.relkind = 'v'
  AND coalesce((SELECT option_value FROM pg_options_to_table(v.reloptions) WHERE option_name = 'security_invoker'),
               'false') NOT IN ('true', 'on', '1')
ORDER BY 1, 2
""")


def views_to_invoke(conn: Connection, schema: str, tables: list[str]) -> dict[str, list[str]]:
    """Views over tenant tables not yet security_invoker (PostgreSQL 15+ has the option), per table."""
    if conn.execute(text("SELECT current_setting('server_version_num')::int")).scalar() < 150000:
        return {}
    out: dict[str, list[str]] = {}
    for row in conn.execute(VIEWS_SQL, {"schema": schema, "tables": tables}).mappings():
        if row["view"] not in {v for views in out.values() for v in views}:
            out.setdefault(row["table"], []).append(row["view"])
    return out


INVOKER_VIEWS_SQL = text("""
SELECT DISTINCT v.oid::regclass::text AS view,
       coalesce((SELECT option_value FROM pg_options_to_table(v.reloptions) WHERE option_name = 'security_invoker'),
                'false') IN ('true', 'on', '1') AS invoker,
       (SELECT rolname FROM pg_roles WHERE rolname = :role) IS NOT NULL
         AND has_table_privilege(:role, v.oid, 'SELECT') AS granted
FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE d.classid = 'pg_rewrite'::regclass AND n.nspname = :schema AND c.relname = ANY(:tables) AND v.oid <> c.oid
  AND v.relkind = 'v'
ORDER BY 1
""")
VIEW_GRANT = re.compile(r"^grant (\S+) SELECT on view (\S+)$")


def view_grant_steps(conn: Connection, schema: str, role: str, tables: list[str],
                     becoming_invoker: list[str]) -> list[Step]:
    """SELECT for the application role on the views over tenant tables that are (or this plan makes)
    security_invoker: they apply the caller's policies, so the grant shows each tenant its own rows. A view that
    stays with its owner's rights (PostgreSQL before 15) gets none: through it the role would see every tenant."""
    out = []
    for row in conn.execute(INVOKER_VIEWS_SQL, {"schema": schema, "tables": tables, "role": role}).mappings():
        if row["granted"] or not (row["invoker"] or row["view"] in becoming_invoker):
            continue
        out.append(Step(PHASE, None, f"grant {role} SELECT on view {row['view']}",
                        sql.SQL("GRANT SELECT ON {} TO {}").format(sql.SQL(row["view"]), sql.Identifier(role)),
                        PRIVILEGES_ONLY, "the view is security_invoker: the role sees its tenant's rows only"))
    return out


def view_grant_undo_steps(conn: Connection, journal_actions: list[str]) -> list[Step]:
    """REVOKE what view_grant_steps granted (the statement journal's applied actions say which), where the
    view still holds that grant."""
    out = []
    for action in dict.fromkeys(journal_actions):
        found = VIEW_GRANT.match(action)
        if found:
            role, view = found.groups()
            grantors = conn.execute(text(
                "SELECT DISTINCT pg_get_userbyid(a.grantor) FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a "
                "JOIN pg_roles r ON r.oid = a.grantee WHERE c.oid = to_regclass(:v) AND r.rolname = :r "
                "AND a.privilege_type = 'SELECT' ORDER BY 1"), {"v": view, "r": role}).scalars().all()
            if not grantors:
                continue
            held = [{"kind": "view", "name": view, "grantor": g, "privileges": ["SELECT"]} for g in grantors]
            out.append(Step(UNDO_PHASE, None, f"revoke {role}'s SELECT on view {view}",
                            revoke_as_grantors(conn, None, held, role),
                            PRIVILEGES_ONLY, "the runbook granted it; the view goes back to before"))
    return out


def steps(rb, conn: Connection) -> list[Step]:
    """Everything row level security needs that the catalog does not show yet."""
    p = rb.params
    # the roles first, their grants last: a role granted a table before its policies are in force reads every
    # tenant's rows until they are (the step harness checks the application role between any two steps)
    out, grants = role_steps(conn, rb.schema, p.rls.app_role, p.tables, p.shared_tables, p.rls.legacy_role)
    views = views_to_invoke(conn, rb.schema, p.tables)
    tenants_oid = catalog.relation_oid(conn, rb.schema, "tenants")
    system = catalog.system_tenant_id(conn, rb.schema, p.system_tenant.uuid)
    legacy = (p.rls.legacy_role, p.rls.legacy_access, sql.SQL("<System Tenant id>") if system is None
              else sql.Literal(int(system))) if p.rls.legacy_role else None
    for name, st in catalog.table_states(conn, rb.schema, p.tables, tenants_oid).items():
        out += table_steps(st, p.rls.setting, policies(conn, st.oid) if st.oid else [], views.get(name, []), legacy)
        for part in partitions.tree(conn, st, tenants_oid):  # see partition_states
            out += table_steps(part.state, p.rls.setting, policies(conn, part.state.oid), [], legacy)
    out += grants
    if conn.execute(text("SELECT current_setting('server_version_num')::int")).scalar() >= 150000:
        out += view_grant_steps(conn, rb.schema, p.rls.app_role, p.tables,
                                [v for names in views.values() for v in names])
    return out


def partition_states(conn: Connection, states: dict) -> dict:
    """The core tables and every partition of the partitioned ones.

    A query that names a partition directly is checked against the partition's own policies, not its
    parent's: PostgreSQL applies a partitioned table's policies only to queries of the parent. So each
    partition gets the same policies, ENABLE and FORCE as its parent, and a tenant reading a partition
    directly sees only its own rows (the application role is granted nothing on partitions besides: a
    direct query is refused outright unless someone grants it). Partitions created or attached later get
    theirs when 04_constrain is re-run; until then the missing grant keeps the application role out."""
    out = dict(states)
    for st in states.values():
        for part in partitions.tree(conn, st):
            out[part.name] = part.state
    return out


# every privilege the role holds on the spec tables, the schema's sequences and the schema, with its grantor
GRANTS_HELD_SQL = text("""
SELECT CASE c.relkind WHEN 'S' THEN 'sequence' ELSE 'table' END AS kind, c.relname AS name,
       pg_get_userbyid(a.grantor) AS grantor, array_agg(a.privilege_type ORDER BY a.privilege_type) AS privileges
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace CROSS JOIN LATERAL aclexplode(c.relacl) a
WHERE n.nspname = :s AND (c.relname = ANY(:t) OR c.relkind = 'S')
  AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :r)
GROUP BY 1, 2, 3
UNION ALL
SELECT 'schema', n.nspname, pg_get_userbyid(a.grantor), array_agg(a.privilege_type ORDER BY a.privilege_type)
FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a
WHERE n.nspname = :s AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :r)
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3
""")
PRIVILEGE_NAMES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN",
                             "USAGE", "CREATE"})


def revoke_as_grantors(conn: Connection, schema: str | None, held, role: str) -> sql.Composable | None:
    """REVOKE each privilege as the role that granted it. A REVOKE removes only the grants its grantor made,
    and PostgreSQL picks that grantor itself: the owner for a superuser or a member of the owner role revoking
    ALL, the migration role where it holds the grant option itself (its GRANT USAGE on the owner's sequences).
    So each grant goes as the exact privileges it gave, under SET LOCAL ROLE to its grantor (the migration role
    may act as itself and as the owner role; a superuser as anyone). None: nothing held."""
    me = conn.execute(text("SELECT current_user")).scalar()
    parts: list[sql.Composable] = []
    for grant in held:
        privileges = [p for p in grant["privileges"] if p in PRIVILEGE_NAMES]
        if not privileges:
            continue
        if grant["grantor"] != me:
            parts.append(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(grant["grantor"])))
        target = {"schema": lambda: sql.SQL("SCHEMA {}").format(sql.Identifier(grant["name"])),
                  "sequence": lambda: sql.SQL("SEQUENCE {}").format(sql.Identifier(schema, grant["name"])),
                  "table": lambda: sql.SQL("TABLE {}").format(sql.Identifier(schema, grant["name"])),
                  "view": lambda: sql.SQL("TABLE {}").format(sql.SQL(grant["name"]))}[grant["kind"]]()  # regclass text
        parts.append(sql.SQL("REVOKE {} ON {} FROM {}").format(sql.SQL(", ").join(map(sql.SQL, privileges)), target,
                                                            sql.Identifier(role)))
        if grant["grantor"] != me:
            parts.append(sql.SQL("RESET ROLE"))
    return sql.SQL("; ").join(parts) if parts else None


def undo_steps(conn: Connection, schema: str, states: dict, views_before: dict[str, list[str]],
               granted_roles: list[str], tables: list[str]) -> list[Step]:
    """Back to before: what the runbook granted to roles that held nothing before revoked (the roles themselves
    stay: roles belong to the whole server), then per table RLS off, FORCE off and the runbook's policies dropped,
    then views back to their recorded options. `tables`: the spec's core and shared tables.

    The order is the application's: the application role loses the tables before their policies go (refused,
    never shown another tenant's rows), and a table's RLS is off before its policies go: forced RLS without the
    legacy role's policy shows the legacy application no row and refuses its inserts (42501)."""
    out = revoke_steps(conn, schema, granted_roles, tables)
    for name, st in partition_states(conn, states).items():
        if st.rls_enabled:
            out.append(Step(UNDO_PHASE, name, "disable row level security",
                            sql.SQL("ALTER TABLE {} DISABLE ROW LEVEL SECURITY").format(st.qualified),
                            ACCESS_EXCLUSIVE_META, "catalog change only; its policies no longer apply"))
        if st.rls_forced:
            out.append(Step(UNDO_PHASE, name, "stop forcing row level security",
                            sql.SQL("ALTER TABLE {} NO FORCE ROW LEVEL SECURITY").format(st.qualified),
                            ACCESS_EXCLUSIVE_META, "catalog change only"))
        for pol in policies(conn, st.oid) if st.oid else []:
            if is_runbook_policy(pol["polname"]):
                out.append(Step(UNDO_PHASE, name, f"drop policy {pol['polname']}", sql.SQL("DROP POLICY {} ON {}").format(
                    sql.Identifier(pol["polname"]), st.qualified), ACCESS_EXCLUSIVE_META,
                    "catalog change only; row level security is off on the table already"))
    for view, options_before in views_before.items():
        options = conn.execute(text("SELECT reloptions FROM pg_class WHERE oid = to_regclass(:v)"), {"v": view}).scalar()
        had = [o for o in options_before if o.startswith("security_invoker")]
        has = [o for o in (options or []) if o.startswith("security_invoker")]
        if has and not had:
            out.append(Step(UNDO_PHASE, None, f"reset security_invoker on view {view}",
                            sql.SQL("ALTER VIEW {} RESET (security_invoker)").format(sql.SQL(view)),
                            view_lock(view), "catalog change only"))
    return out


def revoke_steps(conn: Connection, schema: str, granted_roles: list[str], tables: list[str]) -> list[Step]:
    """REVOKE what the runbook granted to roles that held nothing before."""
    out: list[Step] = []
    for role in granted_roles:
        targets = [t for t in tables if catalog.relation_oid(conn, schema, t) is not None]
        if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is None:
            continue
        held = conn.execute(GRANTS_HELD_SQL, {"r": role, "s": schema, "t": targets}).mappings().all()
        if not held:
            continue
        revokes = ((f"revoke what {role} was granted", [g for g in held if g["kind"] == "table"],
                    "the role itself stays: roles belong to the whole server"),
                   (f"revoke {role}'s usage of the schema and its sequences",
                    [g for g in held if g["kind"] != "table"], "locks no table"))
        for action, grants, why in revokes:
            statement = revoke_as_grantors(conn, schema, grants, role)
            if statement is not None:
                out.append(Step(UNDO_PHASE, None, action, statement, PRIVILEGES_ONLY, why))
    return out


def role_problems(conn: Connection, schema: str, role: str, tables: list[str]) -> list[str]:
    """What is wrong with the application role: superuser, BYPASSRLS, owner, TRUNCATE or REFERENCES."""
    row = conn.execute(ROLE_SQL, {"name": role}).mappings().first()
    if row is None:
        return [f"role {role} does not exist"]
    problems = []
    if row["rolsuper"]:
        problems.append(f"{role} is a superuser (superusers bypass row level security)")
    if row["rolbypassrls"]:
        problems.append(f"{role} has BYPASSRLS")
    for table in tables:
        owner, truncate_, references = conn.execute(text(
            "SELECT pg_get_userbyid(c.relowner) = :role, has_table_privilege(:role, c.oid, 'TRUNCATE'), "
            "has_table_privilege(:role, c.oid, 'REFERENCES') FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace WHERE n.nspname = :schema AND c.relname = :table"),
            {"role": role, "schema": schema, "table": table}).one()
        if owner:
            problems.append(f"{role} owns {table} (owners can disable row level security)")
        if truncate_:
            problems.append(f"{role} may TRUNCATE {table} (TRUNCATE ignores row level security)")
        if references:
            problems.append(f"{role} has REFERENCES on {table}")
    return problems


CITUS_SQL = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')"
_CITUS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # psycopg connection -> has Citus


def _driver_connection(conn):
    """The psycopg connection under a SQLAlchemy Connection (or the psycopg connection itself)."""
    if hasattr(conn, "exec_driver_sql"):
        return conn.connection.dbapi_connection
    return conn


def has_citus(conn) -> bool:
    """Whether the server the connection talks to has the Citus extension (pg_extension), asked once per
    connection and remembered for its lifetime (a connection opened before CREATE EXTENSION citus keeps the
    plain form: reconnect the application's pools after installing Citus)."""
    driver = _driver_connection(conn)
    known = _CITUS.get(driver)
    if known is None:
        known = bool((conn.exec_driver_sql(CITUS_SQL).scalar() if hasattr(conn, "exec_driver_sql")
                      else conn.execute(CITUS_SQL).fetchone()[0]))
        _CITUS[driver] = known
    return known


def tenant_setting_statements(setting: str, value: str, citus: bool) -> list[sql.Composed]:
    """SET LOCAL <setting> = '<value>' for the current transaction, the value quoted as a literal by the driver
    (SET takes no bound parameter). On Citus it is preceded by SET LOCAL citus.propagate_set_commands = 'local',
    which makes the coordinator send the transaction's SET LOCALs to the workers: a set_config(…, true) stays on
    the coordinator, and the shards' policies then see no tenant (0 rows, no insert of its own). On plain
    PostgreSQL the citus.* name is an unknown placeholder setting, so the same statements would also run there;
    they are sent only where the catalog shows Citus (has_citus)."""
    name = sql.SQL(".").join(sql.Identifier(part) for part in setting.split("."))
    statements = [sql.SQL("SET LOCAL {} = {}").format(name, sql.Literal(str(value)))]
    if citus:
        statements.insert(0, sql.SQL("SET LOCAL citus.propagate_set_commands = 'local'"))
    return statements


BIGINT = (-(2 ** 63), 2 ** 63 - 1)


def tenant_value(tenant_id) -> str:
    """The tenant id as the text the setting holds: an integer in bigint's range (an int, or a string of digits),
    '' for None (no tenant: the policies fail closed). Anything else raises ValueError before anything is sent."""
    if tenant_id is None:
        return ""
    if isinstance(tenant_id, str) and re.fullmatch(r"-?[0-9]{1,19}", tenant_id.strip()):
        number = int(tenant_id)
    elif isinstance(tenant_id, bool):
        raise ValueError(f"a tenant id is an integer, not {tenant_id!r}")
    else:
        try:
            number = operator.index(tenant_id)
        except TypeError:
            raise ValueError(f"a tenant id is an integer, not {tenant_id!r}") from None
    if not BIGINT[0] <= number <= BIGINT[1]:
        raise ValueError(f"a tenant id is a bigint, {number} is out of range")
    return str(number)


def set_tenant(conn, tenant_id: int | None, setting: str = "app.current_tenant_id") -> None:
    """Set the tenant for the current transaction only, in the form that also reaches Citus workers.

    Sends `SET LOCAL app.current_tenant_id = '<id>'`, preceded on a server with Citus by
    `SET LOCAL citus.propagate_set_commands = 'local'`. The id is checked to be an integer and quoted as a
    literal through psycopg.sql.Literal (SET cannot take a bound parameter), never spliced as text.
    `conn` is a psycopg or SQLAlchemy connection inside a transaction; None clears the tenant.
    """
    value = tenant_value(tenant_id)
    for statement in tenant_setting_statements(setting, value, has_citus(conn)):
        if hasattr(conn, "exec_driver_sql"):  # SQLAlchemy: through its connection, so it sees the transaction
            conn.exec_driver_sql(statement.as_string(_driver_connection(conn)))
        else:
            conn.execute(statement)
