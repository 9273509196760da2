"""Distribution readiness (for sharding by tenant_id, e.g. Citus) and the opt-in composite-key step.

A sharded PostgreSQL co-locates rows by tenant_id, so every primary key, unique key and foreign key
between tenant tables must include it; shared tables become reference tables; ids must not run out.
The report says what is ready. With distribution.composite_keys, constrain makes it so, online:

  1. CREATE UNIQUE INDEX CONCURRENTLY on (tenant_id, <primary key>)   SHARE UPDATE EXCLUSIVE
  2. per foreign key between tenant tables: ADD … FOREIGN KEY (tenant_id, <cols>) REFERENCES
     parent (tenant_id, <key>) NOT VALID, VALIDATE it, then DROP the old one      brief / no write block
  3. swap the primary key: DROP CONSTRAINT <pkey>, ADD CONSTRAINT <pkey> PRIMARY KEY USING INDEX
     (one statement; metadata only: the index exists and the columns are NOT NULL)   brief ACCESS EXCLUSIVE

A composite foreign key also closes a hole row level security leaves open: referential checks bypass
RLS, so with a plain FK a tenant can point a child row at another tenant's parent.
"""

from __future__ import annotations

import pandas as pd
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..db import catalog
from ..db.ddl import ACCESS_EXCLUSIVE_META, SHARE_ROW_EXCLUSIVE_META, SHARE_UPDATE_EXCLUSIVE, UNDO_PHASE, Step
from ..db.names import TENANT_COLUMN, truncate

PHASE = "constrain"


def composite_fk_name(fk: catalog.ForeignKey) -> str:
    return truncate(f"{fk.child}_{TENANT_COLUMN}_{'_'.join(fk.cols)}_{fk.parent}_fk")


def composite_index_name(table: str) -> str:
    return truncate(f"{table}_{TENANT_COLUMN}_pkey_idx")


def pk_name(conn: Connection, oid: int) -> str | None:
    return conn.execute(text("SELECT conname FROM pg_constraint WHERE conrelid = :oid AND contype = 'p'"),
                        {"oid": oid}).scalar()


def index_valid(conn: Connection, schema: str, name: str) -> bool | None:
    return conn.execute(text("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                             "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relname = :n"),
                        {"s": schema, "n": name}).scalar()


EXTERNAL_REFS_SQL = text("""
SELECT ch.relname AS child, con.conname
FROM pg_constraint con JOIN pg_class ch ON ch.oid = con.conrelid JOIN pg_namespace n ON n.oid = ch.relnamespace
WHERE con.contype = 'f' AND con.confrelid = :oid AND NOT (n.nspname = :schema AND ch.relname = ANY(:tables))
ORDER BY 1, 2
""")


def external_references(conn: Connection, schema: str, oid: int, tables: list[str]) -> list[str]:
    """Foreign keys from tables outside the spec that reference this table: they depend on its primary key,
    which therefore cannot be swapped for (tenant_id, ...) without dropping them."""
    return [f"{r.child}.{r.conname}" for r in conn.execute(
        EXTERNAL_REFS_SQL, {"oid": oid, "schema": schema, "tables": tables})]


def unique_index_steps(phase: str, conn: Connection, st, index: str, cols: list[str]) -> list[Step]:
    """A unique index on `cols` built CONCURRENTLY, unless a valid one of that name exists; an INVALID leftover
    of an interrupted build is dropped first, and a failed build drops what it left."""
    drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(st.schema, index))
    valid = index_valid(conn, st.schema, index)
    out: list[Step] = []
    if valid is False:
        out.append(Step(phase, st.name, f"drop INVALID index {index} left by an interrupted build", drop,
                        SHARE_UPDATE_EXCLUSIVE, "CONCURRENTLY: reads and writes continue", transactional=False))
    if not valid:
        out.append(Step(phase, st.name, f"build the unique index on ({', '.join(cols)})",
                        sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} ({})").format(
                            sql.Identifier(index), st.qualified, sql.SQL(", ").join(map(sql.Identifier, cols))),
                        SHARE_UPDATE_EXCLUSIVE, "CONCURRENTLY: reads and writes continue during the build",
                        transactional=False, long_scan=True, on_failure=drop))
    return out


