"""The catalog state of every spec table, read fresh for each decision."""

from __future__ import annotations

import re

from sqlalchemy.engine import Connection

from ..db import catalog
from ..db.catalog import TableState


def tenants_oid(conn: Connection, schema: str) -> int | None:
    return catalog.relation_oid(conn, schema, "tenants")


def core_states(rb, conn: Connection) -> dict[str, TableState]:
    return catalog.table_states(conn, rb.schema, rb.params.tables, tenants_oid(conn, rb.schema))


def core_state(rb, conn: Connection, table: str) -> TableState:
    return catalog.table_state(conn, rb.schema, table, tenants_oid(conn, rb.schema))


def shared_states(rb, conn: Connection) -> dict[str, TableState]:
    return catalog.table_states(conn, rb.schema, rb.params.shared_tables)


def system_tenant_id(rb) -> int | None:
    """The id of the System Tenant (by its fixed UUID), or None before seed has created it."""
    with rb.engine.connect() as conn:
        return catalog.system_tenant_id(conn, rb.schema, rb.params.system_tenant.uuid)


def default_value(default_expr: str | None) -> int | None:
    """The integer a column DEFAULT evaluates to, when it is a plain constant (e.g. '7'::bigint)."""
    if not default_expr:
        return None
    match = re.fullmatch(r"\(?'?(-?\d+)'?\)?(::bigint|::integer)?", default_expr.strip())
    return int(match.group(1)) if match else None
