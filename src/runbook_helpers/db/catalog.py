"""Read-only catalog queries: the state of each spec table, as dataclasses and DataFrames.

Everything here only reads. Tables are looked up by (schema, name) as bound values, so names that need
quoting (mixed case, spaces, non-ASCII) work without any string building.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from .names import TENANT_COLUMN
from .sqltext import render


@dataclass
class TableState:
    schema: str
    name: str
    exists: bool = False
    oid: int | None = None
    relkind: str | None = None
    is_partition: bool = False
    owner: str | None = None
    can_alter: bool = False
    estimated_rows: int = 0
    size_bytes: int = 0
    pk_columns: list[str] = field(default_factory=list)
    pk_types: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    # tenant_id
    has_column: bool = False
    column_type: str | None = None
    not_null: bool = False
    default: str | None = None
    # the runbook's temporary CHECK (tenant_id IS NOT NULL)
    check_name: str | None = None
    check_valid: bool = False
    # FK tenant_id -> tenants(id)
    fk_name: str | None = None
    fk_valid: bool = False
    # index led by tenant_id
    index_name: str | None = None
    index_valid: bool = False
    invalid_tenant_indexes: list[str] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)
    row_update_triggers: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    rls_enabled: bool = False
    rls_forced: bool = False

    @property
    def qualified(self) -> sql.Composed:
        return sql.Identifier(self.schema, self.name)

    @property
    def partitioned(self) -> bool:
        return self.relkind == "p"


TABLE_SQL = text("""
SELECT c.oid, c.relname, c.relkind, c.relispartition, pg_get_userbyid(c.relowner) AS owner,
       (pg_has_role(current_user, c.relowner, 'USAGE')
        OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)) AS can_alter,
       CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(greatest(l.reltuples, 0)), 0) FROM pg_partition_tree(
              c.oid::regclass) t JOIN pg_class l ON l.oid = t.relid WHERE t.isleaf)
            ELSE greatest(c.reltuples, 0) END::bigint AS estimated_rows,  -- a partitioned table: its partitions'
       CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0) FROM
              pg_partition_tree(c.oid::regclass) t) ELSE pg_total_relation_size(c.oid) END AS size_bytes,
       c.relrowsecurity, c.relforcerowsecurity
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :schema AND c.relname = ANY(:names) AND c.relkind IN ('r', 'p')
""")

COLUMNS_SQL = text("""
SELECT a.attrelid AS rel, a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid) AS default_expr
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = ANY(:oids) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
""")

PK_SQL = text("""
SELECT con.conrelid AS rel, a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_constraint con
CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
WHERE con.conrelid = ANY(:oids) AND con.contype = 'p'
ORDER BY con.conrelid, k.ord
""")

CONSTRAINTS_SQL = text("""
SELECT con.conrelid AS rel, con.conname, con.contype, con.convalidated, pg_get_constraintdef(con.oid) AS def,
       con.confrelid::regclass::text AS ref_table,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS cols,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum) AS ref_cols,
       con.confrelid
FROM pg_constraint con WHERE con.conrelid = ANY(:oids)
ORDER BY con.conrelid, con.contypid, con.conname
""")

INDEXES_SQL = text("""
SELECT i.indrelid AS rel, ic.relname AS name, i.indisvalid, i.indisready, i.indisunique, i.indisprimary,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
          LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) AS cols,
       i.indpred IS NOT NULL AS partial
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = ANY(:oids)
ORDER BY i.indrelid, ic.relname
""")

TRIGGERS_SQL = text("""
SELECT t.tgrelid AS rel, t.tgname, (t.tgtype & 1) = 1 AS for_each_row, (t.tgtype & 2) = 2 AS before,
       (t.tgtype & 16) = 16 AS on_update
