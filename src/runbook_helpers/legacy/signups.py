"""Signups during the rollout window: an org, a user or a membership the legacy application creates while the
window is open gets its tenant, its users row and its user_tenants row at once, in the writer's own transaction.

Triggers on the tenant source's tables run seed's own statements (legacy/seed.py) for the new row only:
- on the tenant source, BEFORE INSERT: the org's tenant and its map (org_tenants). Its name sorts before the rollout
  trigger's, so where the tenant source is a core table itself its own row already finds its tenant; every row
  written under the new org afterwards does too (the rollout trigger reads the map);
- on the users table, AFTER INSERT: the user (unless another legacy user has the email: listed, never merged);
- on every table a membership source names, AFTER INSERT or UPDATE: the memberships of the row's user (and on the
  tenant source, those that name the new org), with the role seed would give them.
02_seed installs them before it maps the existing rows, so no org falls between the two; 06_finalize removes them
with the rollout triggers (the tenant-aware application creates its tenants itself from then on) and its undo puts
them back; seed's undo removes them before it deletes what the mapping created. The runbook's own sessions (the
isolation probes) are skipped, as the rollout triggers skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql
from sqlalchemy.engine import Connection

from ..db import catalog, reconcile
from ..db.database import RUNBOOK_SESSION_SETTING
from ..db.ddl import ACCESS_EXCLUSIVE_META, UNDO_PHASE, Step, on_table
from ..db.names import truncate
from . import mapping, seed

NEW_ORG = "tenancy_legacy_signup"  # sorts before tenancy_rollout_assign, which fires after it on the same row
NEW_ROW = "tenancy_legacy_signup_after"
TRIGGERS = (NEW_ORG, NEW_ROW)
LOCK = on_table("SHARE ROW EXCLUSIVE", brief=True, note="CREATE TRIGGER: blocks writes for a moment, not reads")


@dataclass(frozen=True)
class SignupTable:
    """What a new row of one legacy table creates."""
    name: str
    org_key: str | None          # the tenant source: its key column (a new row is a new org)
    user_key: str | None         # the users table: its key column (a new row is a new user)
    membership_users: tuple[str, ...]  # the columns of its membership sources that name a user
    membership_orgs: tuple[str, ...] = ()

    @property
    def events(self) -> str:
        return "INSERT OR UPDATE" if self.membership_users else "INSERT"


def tables(p) -> list[SignupTable]:
    """The tenant source's tables, each with what a new row of it creates (a table may be several at once: the
    shop's staff is its users table and its membership source)."""
    src = mapping.source(p)
    names = [src.tenants.table, src.users.table] + [m.table for m in src.memberships]
    out = []
    for name in dict.fromkeys(names):
        out.append(SignupTable(
            name, src.tenants.key if name == src.tenants.table else None,
            src.users.key if name == src.users.table else None,
            tuple(dict.fromkeys(m.user for m in src.memberships if m.table == name))))
    return out


def _function(p, table: SignupTable, trigger: str) -> sql.Identifier:
    return sql.Identifier(p.ledger_schema, truncate(f"{trigger.removeprefix('tenancy_')}_{table.name}"))


def _body(p, table: SignupTable, trigger: str) -> list[sql.Composable]:
    """Seed's statements for the new row."""
    if trigger == NEW_ORG:
        return [seed.tenant_statement(p, sql.SQL("(SELECT NEW.*) AS o"))]
    out: list[sql.Composable] = []
    if table.org_key:
        out.append(seed.membership_statement(p, sql.SQL("c.org_id = NEW.{}").format(sql.Identifier(table.org_key))))
    if table.user_key:
        email = sql.Identifier(mapping.source(p).users.email)
        out.append(seed.user_statement(p, sql.SQL("lower(btrim(u.{e})) = lower(btrim(NEW.{e}))").format(e=email)))
    for column in dict.fromkeys(((table.user_key,) if table.user_key else ()) + table.membership_users):
        out.append(seed.membership_statement(p, sql.SQL("c.user_id = NEW.{}").format(sql.Identifier(column))))
    return out


