"""07_distribute, first operation: every primary key and unique key of a tenant table becomes (tenant_id, …), online.

Citus refuses to distribute a table with a PRIMARY KEY or UNIQUE key that lacks the distribution column, and a
composite key beside it does not help: the key itself must change. That changes what the application may rely on
(an id alone is no longer unique by constraint, `ON CONFLICT (id)` finds no key, a REFERENCES t(id) from elsewhere
has nothing to reference), so it runs only once params say the application agreed
(distribution.application_keys_agreed). Per key:

  1. CREATE UNIQUE INDEX CONCURRENTLY <key>_with_tenant_id ON t (tenant_id, <columns>)   SHARE UPDATE EXCLUSIVE
  2. one transaction, separate statements (Citus refuses DROP CONSTRAINT and ADD CONSTRAINT … USING INDEX in one
     ALTER TABLE): the foreign keys on the old key dropped (each has its (tenant_id, …) twin from
     distribution.composite_keys, which keeps enforcing it), the old key dropped, the new one added USING the
     index under the old key's name, and the old definition recorded in the ledger      brief ACCESS EXCLUSIVE

A unique index that is not a constraint is swapped the same way (DROP INDEX, ALTER INDEX … RENAME). Partitioned
tables (CONCURRENTLY and USING INDEX are not available on them) are not swapped by the runbook.
"""

from __future__ import annotations

from psycopg import sql
from sqlalchemy.engine import Connection

from ..db import catalog
from ..db.ddl import ACCESS_EXCLUSIVE_META, Step
from ..db.names import TENANT_COLUMN, truncate
from ..db.sqltext import render
from ..tenancy import composite_keys
from . import citus

PHASE = "distribute"
KEY_LOCK = "ACCESS EXCLUSIVE on the table and the tables whose foreign keys go (metadata only, milliseconds)"


def new_index_name(key: citus.UniqueKey) -> str:
    return truncate(f"{key.name}_with_{TENANT_COLUMN}")


def blockers(key: citus.UniqueKey, tables: list[str], fks: list[catalog.ForeignKey], plain: dict[str, str]) -> list[str]:
    """What keeps this key from being swapped by the runbook (each with what to do)."""
    out = []
    if key.partitioned:
        out.append(f"{key.table} is partitioned: PostgreSQL builds no index CONCURRENTLY and takes no ADD … USING "
                   f"INDEX on a partitioned table, so the runbook does not swap {key.name} ({', '.join(key.columns)}); "
                   f"make it ({', '.join(key.tenant_columns)}) by hand (per partition, then attach) and re-run")
    by_name = {(f.child, f.name): f for f in fks}
    for child, name in key.referenced_by:
        if child not in tables:
            out.append(f"{child}.{name}, outside the spec, references {key.table} ({', '.join(key.columns)}): drop it "
                       f"or give it tenant_id (a distributed table can be referenced only by colocated ones)")
            continue
        fk = by_name.get((child, name))
        if fk is not None and f"{child}.{name}" in plain:
            out.append(f"{child}.{name} is an accepted cross-tenant reference (cross_tenant.foreign_keys: wins: child)"
                       f": Citus cannot keep a foreign key across tenants; drop it or make {key.table} a table outside "
                       f"the spec (a reference table)")
        elif fk is None or composite_keys.covering(fk, fks) is None:
            out.append(f"{child}.{name} references {key.table} ({', '.join(key.columns)}) without tenant_id and has "
                       f"no (tenant_id, …) twin: turn on distribution.composite_keys and re-run 04_constrain")
    return out


def steps(conn: Connection, schema: str, ledger_schema: str, keys: list[citus.UniqueKey]) -> list[Step]:
    """The build and the swap of every key given (the caller leaves out the blocked ones)."""
    out: list[Step] = []
    for key in keys:
        st = catalog.table_state(conn, schema, key.table)
        index = new_index_name(key)
        out += composite_keys.unique_index_steps(PHASE, conn, st, index, key.tenant_columns)
        out.append(swap_step(schema, ledger_schema, key, index))
    return out


def swapped(conn: Connection, ledger_schema: str) -> dict[tuple[str, str], str]:
    """The keys 07_distribute swapped to (tenant_id, …), as the ledger recorded them: (table, key) -> the old
    definition (empty before 07, and on a database it never touched)."""
    if catalog.relation_oid(conn, ledger_schema, "distribution_changes") is None:
        return {}
    return {(t, n): d for t, n, d in conn.exec_driver_sql(render(conn, sql.SQL(
        "SELECT table_name, name, definition FROM {} WHERE kind = 'key'").format(
        sql.Identifier(ledger_schema, "distribution_changes")))).all()}


def with_tenant(definition: str) -> str:
    """What a key's definition reads after the swap: tenant_id first in its columns (swap_step builds exactly that
    index), as pg_get_constraintdef prints it: 'PRIMARY KEY (id)' -> 'PRIMARY KEY (tenant_id, id)'."""
    head, sep, tail = definition.partition("(")
    return f"{head}{sep}{TENANT_COLUMN}, {tail}" if sep else definition


def swap_step(schema: str, ledger_schema: str, key: citus.UniqueKey, index: str) -> Step:
    table = sql.Identifier(schema, key.table)
    record = sql.SQL("INSERT INTO {} (kind, table_name, name, definition) VALUES ('key', {}, {}, {}) "
                     "ON CONFLICT DO NOTHING").format(sql.Identifier(ledger_schema, "distribution_changes"),
                                                      sql.Literal(key.table), sql.Literal(key.name),
                                                      sql.Literal(key.definition))
    parts = [record] + [sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(schema, child),
                                                                          sql.Identifier(name))
                        for child, name in key.referenced_by]
    if key.kind == "unique index":
        parts += [sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, key.name)),
                  sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(schema, index), sql.Identifier(key.name))]
    else:
        kind = sql.SQL("PRIMARY KEY" if key.kind == "primary key" else "UNIQUE")
        parts += [sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table, sql.Identifier(key.name)),
                  sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}").format(
                      table, sql.Identifier(key.name), kind, sql.Identifier(index))]
    dropped = "".join(f"; drops {child}.{name} (its (tenant_id, …) twin stays)" for child, name in key.referenced_by)
    return Step(PHASE, key.table, f"swap {key.name} to ({', '.join(key.tenant_columns)})", sql.SQL("; ").join(parts),
                KEY_LOCK if key.referenced_by else ACCESS_EXCLUSIVE_META,
                f"the index is built: catalog changes only, separate statements in one transaction{dropped}")
