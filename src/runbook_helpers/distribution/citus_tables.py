"""07_distribute, the Citus operations, in the only order Citus accepted (issue 18):

  1. drop every foreign key among the tenant tables and the reference tables, recording its definition in the
     ledger in the same transaction: create_reference_table('tenants') would otherwise turn every table connected
     to tenants by a foreign key into a Citus local table, and colocate_with is refused after that
  2. create_reference_table(t) for tenants, users, user_tenants, the shared tables and distribution.reference_tables
  3. create_distributed_table(t, 'tenant_id', colocate_with => <the first tenant table>) for every tenant table
     (with SET LOCAL citus.enable_unsafe_triggers where the table has the application's triggers and
     distribution.triggers is enable_unsafe)
  4. every recorded foreign key re-added NOT VALID (no scan), then VALIDATE (both accepted on distributed tables)

Citus copies each table's rows while it distributes it; the plan shows pg_total_relation_size per table as the
estimate of what moves. create_distributed_table and create_reference_table are never stubbed: without Citus the
phase refuses before this module's steps run.
"""

from __future__ import annotations

import re

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..db import catalog
from ..db.ddl import SHARE_UPDATE_EXCLUSIVE, Step
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from . import citus

PHASE = "distribute"
DROP_LOCK = "ACCESS EXCLUSIVE on the table and the referenced table (metadata only, milliseconds)"
ADD_LOCK = "SHARE ROW EXCLUSIVE on the table and the referenced table (metadata only, milliseconds)"
SHARE_ROW_EXCLUSIVE_SCAN = ("SHARE ROW EXCLUSIVE on the table and the referenced table while the partitions are "
                            "scanned (reads continue, writes wait)")
COPY_LOCK = "EXCLUSIVE on the table while Citus copies its rows to the shards (reads continue, writes wait)"


def _ledger(ledger_schema: str) -> sql.Composed:
    return sql.Identifier(ledger_schema, "distribution_changes")


def recorded_foreign_keys(conn: Connection, ledger_schema: str) -> list[citus.Reference]:
    """The foreign keys step 1 dropped (their definitions), for a resumed run to re-add."""
    if catalog.relation_oid(conn, ledger_schema, "distribution_changes") is None:
        return []
    rows = conn.exec_driver_sql(render(conn, sql.SQL(
        "SELECT table_name, name, definition FROM {} WHERE kind = 'foreign key' ORDER BY recorded_at, table_name, name"
    ).format(_ledger(ledger_schema)))).all()
    return [citus.Reference(t, n, _parent(d), [], d, False) for t, n, d in rows]


def dropped_tenant_keys(conn: Connection, ledger_schema: str) -> set[str]:
    """The tables whose validated foreign key (tenant_id) REFERENCES tenants(id) step 1 dropped (the ledger holds its
    definition, and the plan re-adds and validates it): a re-run reads that as its own work to finish, not as a
    table 04_constrain has not finished."""
    prefix = f"FOREIGN KEY ({TENANT_COLUMN}) REFERENCES "
    return {r.child for r in recorded_foreign_keys(conn, ledger_schema)
            if r.definition.startswith(prefix) and _parent(r.definition) == "tenants"
            and re.search(r"REFERENCES\s+\S*tenants\"?\(id\)", r.definition)
            and not r.definition.rstrip().endswith("NOT VALID")}


def _parent(definition: str) -> str:
    found = re.search(r"REFERENCES\s+((?:\"[^\"]+\"|[^\s(]+)(?:\.(?:\"[^\"]+\"|[^\s(]+))?)", definition)
    return found.group(1).split(".")[-1].strip('"') if found else ""


def size(conn: Connection, schema: str, table: str) -> int:
    """pg_total_relation_size of the table, or of all its partitions for a partitioned one (whose own size is 0)."""
    return int(conn.execute(text(
        "WITH t AS (SELECT format('%I.%I', CAST(:s AS text), CAST(:t AS text))::regclass AS oid) "
        "SELECT coalesce((SELECT sum(pg_total_relation_size(p.relid)) FROM t, pg_partition_tree(t.oid) p), "
        "(SELECT pg_total_relation_size(t.oid) FROM t))"), {"s": schema, "t": table}).scalar() or 0)


def cycle(fks: list[citus.Reference], inside: set[str]) -> list[citus.Reference]:
    """The foreign keys that must be dropped around distribution: both sides among the tables Citus takes."""
    return [f for f in fks if f.child in inside and f.parent in inside]