FROM pg_trigger t WHERE t.tgrelid = ANY(:oids) AND NOT t.tgisinternal ORDER BY t.tgrelid, t.tgname
""")

VIEWS_SQL = text("""
SELECT DISTINCT d.refobjid AS rel, v.oid::regclass::text AS view
FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
WHERE d.refobjid = ANY(:oids) AND d.classid = 'pg_rewrite'::regclass AND v.oid <> d.refobjid
ORDER BY 1, 2
""")


def table_state(conn: Connection, schema: str, name: str, tenants_oid: int | None = None) -> TableState:
    return table_states(conn, schema, [name], tenants_oid)[name]


def table_states(conn: Connection, schema: str, names: list[str], tenants_oid: int | None = None
                 ) -> dict[str, TableState]:
    """The state of each named table, read with one query per catalog for all of them (a phase reads every spec
    table's state before each decision: per table, that was seven round trips each time)."""
    states = {name: TableState(schema=schema, name=name) for name in names}
    by_oid: dict[int, TableState] = {}
    for row in conn.execute(TABLE_SQL, {"schema": schema, "names": list(names)}).mappings():
        state = states[row["relname"]]
        state.exists = True
        state.oid = row["oid"]
        state.relkind = row["relkind"]
        state.is_partition = row["relispartition"]
        state.owner = row["owner"]
        state.can_alter = bool(row["can_alter"])
        state.estimated_rows = row["estimated_rows"]
        state.size_bytes = row["size_bytes"]
        state.rls_enabled = row["relrowsecurity"]
        state.rls_forced = row["relforcerowsecurity"]
        by_oid[state.oid] = state
    if not by_oid:
        return states
    params = {"oids": list(by_oid)}

    for col in conn.execute(COLUMNS_SQL, params).mappings():
        state = by_oid[col["rel"]]
        state.columns.append(col["attname"])
        if col["attname"] == TENANT_COLUMN:
            state.has_column = True
            state.column_type = col["type"]
            state.not_null = col["attnotnull"]
            state.default = col["default_expr"]
    for rel, attname, typ in conn.execute(PK_SQL, params):
        by_oid[rel].pk_columns.append(attname)
        by_oid[rel].pk_types.append(typ)

    for con in conn.execute(CONSTRAINTS_SQL, params).mappings():
        state = by_oid[con["rel"]]
        cols = list(con["cols"] or [])
        if con["contype"] == "c" and _is_not_null_check(con["def"]):
            state.check_name, state.check_valid = con["conname"], con["convalidated"]
        if (con["contype"] == "f" and cols == [TENANT_COLUMN] and list(con["ref_cols"] or []) == ["id"]
                and (tenants_oid is None or con["confrelid"] == tenants_oid)):
            if state.fk_name is None or con["convalidated"]:
                state.fk_name, state.fk_valid = con["conname"], con["convalidated"]

    for idx in conn.execute(INDEXES_SQL, params).mappings():
        state = by_oid[idx["rel"]]
        cols = list(idx["cols"] or [])
        if cols[:1] == [TENANT_COLUMN] and not idx["partial"]:
            if not idx["indisvalid"]:
                state.invalid_tenant_indexes.append(idx["name"])
            elif state.index_name is None:
                state.index_name, state.index_valid = idx["name"], True

    for trig in conn.execute(TRIGGERS_SQL, params).mappings():
        state = by_oid[trig["rel"]]
        state.triggers.append(trig["tgname"])
        if trig["for_each_row"] and trig["before"] and trig["on_update"]:
            state.row_update_triggers.append(trig["tgname"])
    for rel, view in conn.execute(VIEWS_SQL, params):
        by_oid[rel].views.append(view)
    return states


def can_skip_triggers(conn: Connection) -> bool:
    """Whether this role may SET session_replication_role = replica (superuser, or granted SET on it in 15+),
    which keeps the application's row triggers from firing on the backfill's own updates."""
    return bool(conn.exec_driver_sql(
        "SELECT rolsuper OR (current_setting('server_version_num')::int >= 150000 "
        "AND has_parameter_privilege('session_replication_role', 'SET')) FROM pg_roles WHERE rolname = current_user"
    ).scalar())


def tenant_foreign_keys(conn: Connection, oid: int) -> list[str]:
    """Foreign keys on or to this table that include tenant_id: the backfill must not skip their checks."""
    return [r[0] for r in conn.exec_driver_sql(
        "SELECT con.conname FROM pg_constraint con WHERE con.contype = 'f' AND ("
        " (con.conrelid = %(oid)s AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = con.conrelid"
        "   AND a.attnum = ANY(con.conkey) AND a.attname = %(col)s))"
        " OR (con.confrelid = %(oid)s AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = con.confrelid"
        "   AND a.attnum = ANY(con.confkey) AND a.attname = %(col)s))) ORDER BY 1",
        {"oid": oid, "col": TENANT_COLUMN}).all()]


def _is_not_null_check(definition: str) -> bool:
    normalized = " ".join(definition.replace("(", " ").replace(")", " ").split()).lower()
    return normalized.startswith(f"check {TENANT_COLUMN} is not null")


def partition_parent(conn: Connection, oid: int) -> str | None:
    """The table a partition is a partition of."""
    return conn.execute(text("SELECT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = CAST(:oid AS oid)"),
                        {"oid": oid}).scalar()


def relation_oid(conn: Connection, schema: str, name: str) -> int | None:
    return conn.execute(text(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = :schema AND c.relname = :name"), {"schema": schema, "name": name}).scalar()


def system_tenant_id(conn: Connection, schema: str, uuid: str) -> int | None:
    """The id of the tenant with this uuid (the System Tenant's fixed one), or None before seed created it
    (or when tenants has another shape, which seed reports)."""
    from sqlalchemy.exc import DBAPIError

    if relation_oid(conn, schema, "tenants") is None:
        return None
    query = sql.SQL("SELECT id FROM {} WHERE uuid = %s::uuid").format(sql.Identifier(schema, "tenants"))
    try:
        return conn.exec_driver_sql(render(conn, query), (str(uuid),)).scalar()
    except DBAPIError:
        return None


def schema_exists(conn: Connection, schema: str) -> bool:
    return bool(conn.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": schema}).scalar())


def server_version_num(conn: Connection) -> int:
    return int(conn.execute(text("SELECT current_setting('server_version_num')")).scalar())


def exact_count(conn: Connection, schema: str, table: str, where: sql.Composable | None = None) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
    if where is not None:
        query = query + sql.SQL(" WHERE ") + where
    return int(conn.exec_driver_sql(render(conn, query)).scalar())


def null_tenant_count(conn: Connection, schema: str, table: str) -> int:
    return exact_count(conn, schema, table, sql.SQL("{} IS NULL").format(sql.Identifier(TENANT_COLUMN)))


def count_rows(conn: Connection, state: TableState, exact_below: int) -> tuple[int, str]:
    """Rows of a table: exact below the threshold, the planner's estimate above it (and says which)."""
    if state.estimated_rows < exact_below:
        return exact_count(conn, state.schema, state.name), "exact"
    return state.estimated_rows, "estimate"


UNIQUE_SQL = text("""
SELECT c.relname AS table, ic.relname AS name,
       CASE WHEN con.contype = 'p' THEN 'primary key' WHEN con.oid IS NOT NULL THEN 'unique constraint'
            ELSE 'unique index' END AS kind,
       (i.indnatts = 1 OR (c.relkind = 'p' AND
          (SELECT array_agg(a.attname) FROM unnest((i.indkey::int2[])[1:]) k(attnum)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
          <@ (SELECT array_agg(a.attname) FROM pg_partition_tree(i.indrelid) t
                JOIN pg_partitioned_table pt ON pt.partrelid = t.relid CROSS JOIN unnest(pt.partattrs::int2[]) k(attnum)
                JOIN pg_attribute a ON a.attrelid = t.relid AND a.attnum = k.attnum)))
         -- one column, or one and the partition keys (of every level) PostgreSQL requires in a partitioned
         -- table's every unique key
         AND (con.contype = 'p' OR (SELECT format_type(a.atttypid, a.atttypmod) = 'uuid'
          FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0])) AS global_id,
       (SELECT string_agg(fk.conname, ', ') FROM pg_constraint fk JOIN pg_class pc ON pc.oid = fk.confrelid
          WHERE fk.conrelid = i.indrelid AND fk.contype = 'f' AND pc.relname = ANY(:tables)
            AND pc.relnamespace = n.oid AND fk.conkey <@ i.indkey::int2[]) AS scoped_by,
       (SELECT string_agg(coalesce(a.attname, '(expression)'), ', ' ORDER BY k.ord)
          FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
          LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) AS columns
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class ic ON ic.oid = i.indexrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
WHERE n.nspname = :schema AND c.relname = ANY(:tables) AND i.indisunique
  AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indrelid
                  AND a.attnum = ANY(i.indkey) AND a.attname = :col)
ORDER BY c.relname, ic.relname
""")


def unique_without_tenant(conn: Connection, schema: str, tables: list[str]) -> pd.DataFrame:
    """Unique constraints and indexes that do not include tenant_id: uniqueness stays global."""
    rows = conn.execute(UNIQUE_SQL, {"schema": schema, "tables": tables, "col": TENANT_COLUMN}).mappings().all()
    frame = pd.DataFrame(rows, columns=["table", "name", "kind", "columns", "global_id", "scoped_by"])
    frame["assessment"] = [
        "global identifier: stays unique across tenants, as it should" if g else
        (f"scoped by its parent ({by}): a parent row belongs to one tenant, so this is unique within it"
         if isinstance(by, str) and by else
         "business key: unique across ALL tenants; the application team decides whether to add tenant_id")
        for g, by in zip(frame["global_id"], frame["scoped_by"])]
    return frame.drop(columns=["global_id", "scoped_by"])


INVALID_INDEXES_SQL = text("""
SELECT c.relname AS table, ic.relname AS index
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE n.nspname = :schema AND c.relname = ANY(:tables) AND NOT i.indisvalid
ORDER BY 1, 2
""")


def invalid_indexes(conn: Connection, schema: str, tables: list[str]) -> pd.DataFrame:
    rows = conn.execute(INVALID_INDEXES_SQL, {"schema": schema, "tables": tables}).mappings().all()
    return pd.DataFrame(rows, columns=["table", "index"])


SESSIONS_SQL = text("""
SELECT a.pid, a.usename AS "user", a.application_name, a.state,
       date_trunc('second', now() - a.xact_start) AS transaction_age,
       left(a.query, 200) AS query,
       string_agg(DISTINCT c.relname || ':' || l.mode, ', ')
         FILTER (WHERE n.nspname = :schema AND c.relname = ANY(:tables)) AS locks
FROM pg_stat_activity a
LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'relation' AND l.granted
LEFT JOIN pg_class c ON c.oid = l.relation
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.pid <> pg_backend_pid() AND a.datname = current_database()
  AND a.application_name NOT LIKE :ours
GROUP BY a.pid, a.usename, a.application_name, a.state, a.xact_start, a.query
HAVING count(*) FILTER (WHERE n.nspname = :schema AND c.relname = ANY(:tables)) > 0
    OR (a.xact_start IS NOT NULL AND now() - a.xact_start > make_interval(secs => :threshold))
ORDER BY transaction_age DESC NULLS LAST
""")


def sessions_in_the_way(conn: Connection, schema: str, tables: list[str], threshold_s: int,
                        own_application: str) -> pd.DataFrame:
    """Sessions holding locks on spec tables, or with transactions open longer than the threshold."""
    rows = conn.execute(SESSIONS_SQL, {"schema": schema, "tables": tables, "threshold": threshold_s,
                                       "ours": own_application + "%"}).mappings().all()
    return pd.DataFrame(rows, columns=["pid", "user", "application_name", "state", "transaction_age", "query", "locks"])


BLOCKERS_SQL = text("""
SELECT a.pid, a.usename AS "user", a.application_name, a.state,
       date_trunc('second', now() - coalesce(a.xact_start, a.query_start)) AS age, left(a.query, 200) AS query
FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(:pid))
ORDER BY a.pid
""")


def blocking_sessions(conn: Connection, pid: int) -> list[dict]:
    """Who blocks backend `pid` right now (pg_blocking_pids), with their query and transaction age."""
    return [dict(r) for r in conn.execute(BLOCKERS_SQL, {"pid": pid}).mappings()]


def has_schema_create(conn: Connection, schema: str) -> bool:
    return bool(conn.execute(text("SELECT has_schema_privilege(:s, 'CREATE')"), {"s": schema}).scalar())


def has_database_create(conn: Connection) -> bool:
    return bool(conn.execute(text("SELECT has_database_privilege(current_database(), 'CREATE')")).scalar())


# --- foreign keys between spec tables ---------------------------------------------------------------

@dataclass
class ForeignKey:
    name: str
    child: str
    parent: str
    cols: list[str]
    ref_cols: list[str]
    validated: bool
    on_delete: str = "a"
    on_update: str = "a"
    deferrable: bool = False
    deferred: bool = False
    # the key columns of the parent's unique index the key uses (its primary key or another unique key), in the
    # index's order: PostgreSQL matches a foreign key's columns to a unique key in any order
    ref_key: list[str] = field(default_factory=list)

    def actions(self, on_update: str | None = None) -> sql.Composable:
        """The same ON DELETE / ON UPDATE / DEFERRABLE as this key (ON UPDATE as given, if given); SET NULL and
        SET DEFAULT name their columns, so tenant_id itself is never nulled."""
        words = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
        cols = sql.SQL(" ({})").format(sql.SQL(", ").join(map(sql.Identifier, self.cols)))
        delete = sql.SQL(" ON DELETE " + words[self.on_delete]) + (cols if self.on_delete in "nd" else sql.SQL(""))
        update = sql.SQL(" ON UPDATE " + words[on_update or self.on_update])
        defer = sql.SQL(" DEFERRABLE INITIALLY " + ("DEFERRED" if self.deferred else "IMMEDIATE")) if self.deferrable \
            else sql.SQL("")
        return delete + update + defer


FKS_SQL = text("""
SELECT con.conname, c.relname AS child, p.relname AS parent, con.convalidated, con.confdeltype, con.confupdtype,
       con.condeferrable, con.condeferred,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS cols,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum) AS ref_cols,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_index i
          CROSS JOIN unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indexrelid = con.conindid AND k.ord <= i.indnkeyatts) AS ref_key
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_class p ON p.oid = con.confrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND n.nspname = :schema AND c.relname = ANY(:tables) AND p.relname = ANY(:tables)
ORDER BY c.relname, con.conname
""")


def foreign_keys(conn: Connection, schema: str, tables: list[str]) -> list[ForeignKey]:
    return [ForeignKey(r["conname"], r["child"], r["parent"], list(r["cols"]), list(r["ref_cols"]), r["convalidated"],
                       r["confdeltype"], r["confupdtype"], r["condeferrable"], r["condeferred"],
                       list(r["ref_key"] or []))
            for r in conn.execute(FKS_SQL, {"schema": schema, "tables": tables}).mappings()]



# --- every table of a schema, and the foreign keys between its tables -------------------------------

@dataclass
class SchemaTable:
    name: str
    extension: str | None  # the extension that owns it (PostGIS's spatial_ref_sys), None: the application's
    readable: bool         # whether this role may SELECT from it (count(*) needs it)


SCHEMA_TABLES_SQL = text("""
SELECT c.relname AS name, e.extname AS extension, has_table_privilege(c.oid, 'SELECT') AS readable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
LEFT JOIN pg_extension e ON e.oid = d.refobjid
WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
""")


def schema_tables(conn: Connection, schema: str) -> list[SchemaTable]:
    """Every table of the schema: a partitioned table once, as itself (its partitions are its rows); views,
    materialized views and foreign tables are not tables here."""
    return [SchemaTable(r["name"], r["extension"], bool(r["readable"]))
            for r in conn.execute(SCHEMA_TABLES_SQL, {"schema": schema}).mappings()]


TOUCHING_FKS_SQL = text("""
SELECT con.conname, c.relname AS child, p.relname AS parent, con.convalidated,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS cols,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum) AS ref_cols
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_class p ON p.oid = con.confrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND n.nspname = :schema AND p.relnamespace = n.oid
  AND c.oid <> p.oid AND (c.relname = ANY(:tables) OR p.relname = ANY(:tables))
ORDER BY c.relname, con.conname
""")


def foreign_keys_touching(conn: Connection, schema: str, tables: list[str]) -> list[ForeignKey]:
    """Foreign keys between two tables of the schema of which either is one of `tables`: each once, as declared
    (not the copies PostgreSQL keeps on partitions), a table's references to itself left out."""
    return [ForeignKey(r["conname"], r["child"], r["parent"], list(r["cols"]), list(r["ref_cols"]), r["convalidated"])
            for r in conn.execute(TOUCHING_FKS_SQL, {"schema": schema, "tables": list(tables)}).mappings()]


REFERENCING_SQL = text("""
SELECT c.relname, bool_or(con.confdeltype IN ('c', 'n', 'd')) AS writes
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
WHERE con.contype = 'f' AND con.confrelid = to_regclass(:qualified) AND con.conrelid <> con.confrelid
  AND con.conparentid = 0
GROUP BY 1 ORDER BY 1
""")


def delete_locks(conn: Connection, schema: str, table: str) -> list[tuple[str, str]]:
    """What a DELETE from `table` locks in the tables whose foreign keys reference it: ROW EXCLUSIVE where the
    key cascades or sets NULL/DEFAULT (it writes their rows), else ROW SHARE (it checks them FOR KEY SHARE)."""
    qualified = '"{}"."{}"'.format(schema.replace('"', '""'), table.replace('"', '""'))
    return [(r.relname, "ROW EXCLUSIVE" if r.writes else "ROW SHARE")
            for r in conn.execute(REFERENCING_SQL, {"qualified": qualified})]
