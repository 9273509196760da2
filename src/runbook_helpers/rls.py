"""Row level security: fail-closed policies, the application role, and setting the tenant safely.

Every tenant table gets ENABLE and FORCE ROW LEVEL SECURITY and one policy per command, all built on

    tenant_id = NULLIF(current_setting('<setting>', true), '')::bigint

`current_setting(…, true)` is NULL when the setting was never set and '' once a SET LOCAL of it has been
reverted; NULLIF turns '' into NULL; `tenant_id = NULL` is never true. So a session that forgot the
tenant sees no rows and can write none: the policy fails closed, with no cast error. Policies apply TO
PUBLIC, so every role without BYPASSRLS (the table owner included, thanks to FORCE) is isolated.

Policies are created before RLS is enabled, so there is no moment with RLS on and no policy. Enabling
RLS is the moment the application must set the tenant (set_tenant below); a legacy role that cannot yet
do so gets the System Tenant as its default (rls.legacy_role), and keeps working.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from .ddl import ACCESS_EXCLUSIVE_META, NEW_OBJECT, Step
from .names import TENANT_COLUMN, truncate

PHASE = "constrain"
COMMANDS = ("select", "insert", "update", "delete")
TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


def tenant_expression(setting: str) -> sql.Composed:
    return sql.SQL("{} = NULLIF(current_setting({}, true), '')::bigint").format(
        sql.Identifier(TENANT_COLUMN), sql.Literal(setting))


def policy_name(command: str) -> str:
    return truncate(f"tenant_isolation_{command}")


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


def table_steps(st, setting: str, existing: list[dict[str, Any]], views: list[str]) -> list[Step]:
    """Policies first (inert while RLS is off), then ENABLE and FORCE, then views made security_invoker."""
    steps: list[Step] = []
    names = {p["polname"] for p in existing}
    for command in COMMANDS:
        if policy_name(command) not in names:
            steps.append(Step(PHASE, st.name, f"create the {command.upper()} tenant policy",
                              policy_statement(st.qualified, command, setting), ACCESS_EXCLUSIVE_META,
                              "catalog change only; inert until row level security is enabled"))
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
                          ACCESS_EXCLUSIVE_META,
                          "catalog change only; the view now applies the caller's policies instead of its owner's"))
    return steps


ROLE_SQL = text("""
SELECT rolname, rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = :name
""")


def role_steps(conn: Connection, schema: str, role: str, tables: list[str], shared: list[str],
               legacy_role: str | None, setting: str, system_tenant_id: int | None) -> list[Step]:
    """Create the application role (and the legacy one) if missing, and grant exactly what they need."""
    steps: list[Step] = []
    for name, legacy in ((role, False), (legacy_role, True)):
        if not name:
            continue
        if conn.execute(ROLE_SQL, {"name": name}).first() is None:
            steps.append(Step(PHASE, None, f"create role {name}",
                              sql.SQL("CREATE ROLE {} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE").format(
                                  sql.Identifier(name)), NEW_OBJECT,
                              "a new role without login: the application team gives it a login and password"))
        grants = [(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(name)),
                   f"usage on schema {schema}")]
        for table in tables:
            grants.append((sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(TABLE_PRIVILEGES), sql.Identifier(schema, table),
                                                               sql.Identifier(name)), f"{TABLE_PRIVILEGES} on {table}"))
        for table in shared + ["tenants"]:
            grants.append((sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(schema, table), sql.Identifier(name)),
                           f"SELECT on {table}"))
        grants.append((sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
            sql.Identifier(schema), sql.Identifier(name)), "usage on the schema's sequences (serial ids)"))
        for statement, what in grants:
            steps.append(Step(PHASE, None, f"grant {name} {what}", statement, "none (privileges only)",
                              "GRANT is idempotent and locks no table"))
        if legacy and system_tenant_id is not None:
            steps.append(Step(PHASE, None, f"default {name} to the System Tenant",
                              sql.SQL("ALTER ROLE {} SET {} = {}").format(sql.Identifier(name), sql.SQL(setting),
                                                                          sql.Literal(str(system_tenant_id))),
                              "none (role setting for new sessions)",
                              "the legacy application keeps working, scoped to the System Tenant, until it sets "
                              "the tenant itself"))
    return steps


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


def set_tenant(conn, tenant_id: int | None, setting: str = "app.current_tenant_id") -> None:
    """Set the tenant for the current transaction only (set_config(…, true)), the value bound, never spliced.

    `conn` is a psycopg or SQLAlchemy connection inside a transaction; None clears the tenant.
    """
    value = "" if tenant_id is None else str(int(tenant_id))
    if hasattr(conn, "exec_driver_sql"):
        conn.exec_driver_sql("SELECT set_config(%s, %s, true)", (setting, value))
    else:
        conn.execute("SELECT set_config(%s, %s, true)", (setting, value))
