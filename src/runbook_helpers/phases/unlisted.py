"""Tables of the schema in neither core_tables nor shared_tables: 01_inspect lists each, so none is ignored silently.

The runbook migrates only the tables the spec names. A table it names nowhere (an ORM's migrations record, a
feature table nobody listed) gets no tenant_id and no row level security; whether that is right is the application
team's call, so each is listed with its rows, its foreign keys to and from the tenant tables, and what to do.
The runbook's own tables (tenants, users, user_tenants) are not listed; its ledger lives in a schema of its own.
Reads only the catalog and, below inspect.exact_count_below, count(*).
"""

from __future__ import annotations

import pandas as pd

from ..db import catalog, sizes
from ..db.reading import ReadingFrame
from .seed import CONVENTIONS

OWN_TABLES = frozenset(CONVENTIONS)  # tenants, users, user_tenants: what 02_seed makes (or finds) to the convention
COLUMNS = ["table", "rows", "counted", "size", "referenced by core tables", "references core tables", "known as",
           "what to do"]
NONE_COLUMN = "unlisted tables"


def frame(rb) -> pd.DataFrame:
    """One row per unlisted table, or one line saying every table of the schema is listed."""
    p = rb.params
    listed = set(p.tables) | set(p.shared_tables) | OWN_TABLES
    with rb.engine.connect() as conn:
        tables = [t for t in catalog.schema_tables(conn, rb.schema) if t.name not in listed]
        if not tables:
            return ReadingFrame({NONE_COLUMN: [none_line(rb.schema)]})
        states = catalog.table_states(conn, rb.schema, [t.name for t in tables])
        fks = catalog.foreign_keys_touching(conn, rb.schema, [t.name for t in tables])
        keys = {n: s.pk_columns for n, s in catalog.table_states(conn, rb.schema, p.tables).items()}
        rows = [_row(conn, rb, t, states[t.name], fks, keys) for t in sorted(tables, key=lambda t: t.name)]
    return ReadingFrame(rows, columns=COLUMNS)


def none_line(schema: str) -> str:
    return f"every table of schema {schema} is in core_tables or shared_tables"


def _row(conn, rb, table: catalog.SchemaTable, st: catalog.TableState, fks: list[catalog.ForeignKey],
         core_keys: dict[str, list[str]]) -> dict:
    """core_keys: each core table's primary key columns (a `parent` references the parent's primary key)."""
    referenced_by = [fk for fk in fks if fk.parent == table.name and fk.child in core_keys]
    references = [fk for fk in fks if fk.child == table.name and fk.parent in core_keys]
    parents = [fk for fk in references if len(fk.cols) == 1 and fk.ref_cols == core_keys[fk.parent]]
    known = known_as(rb.params, rb.schema, table)
    count, how = _count(conn, st, table.readable, rb.params.inspect.exact_count_below)
    return {"table": table.name, "rows": count, "counted": how, "size": sizes.readable(st.size_bytes),
            "referenced by core tables": _named(referenced_by), "references core tables": _named(references),
            "known as": ", ".join(known), "what to do": what_to_do(known, referenced_by, references, parents)}


def _count(conn, st: catalog.TableState, readable: bool, exact_below: int) -> tuple[int, str]:
    """Exact below the threshold, else the planner's estimate; the estimate too where this role may not read it
    (inspect must not fail on a table the spec does not name)."""
    if not readable:
        return st.estimated_rows, "estimate (no SELECT privilege)"
    return catalog.count_rows(conn, st, exact_below)


def _named(fks: list[catalog.ForeignKey]) -> str:
    """As cross_tenant.foreign_keys names them (<child table>.<constraint>), with columns and the referenced table."""
    return "; ".join(f"{fk.child}.{fk.name} ({', '.join(fk.cols)} -> {fk.parent})" for fk in fks)


def known_as(p, schema: str, table: catalog.SchemaTable) -> list[str]:
    """What else names the table, so its row says why it is in neither list: an extension, or a params key."""
    if table.extension:
        return [f"extension {table.extension}"]
    name, known = table.name, []
    source = p.legacy.source
    if p.legacy.enabled and source is not None:
        known += ["legacy.source.tenants"] if source.tenants.table == name else []
        known += ["legacy.source.users"] if source.users.table == name else []
        known += [f"legacy.source.memberships.{i}" for i, m in enumerate(source.memberships) if m.table == name]
    known += ["distribution.reference_tables"] if name in p.distribution.reference_tables else []
    known += ["drizzle.table"] if p.drizzle.schema_ == schema and p.drizzle.table == name else []
    return known


def what_to_do(known: list[str], referenced_by: list[catalog.ForeignKey], references: list[catalog.ForeignKey],
               parents: list[catalog.ForeignKey]) -> str:
    """The likely right list for the table, from what names it and its foreign keys to and from tenant tables
    (`parents`: those of its references that could be its core_tables `parent`)."""
    if known and known[0].startswith("extension "):
        return f"nothing: {known[0]} owns it; it is not the application's"
    if known:
        return f"nothing: params name it ({', '.join(known)}); the runbook gives it no tenant_id"
    if references:
        fk = (parents or references)[0]
        advice = (f"add it to core_tables: it references the tenant table {fk.parent} ({fk.name}), so its rows "
                  f"belong to that row's tenant")
        return advice + (f"; with the legacy mapping give it parent: {{table: {fk.parent}, column: {fk.cols[0]}}}"
                         if parents else "")
    if referenced_by:
        return ("most likely shared, since a tenant table references it: add it to shared_tables (every tenant reads "
                "it); to core_tables only if each of its rows belongs to one tenant")
    return ("add it to core_tables if its rows belong to a tenant, or to shared_tables if every tenant shares it; "
            "bookkeeping no tenant reads (an ORM's migrations table) may stay in neither, and is listed here each run")