def _recorded_drop(schema: str, ledger_schema: str, kind: str, table: str, name: str,
                   definition: str) -> sql.Composed:
    """A constraint's definition recorded in the ledger and the constraint dropped, in one statement's transaction."""
    record = sql.SQL("INSERT INTO {} (kind, table_name, name, definition) VALUES ({}, {}, {}, {}) "
                     "ON CONFLICT DO NOTHING").format(_ledger(ledger_schema), sql.Literal(kind), sql.Literal(table),
                                                      sql.Literal(name), sql.Literal(definition))
    drop = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(schema, table), sql.Identifier(name))
    return record + sql.SQL("; ") + drop


def drop_steps(schema: str, ledger_schema: str, fks: list[citus.Reference]) -> list[Step]:
    out = []
    for fk in fks:
        out.append(Step(PHASE, fk.child, f"drop {fk.name} until the tables are distributed",
                        _recorded_drop(schema, ledger_schema, "foreign key", fk.child, fk.name, fk.definition), DROP_LOCK, "catalog change only; its definition is recorded in the ledger in the same "
                        "transaction and it comes back NOT VALID, then validated, after distribution"))
    return out


def redundant_steps(schema: str, ledger_schema: str, keys: list[citus.RedundantKey]) -> list[Step]:
    """Each UNIQUE constraint that duplicates a key of its table dropped, its definition recorded in the ledger in the
    same transaction (after the foreign keys on its index went: they come back on the kept key's index)."""
    out = []
    for key in keys:
        out.append(Step(PHASE, key.table, f"drop {key.name}: the same columns as {key.kept} "
                        f"({', '.join(key.columns)})",
                        _recorded_drop(schema, ledger_schema, "redundant key", key.table, key.name, key.definition),
                        DROP_LOCK,
                        "catalog change only: a second unique index on the same columns checks nothing more and costs "
                        "every write; its definition is recorded in the ledger"
                        + (f"; {', '.join(key.used_by)} come back on {key.kept}'s index" if key.used_by else "")))
    return out


def reference_steps(schema: str, tables: list[str], sizes: dict[str, int], reasons: dict[str, str] | None = None,
                    local: dict[str, tuple[str, str]] | None = None) -> list[Step]:
    """create_reference_table for each table; `reasons`: why each becomes one; `local`: the tables Citus makes Citus
    local tables on the way (table -> (the reference table that takes it, why)), named in that table's step."""
    out = []
    for t in tables:
        taken = [(other, why) for other, (root, why) in (local or {}).items() if root == t]
        action = f"make {t} a reference table (copies {sizes.get(t, 0):,} bytes to every node)"
        if taken:
            action += f"; Citus makes {', '.join(o for o, _ in taken)} Citus local tables (they stay on the coordinator)"
        why = "Citus's own copy; the table stays whole on every node"
        if reasons and t in reasons:
            why = f"{reasons[t]}; {why}"
        if taken:
            why += "; " + "; ".join(f"{o} becomes a Citus local table: {w} and Citus takes every table connected "
                                    f"to a reference table by foreign keys" for o, w in taken)
        out.append(Step(PHASE, t, action, sql.SQL("SELECT create_reference_table({})").format(
            sql.Literal(f'{_quoted(schema)}.{_quoted(t)}')), COPY_LOCK, why, long_scan=True))
    return out


def distribute_steps(schema: str, tables: list[str], colocate_with: str | None, sizes: dict[str, int],
                     unsafe_triggers: set[str]) -> list[Step]:
    """create_distributed_table by tenant_id, each table colocated with the first."""
    out = []
    for t in tables:
        name = sql.Literal(f"{_quoted(schema)}.{_quoted(t)}")
        call = sql.SQL("SELECT create_distributed_table({}, {})").format(name, sql.Literal(TENANT_COLUMN)) \
            if colocate_with is None else sql.SQL("SELECT create_distributed_table({}, {}, colocate_with => {})").format(
                name, sql.Literal(TENANT_COLUMN), sql.Literal(f"{_quoted(schema)}.{_quoted(colocate_with)}"))
        why = "Citus's own copy into colocated shards: a tenant's rows of every table on one node"
        if t in unsafe_triggers:
            call = sql.SQL("SET LOCAL citus.enable_unsafe_triggers = on; ") + call
            why += "; its triggers are created on every shard (distribution.triggers: enable_unsafe)"
        out.append(Step(PHASE, t, f"distribute {t} by {TENANT_COLUMN} (moves {sizes.get(t, 0):,} bytes)", call,
                        COPY_LOCK, why, long_scan=True))
        colocate_with = colocate_with or t
    return out


