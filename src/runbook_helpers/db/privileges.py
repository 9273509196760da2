"""What the migration role may do, read from the catalog before anything changes.

A role that is not a superuser must hold every privilege the plan will use, or a phase fails half-way (an
index build refused after seed and backfill changed the database, validate refused after everything was
applied). `missing(conn, needs)` checks all of them at once and returns one entry per missing privilege with
the statement that grants it; the README's "A minimal migration role" grants exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from .sqltext import render


@dataclass
class Needs:
    """What the plan will do, in privilege terms (phases/privileges.py derives it from params and the catalog)."""
    schema: str
    ledger_schema: str
    alter: list[str]                                   # core tables: ALTER TABLE (with their partitions)
    alter_views: bool = False                          # ALTER VIEW … security_invoker on the views over them
    read: list[str] = field(default_factory=list)      # tables only read (shared tables, the tenant source)
    grant_read: list[str] = field(default_factory=list)  # tables whose SELECT is granted on to the app role
    triggers_on: list[str] = field(default_factory=list)  # tables besides the core tables that seed puts
                                                          # triggers on and finalize drops them from (the tenant source's)
    tenancy_tables: list[str] = field(default_factory=list)  # tenants / users / user_tenants that exist already
    act_as: list[str] = field(default_factory=list)    # roles the isolation suite SETs (they must exist or be made)
    create_roles: list[str] = field(default_factory=list)  # roles that must exist or be made (no SET ROLE)
    bypass_rls: bool = False
    drizzle_table: tuple[str, str] | None = None       # (schema, table) validate records migrations in


@dataclass
class Missing:
    privilege: str   # what the role lacks
    detail: str      # what it is needed for, with the objects concerned
    grant: str       # the statement (run as a superuser) that fixes it
    role: str | None = None  # the role it concerns, where one does


ROLE_SQL = text("""
SELECT rolname, rolsuper, rolbypassrls, rolcreaterole, current_setting('server_version_num')::int AS version,
       current_database() AS database
FROM pg_roles WHERE rolname = current_user
""")

# every relation the ALTER statements touch: the core tables, their partitions, and (alter_views) the views
# over them; with each one's owner and whether the current role has its owner's privileges
OWNED_SQL = text("""
SELECT DISTINCT o.oid::regclass::text AS relation, o.relkind, pg_get_userbyid(o.relowner) AS owner,
       ro.rolsuper AS owner_is_superuser, pg_has_role(current_user, o.relowner, 'USAGE') AS owns
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (SELECT c.oid UNION SELECT relid FROM pg_partition_tree(c.oid)
                    UNION SELECT r.ev_class FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                    WHERE :views AND d.refobjid = c.oid AND r.ev_class <> c.oid) t