def _triggers(table: SignupTable) -> list[str]:
    return ([NEW_ORG] if table.org_key else []) + [NEW_ROW]


def install_statement(p, table: SignupTable) -> sql.Composed:
    """The functions and triggers of one table, in one transaction."""
    parts: list[sql.Composable] = []
    for trigger in _triggers(table):
        body = sql.SQL(";\n  ").join(_body(p, table, trigger))
        parts.append(sql.SQL(
            "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path TO pg_catalog, pg_temp AS $signup$\nBEGIN\n"
            "  IF current_setting({s}, true) = 'runbook' THEN RETURN NEW; END IF;\n  {body};\n  RETURN NEW;\n"
            "END\n$signup$").format(fn=_function(p, table, trigger), s=sql.Literal(RUNBOOK_SESSION_SETTING), body=body))
        when = "BEFORE INSERT" if trigger == NEW_ORG else f"AFTER {table.events}"
        parts.append(sql.SQL("CREATE TRIGGER {trg} " + when + " ON {t} FOR EACH ROW EXECUTE FUNCTION {fn}()").format(
            trg=sql.Identifier(trigger), t=sql.Identifier(p.schema_, table.name), fn=_function(p, table, trigger)))
    return sql.SQL(";\n").join(parts)


def installed(conn: Connection, p, table: str) -> set[str]:
    """Which of the signup triggers the table has."""
    oid = catalog.relation_oid(conn, p.schema_, table)
    if oid is None:
        return set()
    return {r[0] for r in conn.exec_driver_sql(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND tgname = ANY(%s)", (oid, list(TRIGGERS))).all()}


def window_closed(conn: Connection, p) -> bool:
    """06_finalize closed the rollout window (the tenant-aware application creates its tenants itself)."""
    return any(reconcile.closed(conn, p.ledger_schema, name) is not None for name in p.tables)


def _what(table: SignupTable) -> str:
    made = (["its tenant"] if table.org_key else []) + (["its user"] if table.user_key else []) + (
        ["its memberships"] if table.membership_users or table.org_key or table.user_key else [])
    return ", ".join(made)


def install_steps(conn: Connection, p, phase: str) -> list[Step]:
    """The triggers on each table that lacks them."""
    out = []
    for table in tables(p):
        if set(_triggers(table)) <= installed(conn, p, table.name):
            continue
        out.append(Step(phase, table.name, f"install the signup triggers (a new row gets {_what(table)} at once)",
                        install_statement(p, table), LOCK,
                        "what the legacy application creates during the rollout window gets its tenant in the same "
                        "transaction, with seed's own statements; the triggers go with 06_finalize"))
    return out


def remove_steps(conn: Connection, p, phase: str, why: str, every: bool = False) -> list[Step]:
    """`every`: each table's, whether it has them now or not (an earlier step of the same run puts them back)."""
    out = []
    for table in tables(p):
        present = set(_triggers(table)) if every else installed(conn, p, table.name)
        if not present:
            continue
        statement = sql.SQL(";\n").join(
            [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(t), sql.Identifier(p.schema_, table.name))
             for t in TRIGGERS if t in present]
            + [sql.SQL("DROP FUNCTION IF EXISTS {}()").format(_function(p, table, t)) for t in TRIGGERS])
        out.append(Step(phase, table.name, "remove the signup triggers", statement, ACCESS_EXCLUSIVE_META, why))
    return out


def undo_steps(conn: Connection, p) -> list[Step]:
    """Their removal, also where 06_finalize removed them: its undo, earlier in the same rollback, puts them back."""
    return remove_steps(conn, p, UNDO_PHASE, "catalog change only; the legacy application wrote without them before",
                        every=window_closed(conn, p) and mapping.map_tables_exist(conn, p))