def steps(conn: Connection, schema: str, tables: list[str]) -> list[Step]:
    """What remains to make every primary key and tenant-table foreign key composite, from the catalog."""
    tenants_oid = catalog.relation_oid(conn, schema, "tenants")
    states = {t: catalog.table_state(conn, schema, t, tenants_oid) for t in tables}
    out: list[Step] = []
    pending_pk: dict[str, list[str]] = {}
    for name, st in states.items():
        if not st.exists or not st.pk_columns or TENANT_COLUMN in st.pk_columns:
            continue
        cols = [TENANT_COLUMN] + st.pk_columns
        pending_pk[name] = st.pk_columns
        out += unique_index_steps(PHASE, conn, st, composite_index_name(name), cols)
    fks = catalog.foreign_keys(conn, schema, tables)
    names = {f.name: f for f in fks}
    planned_validation: set[str] = set()
    for fk in fks:
        if TENANT_COLUMN in fk.cols:
            continue
        parent = states.get(fk.parent)
        if parent is None or fk.ref_cols != parent.pk_columns:
            continue  # not a reference to a tenant table's primary key: the readiness report lists it
        composite = composite_fk_name(fk)
        child = sql.Identifier(schema, fk.child)
        if composite not in names:
            out.append(Step(PHASE, fk.child, f"add {composite} NOT VALID",
                            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}){} NOT VALID").format(
                                child, sql.Identifier(composite),
                                sql.SQL(", ").join(map(sql.Identifier, [TENANT_COLUMN] + fk.cols)),
                                sql.Identifier(schema, fk.parent),
                                sql.SQL(", ").join(map(sql.Identifier, [TENANT_COLUMN] + fk.ref_cols)), fk.actions()),
                            SHARE_ROW_EXCLUSIVE_META, "NOT VALID skips the scan; new writes are checked at once"))
        if composite not in names or not names[composite].validated:
            planned_validation.add(composite)
            out.append(Step(PHASE, fk.child, f"validate {composite}",
                            sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(child, sql.Identifier(composite)),
                            SHARE_UPDATE_EXCLUSIVE, "scans without blocking reads or writes", long_scan=True))
        out.append(Step(PHASE, fk.child, f"drop {fk.name} (replaced by {composite})",
                        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(child, sql.Identifier(fk.name)),
                        ACCESS_EXCLUSIVE_META, "catalog change only; the composite key now enforces the reference"))
    for fk in fks:  # a composite key left NOT VALID by an interrupted run whose old key is already gone
        if TENANT_COLUMN in fk.cols and not fk.validated and fk.name not in planned_validation:
            out.append(Step(PHASE, fk.child, f"validate {fk.name}",
                            sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                                sql.Identifier(schema, fk.child), sql.Identifier(fk.name)),
                            SHARE_UPDATE_EXCLUSIVE, "scans without blocking reads or writes", long_scan=True))
    for name, pk_cols in pending_pk.items():
        st = states[name]
        if external_references(conn, schema, st.oid, tables):
            continue  # the primary key stays; (tenant_id, ...) is a unique index the composite keys reference.
            # distribution_readiness names the references that hold it.
        current = pk_name(conn, st.oid)
        out.append(Step(PHASE, name, f"make the primary key ({TENANT_COLUMN}, {', '.join(pk_cols)})",
                        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}, ADD CONSTRAINT {} PRIMARY KEY USING INDEX {}").format(
                            st.qualified, sql.Identifier(current), sql.Identifier(current),
                            sql.Identifier(composite_index_name(name))),
                        ACCESS_EXCLUSIVE_META, "one statement, no scan: the unique index exists and both columns are "
                        "NOT NULL"))
    return out