JOIN pg_class o ON o.oid = t.oid JOIN pg_roles ro ON ro.oid = o.relowner
WHERE n.nspname = :schema AND c.relname = ANY(:tables) AND o.relkind IN ('r', 'p', 'v')
ORDER BY 1
""")

TABLE_PRIVILEGE_SQL = text("""
SELECT c.relname, has_table_privilege(c.oid, :privilege) AS held
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :schema AND c.relname = ANY(:tables) ORDER BY 1
""")


def _ident(conn: Connection, *names: str) -> str:
    return render(conn, sql.Identifier(*names))


def attributes(conn: Connection) -> dict:
    return dict(conn.execute(ROLE_SQL).mappings().one())


def missing(conn: Connection, needs: Needs) -> list[Missing]:
    """Every privilege in `needs` the current role lacks (none for a superuser), each with its GRANT."""
    role = attributes(conn)
    if role["rolsuper"]:
        return []
    me = _ident(conn, role["rolname"])
    out: list[Missing] = []
    out += _ledger(conn, needs, me, role["database"])
    out += _schema(conn, needs, me)
    out += _tenancy_tables(conn, needs, me)
    owned = _ownership(conn, needs, me, role["rolname"], needs.alter, "core tables",
                       "ALTER TABLE and ALTER VIEW need the owner's privileges", needs.alter_views)
    triggers = [t for t in needs.triggers_on if t not in needs.alter]
    owned += _ownership(conn, needs, me, role["rolname"], triggers, "tenant source's tables",
                        "02_seed creates its signup triggers on them, 06_finalize drops them: DROP TRIGGER needs the "
                        "owner's privileges") if triggers else []
    out += owned
    out += _table_privileges(conn, needs, me)
    if needs.bypass_rls and not role["rolbypassrls"]:
        out.append(Missing("BYPASSRLS", "counts and fingerprints must see every row once FORCE ROW LEVEL SECURITY "
                           "is on (rls.enabled)", f"ALTER ROLE {me} BYPASSRLS"))
    # an owner role whose membership is missing already has its row (its GRANT gives SET too)
    out += _roles(conn, needs, role, me, skip={m.role for m in owned})
    if not _has_privileges_of(conn, "pg_read_all_stats"):
        out.append(Missing("pg_read_all_stats", "other roles' query text and autovacuum's progress (the lock "
                           "ladder tells an anti-wraparound autovacuum from a plain one by it, the blocker reports "
                           "name what each session runs) and standbys' replay positions (the throttle)",
                           f"GRANT pg_read_all_stats TO {me}"))
    return out


def _has_privileges_of(conn: Connection, role: str) -> bool:
    return bool(conn.execute(text("SELECT pg_has_role(current_user, :r, 'USAGE')"), {"r": role}).scalar())


def _ledger(conn: Connection, needs: Needs, me: str, database: str) -> list[Missing]:
    ledger = needs.ledger_schema
    exists = conn.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": ledger}).first()
    if not exists:
        if conn.execute(text("SELECT has_database_privilege(current_database(), 'CREATE')")).scalar():
            return []
        return [Missing(f"CREATE on database {database}", f"creating the ledger schema {ledger}",
                        f"CREATE SCHEMA {_ident(conn, ledger)} AUTHORIZATION {me} (or GRANT CREATE ON DATABASE "
                        f"{_ident(conn, database)} TO {me})")]
    out = []
    if not conn.execute(text("SELECT has_schema_privilege(:s, 'USAGE') AND has_schema_privilege(:s, 'CREATE')"),
                        {"s": ledger}).scalar():
        out.append(Missing(f"USAGE, CREATE on schema {ledger}", "the ledger's tables and the rollout trigger functions",
                           f"GRANT USAGE, CREATE ON SCHEMA {_ident(conn, ledger)} TO {me}"))
    others = [r for r in conn.execute(text(
        "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = :s AND c.relkind IN ('r', 'p') AND NOT pg_has_role(current_user, c.relowner, 'USAGE') "
        "ORDER BY 1"), {"s": ledger})]
    if others:
        owners = sorted({o for _, o in others})
        out.append(Missing(f"ownership of the ledger's tables in {ledger}",
                           f"the ledger was created by {', '.join(owners)}: {', '.join(t for t, _ in others)}",
                           "; ".join(f"ALTER TABLE {_ident(conn, ledger, t)} OWNER TO {me}" for t, _ in others)))
    return out


def _schema(conn: Connection, needs: Needs, me: str) -> list[Missing]:
    """CREATE INDEX needs CREATE on the table's schema (not only ownership), and so do the tables seed creates."""
    lacking = [w for w in ("USAGE", "CREATE") if not conn.execute(text("SELECT has_schema_privilege(:s, :w)"),
                                                                  {"s": needs.schema, "w": w}).scalar()]
    if not lacking:
        return []
    return [Missing(f"{', '.join(lacking)} on schema {needs.schema}",
                    "CREATE INDEX (constrain's tenant_id indexes, composite keys) and the tables seed creates",
                    f"GRANT USAGE, CREATE ON SCHEMA {_ident(conn, needs.schema)} TO {me}")]


TENANCY_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "REFERENCES")


def _tenancy_tables(conn: Connection, needs: Needs, me: str) -> list[Missing]:
    """tenants, users and user_tenants that exist already (the application's own migration made them) are
    written by seed, referenced by every core table's foreign key, and cleaned by rollback."""
    out = []
    for table in needs.tenancy_tables:
        q = _ident(conn, needs.schema, table)
        lacking = [w for w in TENANCY_TABLE_PRIVILEGES
                   if not conn.execute(text("SELECT has_table_privilege(:t, :w)"), {"t": q, "w": w}).scalar()]
        if lacking:
            out.append(Missing(f"{', '.join(lacking)} on {table}", "seed writes it, the tenant_id foreign keys "
                               "reference tenants, rollback removes what seed added",
                               f"GRANT {', '.join(TENANCY_TABLE_PRIVILEGES)} ON {q} TO {me}"))
    return out


def _ownership(conn: Connection, needs: Needs, me: str, who: str, tables: list[str], what: str, why: str,
               views: bool = False) -> list[Missing]:
    """Membership in the owner of each of `tables` (their partitions, and with `views` the views over them)."""
    rows = conn.execute(OWNED_SQL, {"schema": needs.schema, "tables": tables, "views": views}).mappings().all()
    by_owner: dict[str, list] = {}
    for r in rows:
        if not r["owns"]:
            by_owner.setdefault(r["owner"], []).append(r)
    out = []
    for owner, rels in by_owner.items():
        names = ", ".join(f"{r['relation']}{' (view)' if r['relkind'] == 'v' else ''}" for r in rels)
        if rels[0]["owner_is_superuser"]:
            fix = (f"give them an owner role that is no superuser (ALTER TABLE … OWNER TO app_owner, see the README's "
                   f"\"A minimal migration role\"), then GRANT app_owner TO {me}")
        else:
            # INHERIT: ALTER TABLE as a member; SET: the isolation suite's negative control acts as the owner
            fix = f"GRANT {_ident(conn, owner)} TO {me}" + (" WITH INHERIT TRUE, SET TRUE" if _version(conn) >= 160000
                                                            else "")
        out.append(Missing(f"ownership of the {what} owned by {owner}",
                           f"{who} cannot alter: {names} (owner {owner}): {why}", fix, role=owner))
    return out


