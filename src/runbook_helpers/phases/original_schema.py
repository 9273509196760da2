"""The schema before the first change: what the database looked like before the runbook touched it,
recorded once with the baseline.

Rollback needs more than counts and fingerprints: the definitions of the keys the composite-key step
replaces, whether tenant_id existed (and which rows already had a value in a partly applied 0001),
whether the tenancy tables and the System Tenant existed, and which views had which options. All of it
goes into the ledger on inspect's first stored run and is never overwritten, like the baseline. Each
phase's undo_steps() reads it as a Snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from .. import faults
from ..db import catalog
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError

TABLES_SQL = """
CREATE TABLE IF NOT EXISTS {schema}.legacy_tables (
  table_name text PRIMARY KEY,
  had_tenant_column boolean NOT NULL,
  tenant_column_not_null boolean NOT NULL DEFAULT false,
  tenant_column_default text,
  key_columns text[] NOT NULL,
  constraints jsonb NOT NULL,
  indexes text[] NOT NULL,
  acl text,
  captured_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.legacy_tenant_values (
  table_name text NOT NULL,
  key jsonb NOT NULL,
  tenant_id bigint NOT NULL,
  PRIMARY KEY (table_name, key)
);
CREATE TABLE IF NOT EXISTS {schema}.legacy_objects (
  kind text NOT NULL,
  name text NOT NULL,
  existed boolean NOT NULL,
  detail jsonb,
  PRIMARY KEY (kind, name)
)
"""

CONSTRAINTS_SQL = text("""
SELECT conname, contype::text, pg_get_constraintdef(oid) AS definition
FROM pg_constraint WHERE conrelid = :oid AND contype IN ('p', 'f', 'u') ORDER BY conname
""")


def ensure(conn: Connection, schema: str) -> None:
    script = sql.SQL(TABLES_SQL).format(schema=sql.Identifier(schema))
    for statement in render(conn, script).split(";\n"):
        conn.exec_driver_sql(statement)


def _t(schema: str, name: str) -> sql.Composed:
    return sql.Identifier(schema, name)


def forget(conn: Connection, schema: str) -> int:
    """Delete the snapshot (`runbook baseline reset`, on a database that is back to it); returns the rows deleted."""
    deleted = 0
    for name in ("legacy_tables", "legacy_tenant_values", "legacy_objects"):
        if catalog.relation_oid(conn, schema, name) is not None:
            deleted += conn.exec_driver_sql(render(conn, sql.SQL("DELETE FROM {}").format(_t(schema, name)))).rowcount
    return deleted


def captured(conn: Connection, schema: str) -> set[str]:
    if catalog.relation_oid(conn, schema, "legacy_tables") is None:
        return set()
    return {r[0] for r in conn.exec_driver_sql(render(conn, sql.SQL("SELECT table_name FROM {}").format(
        _t(schema, "legacy_tables"))))}


def capture(rb) -> list[str]:
    """Record the legacy shape of every core table not yet recorded; returns the tables recorded now."""
    ledger_schema = rb.params.ledger_schema
    control = rb.control
    ensure(control, ledger_schema)
    done = captured(control, ledger_schema)
    recorded = []
    with rb.engine.connect() as conn:
        for name in rb.params.tables:
            if name in done:
                continue
            st = catalog.table_state(conn, rb.schema, name)
            constraints = [dict(r) for r in conn.execute(CONSTRAINTS_SQL, {"oid": st.oid}).mappings()]
            indexes = [r[0] for r in conn.execute(text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = :oid"),
                {"oid": st.oid})]
            acl = conn.execute(text("SELECT relacl::text FROM pg_class WHERE oid = :oid"), {"oid": st.oid}).scalar()
            if st.has_column and st.pk_columns:
                # one statement, before the table's record: a run killed in between records the values again
                # (ON CONFLICT DO NOTHING) instead of leaving the table recorded with only part of its values
                keys = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in st.pk_columns)
                control.exec_driver_sql(render(control, sql.SQL(
                    "INSERT INTO {v} (table_name, key, tenant_id) SELECT %s, json_build_array({keys})::jsonb, {col} "
                    "FROM {t} WHERE {col} IS NOT NULL ON CONFLICT DO NOTHING").format(
                        v=_t(ledger_schema, "legacy_tenant_values"), keys=keys, col=sql.Identifier(TENANT_COLUMN),
                        t=st.qualified)), (name,))
                faults.point("inspect.after_tenant_values", name)
            control.exec_driver_sql(render(control, sql.SQL(
                "INSERT INTO {} (table_name, had_tenant_column, tenant_column_not_null, tenant_column_default, "
                "key_columns, constraints, indexes, acl) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s) "
                "ON CONFLICT DO NOTHING").format(_t(ledger_schema, "legacy_tables"))),
                (name, st.has_column, st.not_null, st.default, st.pk_columns, json.dumps(constraints), indexes, acl))
            recorded.append(name)
        if not done:
            _capture_objects(rb, conn, control)
    return recorded


def _capture_objects(rb, conn: Connection, control: Connection) -> None:
    from . import seed
    from . import state as table_states

    schema, ledger_schema = rb.schema, rb.params.ledger_schema
    objects: list[tuple[str, str, bool, Any]] = []
    for name in seed.CONVENTIONS:
        objects.append(("table", name, catalog.relation_oid(conn, schema, name) is not None, None))
    objects.append(("system tenant", str(rb.params.system_tenant.uuid), table_states.system_tenant_id(rb) is not None,
                    None))
    views = conn.execute(text(
        "SELECT DISTINCT v.oid::regclass::text, v.reloptions FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
        "JOIN pg_class v ON v.oid = r.ev_class JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON "
        "n.oid = c.relnamespace WHERE d.classid = 'pg_rewrite'::regclass AND n.nspname = :s AND c.relname = ANY(:t) "
        "AND v.oid <> c.oid AND v.relkind = 'v'"), {"s": schema, "t": rb.params.tables}).all()
    for view, options in views:
        objects.append(("view", view, True, {"reloptions": options or []}))
    for kind, name, existed, detail in objects:
        control.exec_driver_sql(render(control, sql.SQL(
            "INSERT INTO {} (kind, name, existed, detail) VALUES (%s, %s, %s, %s::jsonb) ON CONFLICT DO NOTHING").format(
                _t(ledger_schema, "legacy_objects"))), (kind, name, existed, json.dumps(detail)))


def tables(conn: Connection, ledger_schema: str) -> dict[str, dict[str, Any]]:
    if catalog.relation_oid(conn, ledger_schema, "legacy_tables") is None:
        return {}
    rows = conn.exec_driver_sql(render(conn, sql.SQL("SELECT * FROM {}").format(
        _t(ledger_schema, "legacy_tables")))).mappings().all()
    return {r["table_name"]: dict(r) for r in rows}


def objects(conn: Connection, ledger_schema: str) -> dict[tuple[str, str], dict[str, Any]]:
    if catalog.relation_oid(conn, ledger_schema, "legacy_objects") is None:
        return {}
    rows = conn.exec_driver_sql(render(conn, sql.SQL("SELECT * FROM {}").format(
        _t(ledger_schema, "legacy_objects")))).mappings().all()
    return {(r["kind"], r["name"]): dict(r) for r in rows}


@dataclass(frozen=True)
class Snapshot:
    """The recorded pre-change schema, as every phase's undo reads it."""
    tables: dict[str, dict[str, Any]]            # per core table: keys, constraints, indexes, tenant_id, acl
    objects: dict[tuple[str, str], dict[str, Any]]  # (kind, name) -> existed, detail: tables, System Tenant, views

    def existed(self, kind: str, name: str) -> bool:
        """Whether an object was there before the migration (True when nothing was recorded about it)."""
        return self.objects.get((kind, name), {}).get("existed", True)

    def views(self) -> dict[str, list[str]]:
        """Each recorded view with the options it had."""
        return {name: list((record["detail"] or {}).get("reloptions", []))
                for (kind, name), record in self.objects.items() if kind == "view"}


def snapshot(conn: Connection, ledger_schema: str, core_tables: list[str]) -> Snapshot:
    """The snapshot, or an error that changes nothing when a core table was never recorded."""
    before = tables(conn, ledger_schema)
    missing = [t for t in core_tables if t not in before]
    if missing:
        raise RunbookError(f"no record of how {', '.join(missing)} looked before the migration (inspect records it "
                           f"with the baseline); rollback cannot restore them safely. Nothing was changed.")
    return Snapshot(before, objects(conn, ledger_schema))