def readd_steps(schema: str, fks: list[citus.Reference], present: dict[str, citus.Reference],
                partitioned: set[str] = frozenset()) -> list[Step]:
    """Each foreign key NOT VALID where it is missing, then VALIDATE where it is not validated. On a partitioned
    child (`partitioned`) PostgreSQL before 18 takes no NOT VALID foreign key: it is added and checked at once."""
    out = []
    for fk in fks:
        table = sql.Identifier(schema, fk.child)
        have = present.get(fk.key)
        if have is None:
            definition, dropped = distributed_definition(fk.definition)
            whole = fk.child in partitioned
            why = ("on a partitioned table PostgreSQL before 18 takes no NOT VALID foreign key: added and checked at "
                   "once, writes to the table wait while its partitions are scanned" if whole else
                   "NOT VALID skips the scan; new writes are checked at once")
            if dropped:
                why += (f"; without {dropped}: Citus refuses it on a key that holds the distribution column, and a "
                        f"row's {TENANT_COLUMN} can no longer change once distributed (NO ACTION, the default)")
            out.append(Step(PHASE, fk.child, f"re-add {fk.name}" + ("" if whole else " NOT VALID")
                            + (f" without {dropped}" if dropped else ""),
                            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}" + ("" if whole else " NOT VALID")).format(
                                table, sql.Identifier(fk.name), sql.SQL(definition)),
                            SHARE_ROW_EXCLUSIVE_SCAN if whole else ADD_LOCK, why, long_scan=whole))
            if whole:
                continue
        if have is None or not have.validated:
            out.append(Step(PHASE, fk.child, f"validate {fk.name}", sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                table, sql.Identifier(fk.name)), SHARE_UPDATE_EXCLUSIVE, "scans without blocking reads or writes",
                long_scan=True))
    return out


ON_UPDATE_ACTION = re.compile(r"\s+ON UPDATE (CASCADE|SET NULL|SET DEFAULT)(\s*\([^)]*\))?")


def distributed_definition(definition: str) -> tuple[str, str | None]:
    """A recorded foreign key as Citus accepts it on distributed tables: NOT VALID off, and an ON UPDATE action
    other than NO ACTION/RESTRICT removed where the key holds tenant_id ("SET NULL, SET DEFAULT or CASCADE is not
    supported in ON UPDATE operation when distribution key included in the foreign constraint"). Returns the
    definition and the action it removed (None: unchanged). The runbook's own (tenant_id, …) keys carry ON UPDATE
    CASCADE from 04_constrain, for children to follow a parent moved to another tenant; on Citus a row's tenant_id
    cannot change ("modifying the partition value of rows is not allowed"), so nothing is left to cascade."""
    definition = re.sub(r"\s+NOT VALID\s*$", "", definition)
    cols = re.match(r"FOREIGN KEY \(([^)]*)\)", definition)
    found = ON_UPDATE_ACTION.search(definition)
    if not found or not cols or TENANT_COLUMN not in [c.strip().strip('"') for c in cols.group(1).split(",")]:
        return definition, None
    return definition[:found.start()] + definition[found.end():], f"ON UPDATE {found.group(1)}"


ON_DELETE_SETS = re.compile(r"\sON DELETE SET (NULL|DEFAULT)\b")
SET_NULL_TODO = ("change the application's foreign key (the one without tenant_id, whose ON DELETE 04_constrain's "
                 "(tenant_id, …) twin copies) to ON DELETE CASCADE, RESTRICT or NO ACTION, or set the column NULL in "
                 "the application before the delete, then re-run 04_constrain and 07_distribute; Citus: \"SET NULL or "
                 "SET DEFAULT is not supported in ON DELETE operation when distribution key is included in the foreign "
                 "key constraint\", with a column list too")


def delete_sets_null(definition: str) -> bool:
    """A foreign key holding tenant_id whose ON DELETE sets columns (NULL or DEFAULT): Citus refuses to create it
    between distributed tables, so 07 would fail re-adding it after every table was distributed."""
    cols = re.match(r"FOREIGN KEY \(([^)]*)\)", definition)
    return bool(cols and ON_DELETE_SETS.search(definition)
                and TENANT_COLUMN in [c.strip().strip('"') for c in cols.group(1).split(",")])


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