def _version(conn: Connection) -> int:
    return int(conn.execute(text("SELECT current_setting('server_version_num')::int")).scalar())


def _table_privileges(conn: Connection, needs: Needs, me: str) -> list[Missing]:
    out = []
    for privilege, tables, why in (("SELECT", needs.read, "reading the shared tables and the tenant source"),
                                   ("SELECT WITH GRANT OPTION", needs.grant_read,
                                    "granting the application role SELECT on the shared tables")):
        if not tables:
            continue
        lacking = [r[0] for r in conn.execute(TABLE_PRIVILEGE_SQL, {"schema": needs.schema, "tables": tables,
                                                                    "privilege": privilege}) if not r[1]]
        if lacking:
            out.append(Missing(f"{privilege} on {', '.join(lacking)}", why,
                               f"GRANT SELECT ON {', '.join(_ident(conn, needs.schema, t) for t in lacking)} TO {me}"
                               + (" WITH GRANT OPTION" if "GRANT" in privilege else "")))
    if needs.drizzle_table:
        schema, table = needs.drizzle_table
        oid = conn.execute(text("SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = :s AND c.relname = :t"), {"s": schema, "t": table}).scalar()
        if oid is not None and not conn.execute(text(
                "SELECT has_schema_privilege(:s, 'USAGE') AND has_table_privilege(:o, 'SELECT') "
                "AND has_table_privilege(:o, 'INSERT') AND has_table_privilege(:o, 'DELETE')"),
                {"s": schema, "o": oid}).scalar():
            s, q = _ident(conn, schema), _ident(conn, schema, table)
            out.append(Missing(f"SELECT, INSERT, DELETE on {schema}.{table}",
                               "validate records the migrations it produced (drizzle.record_after_validate), rollback "
                               "removes them", f"GRANT USAGE ON SCHEMA {s} TO {me}; GRANT SELECT, INSERT, DELETE ON "
                               f"{q} TO {me}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {me}"))
    return out


def _roles(conn: Connection, needs: Needs, role: dict, me: str, skip: set) -> list[Missing]:
    """The isolation suite runs as the application (and legacy) role: SET ROLE needs membership (16+: with
    SET). A role still to be created needs CREATEROLE, and on 16+ its creator gets only ADMIN on it unless
    createrole_self_grant says 'set'."""
    out = []
    v16 = role["version"] >= 160000
    for name in needs.create_roles:
        if not role["rolcreaterole"] and not conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                                          {"r": name}).first():
            out.append(Missing(f"role {name} (or CREATEROLE)", "the runbook creates it when missing",
                               f"CREATE ROLE {_ident(conn, name)} NOLOGIN"))
    for name in needs.act_as:
        if name in skip:
            continue
        exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name}).first()
        q = _ident(conn, name)
        if exists:
            if not conn.execute(text("SELECT pg_has_role(current_user, :r, :how)"),
                                {"r": name, "how": "SET" if v16 else "MEMBER"}).scalar():
                out.append(Missing(f"membership in {name}" + (" WITH SET" if v16 else ""),
                                   "the isolation suite acts as it (SET ROLE)",
                                   f"GRANT {q} TO {me}" + (" WITH INHERIT FALSE, SET TRUE" if v16 else "")))
            continue
        if not role["rolcreaterole"]:
            out.append(Missing(f"role {name} (or CREATEROLE)", "the runbook creates it when missing",
                               f"CREATE ROLE {q} NOLOGIN; GRANT {q} TO {me}"
                               + (" WITH INHERIT FALSE, SET TRUE" if v16 else "")))
        elif v16 and "set" not in str(conn.execute(text("SELECT current_setting('createrole_self_grant')"))
                                      .scalar()).lower():
            out.append(Missing(f"SET on the role {name} it creates", "a role created with CREATEROLE on 16+ is not "
                               "SET-able by its creator unless createrole_self_grant includes set; the isolation "
                               "suite acts as it (SET ROLE)",
                               f"CREATE ROLE {q} NOLOGIN; GRANT {q} TO {me} WITH INHERIT FALSE, SET TRUE "
                               f"(or ALTER ROLE {me} SET createrole_self_grant = 'set')"))
    return out


def can_cancel_autovacuum(conn: Connection) -> tuple[bool, str]:
    """Whether pg_cancel_backend may reach an autovacuum worker, which runs under no role: a superuser, or on
    18+ a member of pg_signal_autovacuum_worker. pg_signal_backend does not reach a process without a role
    (refused on 18 and on 15.18 alike: "must be a superuser to cancel superuser query")."""
    role = attributes(conn)
    if role["rolsuper"]:
        return True, "superuser"
    if role["version"] >= 180000:
        if _has_privileges_of(conn, "pg_signal_autovacuum_worker"):
            return True, "pg_signal_autovacuum_worker"
        return False, "needs pg_signal_autovacuum_worker"
    return False, "before PostgreSQL 18 only a superuser may"