def undo_steps(conn: Connection, schema: str, states: dict, before: dict[str, dict]) -> list[Step]:
    """The original primary keys and foreign keys between tenant tables, where the composite-key step
    replaced them (`before`: each table's recorded constraints and key columns). The primary key comes back
    through a unique index built CONCURRENTLY and one swap; each foreign key NOT VALID, then VALIDATE."""
    out: list[Step] = []
    current_fks = {fk.name: fk for fk in catalog.foreign_keys(conn, schema, list(states))}
    swaps = []
    for name, st in states.items():
        legacy_pk = next((c for c in before[name]["constraints"] if c["contype"] == "p"), None)
        if legacy_pk is None or not st.pk_columns or st.pk_columns == before[name]["key_columns"]:
            continue
        index = truncate(f"{legacy_pk['conname']}_restore")
        out += unique_index_steps(UNDO_PHASE, conn, st, index, before[name]["key_columns"])
        current_pk = pk_name(conn, st.oid)
        swaps.append(Step(UNDO_PHASE, name, f"restore the primary key {legacy_pk['conname']}",
                          sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}, ADD CONSTRAINT {} PRIMARY KEY USING INDEX {}").format(
                              st.qualified, sql.Identifier(current_pk), sql.Identifier(legacy_pk["conname"]),
                              sql.Identifier(index)), ACCESS_EXCLUSIVE_META, "one statement, no scan"))
    for name, st in states.items():
        for con in before[name]["constraints"]:
            if con["contype"] != "f" or con["conname"] in current_fks:
                continue
            if not any(f" REFERENCES {t}(" in con["definition"] for t in states):
                continue
            out.append(Step(UNDO_PHASE, name, f"restore {con['conname']} NOT VALID",
                            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(
                                st.qualified, sql.Identifier(con["conname"]), sql.SQL(con["definition"])),
                            SHARE_ROW_EXCLUSIVE_META, "NOT VALID skips the scan"))
            out.append(Step(UNDO_PHASE, name, f"validate {con['conname']}",
                            sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(st.qualified,
                                                                                   sql.Identifier(con["conname"])),
                            SHARE_UPDATE_EXCLUSIVE, "scans without blocking reads or writes", long_scan=True))
    recorded = {c["conname"] for t in states for c in before[t]["constraints"]}
    for fk in current_fks.values():
        if TENANT_COLUMN in fk.cols and fk.name not in recorded:
            out.append(Step(UNDO_PHASE, fk.child, f"drop {fk.name}", sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(schema, fk.child), sql.Identifier(fk.name)), ACCESS_EXCLUSIVE_META, "catalog change only"))
    return out + swaps


SEQUENCES_SQL = text("""
SELECT c.relname AS table, s.relname AS sequence, format_type(q.seqtypid, NULL) AS type
FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_sequence q ON q.seqrelid = s.oid
WHERE d.deptype IN ('a', 'i') AND n.nspname = :schema AND c.relname = ANY(:tables)
ORDER BY 1, 2
""")


def readiness(rb) -> pd.DataFrame:
    """For sharding by tenant_id: each check with what was found and whether it is ready."""
    rows: list[dict] = []
    p = rb.params

    def add(check: str, obj: str, finding: str, ready: bool) -> None:
        rows.append({"check": check, "object": obj, "finding": finding, "ready": ready})

    with rb.engine.connect() as conn:
        tenants_oid = catalog.relation_oid(conn, rb.schema, "tenants")
        for name in p.tables:
            st = catalog.table_state(conn, rb.schema, name, tenants_oid)
            if not st.exists:
                continue
            add("tenant_id is bigint", name, st.column_type or "absent (backfill adds it as bigint)",
                st.column_type in (None, "bigint"))
            held = [] if TENANT_COLUMN in st.pk_columns or not st.pk_columns else \
                external_references(conn, rb.schema, st.oid, p.tables)
            add("primary key includes tenant_id", name, f"({', '.join(st.pk_columns) or 'none'})" + (
                f"; kept by composite_keys: referenced from outside the spec by {', '.join(held)}" if held else ""),
                TENANT_COLUMN in st.pk_columns)
        for u in catalog.unique_without_tenant(conn, rb.schema, p.tables).itertuples():
            if u.kind == "primary key":
                continue
            add("unique keys include tenant_id", f"{u.table}.{u.name}", f"({u.columns})", False)
        for fk in catalog.foreign_keys(conn, rb.schema, p.tables):
            if fk.parent == "tenants":
                continue
            add("foreign keys between tenant tables include tenant_id", f"{fk.child}.{fk.name}",
                f"({', '.join(fk.cols)}) -> {fk.parent}", TENANT_COLUMN in fk.cols)
        for table in p.shared_tables:
            add("shared tables as reference tables", table, "candidate reference table (replicated to every node)",
                True)
        for r in conn.execute(SEQUENCES_SQL, {"schema": rb.schema, "tables": p.tables}).mappings():
            add("sequences are bigint", f"{r['table']}.{r['sequence']}", r["type"], r["type"] == "bigint")
    return pd.DataFrame(rows, columns=["check", "object", "finding", "ready"])
