"""The isolation suite: attacks on tenant isolation, run as the application role, leaving nothing behind.

Two probe tenants (A, B) are created next to the System Tenant and committed (the probing role's connections,
on Citus its connections to the workers, must see them; they are deleted at the end, and a killed run's are
recognised by their fixed uuids and removed by the next). Then one transaction, rolled back at the end, belongs
to the application role from its first statement (SET LOCAL ROLE): it writes its own probe rows, copies of
existing rows in every tenant table under each probe tenant's setting, and each case tries to read or write
what it must not, in its own savepoint, reporting expected, actual and passed. Nothing in it is done as another
user: Citus refuses a query on placements that another user modified in the same transaction. The owner cases
run in transactions of the table owner's own, which writes its probe rows itself; two cases need real
transactions (a pooled connection reused after a tenant's transaction; a session that never set the tenant) and
use a second connection that only reads. On Citus the application role must be able to log in on the workers
(Citus connects as the current user): a NOLOGIN role is reported, not probed.

Probe rows are copies of existing rows with fresh keys: every column of every unique or primary key gets a
new value (its sequence or identity where it has one, otherwise one of the right type: past the maximum for
numbers and dates, gen_random_uuid() for uuid, a suffix for text), and every foreign key to another tenant
table points at a probe row of the same probe tenant. The rows to copy are read beforehand by the migration role
(the probing role sees no other tenant's rows) and written as VALUES. An empty table has none: the suite makes
one instead (probe_templates: a value of each NOT NULL column's type that meets the table's CHECK constraints and
partition bounds, defaults taken, foreign keys to the probe tenant's own parents, made in the same way and inserted
first), so no table goes unprobed for being empty; a pooled-connection case, which reads committed rows, runs
on a table that has some. Where no such copy can be inserted (a
CHECK, an enum in a key, a trigger), existing rows without children are moved to the probe tenants instead
(deleted under their tenant and inserted again under the probe tenant's, same keys), inside the same rolled-back
transaction. A table where neither works says why ("cannot run: …"): that fails validate unless
rls.isolation_accept accepts it with a reason, as rls.lint_accept does for lint findings.

A negative control reads as the table owner with FORCE switched off: with tenant A set it must see tenant B's
rows too, which proves the probes would notice a leak. pytest removes each protection in turn and watches its case go red.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pandas as pd
import psycopg
from psycopg import sql

from ..db import catalog
from ..db.names import TENANT_COLUMN
from . import probe_templates, rls

COLUMNS = ["case", "table", "expected", "actual", "passed"]


@dataclass
class Column:
    name: str
    type: str
    has_default: bool        # a default that yields a new value per row: a sequence, identity, a uuid generator
    in_unique: bool          # in a unique index or the primary key (as a column or inside an expression)
    category: str = "X"      # pg_type.typcategory: N numeric, S string, D date/time, …
    max_length: int | None = None
    in_fk: bool = False      # in a foreign key of this table: it points at a parent, it is not made fresh
    nullable: bool = True
    identity: str = ""       # pg_attribute.attidentity: 'a' GENERATED ALWAYS, 'd' BY DEFAULT
    default_expr: str | None = None  # its DEFAULT as PostgreSQL prints it (a row made for an empty table takes it)
    top: Any = None          # the column's maximum, where fresh values go past it


FRESH_ROWS, EXISTING_ROWS = "fresh rows", "existing rows"


@dataclass
class Table:
    name: str
    ident: sql.Composed
    pk: list[str]
    columns: list[Column]
    owner: str
    rows: dict[str, list[tuple]] = field(default_factory=dict)  # probe tenant label -> primary keys
    values: dict[str, list[dict[str, str | None]]] = field(default_factory=dict)  # label -> every column as text
    problem: str | None = None
    mode: str = FRESH_ROWS   # how its probe rows came to be: inserted copies, or existing rows moved to the probe
    templates: list[dict[str, str | None]] = field(default_factory=list)  # rows to copy, every column as text
    candidates: list[tuple[tuple, int]] = field(default_factory=list)  # (key, tenant) of rows nothing references
    made: bool = False       # the table was empty: its template is a row the suite made (probe_templates)
    no_template: str = "the table has no row to copy"  # why templates is empty, where it is
    distributed: bool = False  # a Citus table distributed by tenant_id (pg_dist_partition, hash)


COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod),
       a.attidentity <> '' OR coalesce(pg_get_expr(d.adbin, d.adrelid) ~* '(nextval|gen_random_uuid|uuid_generate)',
                                       false),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisunique
               AND (a.attnum = ANY(i.indkey) OR EXISTS (
                    SELECT 1 FROM pg_depend dep WHERE dep.classid = 'pg_class'::regclass AND dep.objid = i.indexrelid
                    AND dep.refobjid = a.attrelid AND dep.refobjsubid = a.attnum))),
       t.typcategory::text,
       CASE WHEN a.atttypid IN ('varchar'::regtype, 'bpchar'::regtype) AND a.atttypmod > 4 THEN a.atttypmod - 4 END,
       EXISTS (SELECT 1 FROM pg_constraint f WHERE f.conrelid = a.attrelid AND f.contype = 'f'
               AND a.attnum = ANY(f.conkey)),
       NOT a.attnotnull, a.attidentity::text, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum
"""
FRESH_GAP = 1000  # fresh numbers and dates start this far past the maximum, clear of the application's next ones


class Suite:
    def __init__(self, rb):
        self.rb = rb
        self.p = rb.params
        self.setting = self.p.rls.setting
        self.role = self.p.rls.app_role
        self.results: list[dict[str, Any]] = []
        self.fresh_count = 0
        self.citus = False  # Citus, with a table on the workers (run() asks)

    # -- helpers
    def set_setting(self, cur, value: str) -> None:
        """The tenant setting as the application sends it (rls.set_tenant's statements: SET LOCAL, on Citus after
        citus.propagate_set_commands = 'local'), with any text as the value: the garbage cases send garbage."""
        conn = cur if isinstance(cur, psycopg.Connection) else cur.connection
        for statement in rls.tenant_setting_statements(self.setting, value, rls.has_citus(conn)):
            cur.execute(statement)

    def add(self, case: str, table: str, expected: Any, actual: Any, passed: bool) -> None:
        self.results.append({"case": case, "table": table, "expected": str(expected), "actual": str(actual),
                             "passed": bool(passed)})

    def as_app(self, conn: psycopg.Connection, tenant: str | None, statement, args=None, *, raw: bool = False):
        """Run one statement as the application role with `tenant` set ('' or garbage allowed), in a savepoint
        that is rolled back. Returns ("rows", value) or ("error", sqlstate, message)."""
        with conn.cursor() as cur:
            cur.execute("SAVEPOINT probe")
            try:
                cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(self.role)))
                if tenant is not None:
                    self.set_setting(cur, tenant)
                cur.execute(statement, args)
                value = cur.rowcount if raw else (cur.fetchone()[0] if cur.description else cur.rowcount)
                return ("rows", value)
            except psycopg.Error as exc:
                return ("error", exc.sqlstate, (exc.diag.message_primary or str(exc)).splitlines()[0])
            finally:
                cur.execute("ROLLBACK TO SAVEPOINT probe")

    @staticmethod
    def describe(outcome) -> str:
        if outcome[0] == "rows":
            return f"{outcome[1]} rows"
        return f"error {outcome[1]}: {outcome[2]}"

    def pk_where(self, table: Table, key: tuple) -> tuple[sql.Composed, list]:
        cond = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in table.pk)
        return cond, list(key)

    # -- setup, as the migration role (which bypasses RLS)
    def tables(self, conn: psycopg.Connection) -> list[Table]:
        out = []
        distributed = {r[0] for r in conn.execute(
            "SELECT logicalrelid::oid FROM pg_dist_partition WHERE partmethod = 'h'").fetchall()} \
            if rls.has_citus(conn) and conn.execute("SELECT to_regclass('pg_dist_partition')").fetchone()[0] else set()
        for name in self.p.tables:
            oid = conn.execute("SELECT c.oid, pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON "
                               "n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                               (self.rb.schema, name)).fetchone()
            cols = [Column(*r) for r in conn.execute(COLUMNS_SQL, (oid[0],)).fetchall()]
            for col in cols:
                if self._needs_fresh(col) and col.category in ("N", "D"):
                    col.top = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(
                        sql.Identifier(col.name), sql.Identifier(self.rb.schema, name))).fetchone()[0]
            pk = conn.execute("SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c CROSS JOIN LATERAL "
                              "unnest(c.conkey) WITH ORDINALITY k(attnum, ord) JOIN pg_attribute a ON a.attrelid = "
                              "c.conrelid AND a.attnum = k.attnum WHERE c.conrelid = %s AND c.contype = 'p'",
                              (oid[0],)).fetchone()[0]
            # a table without a primary key is probed by the physical row address instead
            table = Table(name, sql.Identifier(self.rb.schema, name), list(pk or ["ctid"]), cols, oid[1],
                          distributed=oid[0] in distributed)
            order = sql.SQL(", ").join(sql.Identifier(c) for c in table.pk)
            cur = conn.execute(sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 2").format(
                self.returning(table), table.ident, order))
            table.templates = [self.row_of(table, r)[1] for r in text_rows(cur)]
            if not table.templates:
                self.make_template(conn, oid[0], table)
            table.candidates = [(tuple(r[:-1]), r[-1]) for r in conn.execute(self.unreferenced(table)).fetchall()]
            out.append(table)
        return out

    def make_template(self, conn: psycopg.Connection, oid: int, table: Table) -> None:
        """A template of the suite's own making for an empty table, so that it is probed like any other (its copies
        get fresh keys, their foreign keys point at the probe tenant's parents); the fresh numbers and dates of its
        keys count up from the made values. Where no row can be made, no_template says why."""
        try:
            template = probe_templates.made_template(conn, oid, table.columns, self.rb.schema, list(self.p.tables))
        except LookupError as exc:
            table.no_template = f"the table has no row to copy, and no row could be made for it: {exc}"
            return
        table.templates, table.made = [template], True
        for col in table.columns:
            if self._needs_fresh(col) and col.category in ("N", "D") and template.get(col.name) is not None:
                col.top = conn.execute(sql.SQL("SELECT {}").format(self.literal(col, template))).fetchone()[0]

    def unreferenced(self, table: Table, limit: int = 16) -> sql.Composed:
        """Keys and tenants of rows that no row of a tenant table references (for probes through existing rows).
        Anti-joins on tenant_id and the key, not correlated subqueries: Citus joins colocated shards."""
        joins, empty = [], []
        for i, fk in enumerate(fk for fk in self.fks if fk.parent == table.name):
            ref = sql.Identifier(f"ref{i}")
            on = [sql.SQL("{}.{} = t.{}").format(ref, sql.Identifier(c), sql.Identifier(r))
                  for c, r in zip(fk.cols, fk.ref_cols)]
            if TENANT_COLUMN not in fk.cols:
                on.insert(0, sql.SQL("{}.{c} = t.{c}").format(ref, c=sql.Identifier(TENANT_COLUMN)))
            joins.append(sql.SQL("LEFT JOIN {} AS {} ON {}").format(
                sql.Identifier(self.rb.schema, fk.child), ref, sql.SQL(" AND ").join(on)))
            empty.append(sql.SQL("{}.{} IS NULL").format(ref, sql.Identifier(fk.cols[0])))
        keys = sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(c)) for c in table.pk)
        return sql.SQL("SELECT DISTINCT {k}, t.{c} FROM {t} AS t {j} WHERE {w} ORDER BY {k} LIMIT {n}").format(
            k=keys, c=sql.Identifier(TENANT_COLUMN), t=table.ident, j=sql.SQL(" ").join(joins),
            w=sql.SQL(" AND ").join(empty) if empty else sql.SQL("true"), n=sql.Literal(limit))

    @staticmethod
    def _needs_fresh(col: Column) -> bool:
        """A key column that a copy must not repeat: foreign key columns point at parents instead, and tenant_id
        is always given."""
        return col.in_unique and not col.in_fk and col.name != TENANT_COLUMN

    def fresh_value(self, col: Column, template: dict[str, str | None]) -> sql.Composable | None:
        """A new value of the column's type for a copy (None: the column's default gives one, or the type has no
        generator and the copy repeats the value). Numbers and dates are literals computed up front, as the
        migration role: under row level security a max() would see one tenant's rows only."""
        self.fresh_count += 1
        step = FRESH_GAP + self.fresh_count
        if col.has_default:
            return None
        if col.type == "uuid":
            return sql.SQL("gen_random_uuid()")
        if col.category == "N":
            top = col.top if col.top is not None else 0
            return sql.Literal((Decimal(top) if not isinstance(top, int) else top) + step)
        if col.category == "D" and isinstance(col.top, (dt.datetime, dt.date)):
            delta = dt.timedelta(days=step) if not isinstance(col.top, dt.datetime) else dt.timedelta(seconds=step)
            return sql.Literal(col.top + delta)
        if col.category == "S":
            tag = sql.SQL("md5(gen_random_uuid()::text)")
            original = sql.SQL("{}::text").format(sql.Literal(template.get(col.name)))
            if col.max_length is None:
                return sql.SQL("{} || ' probe ' || {}").format(original, tag)
            keep = max(col.max_length - 9, 0)
            return sql.SQL("left(left({}, {}) || '~' || {}, {})").format(
                original, sql.Literal(keep), tag, sql.Literal(col.max_length))
        return None

    def returning(self, table: Table) -> sql.Composed:
        """Every column (the primary key first), for the probe's keys and its children's references, read as
        text by text_rows. The columns themselves, not `col::text`: a cast to text is not IMMUTABLE for every type
        (timestamptz's depends on the session's TimeZone and DateStyle), and Citus refuses non-IMMUTABLE functions
        in the RETURNING clause of a distributed table ("non-IMMUTABLE functions are not allowed in the RETURNING
        clause"), which left every probe of the distributed demo unable to run."""
        names = list(dict.fromkeys(table.pk + [c.name for c in table.columns]))
        return sql.SQL(", ").join(sql.Identifier(c) for c in names)

    def row_of(self, table: Table, row: tuple) -> tuple[tuple, dict[str, str | None]]:
        names = list(dict.fromkeys(table.pk + [c.name for c in table.columns]))
        values = dict(zip(names, row))
        return tuple(values[c] for c in table.pk), values

    @staticmethod
    def literal(col: Column, template: dict[str, str | None]) -> sql.Composed:
        """The template row's value of the column, as a literal of the column's type (format_type's name)."""
        return sql.SQL("{}::{}").format(sql.Literal(template.get(col.name)), sql.SQL(col.type))

    def clone_sql(self, table: Table, template: dict[str, str | None], overrides: dict[str, sql.Composable],
                  fresh: bool = True) -> sql.Composed:
        """INSERT a copy of one row (its values as text, read beforehand), with fresh keys (fresh_value) and the
        values the test gives (fresh=False: the same keys, for a row moved by deleting and re-inserting it). A VALUES list, not INSERT … SELECT: the writer (the probing role, under row level
        security) cannot read the template row, which belongs to another tenant. A column the template leaves out
        (a row made for an empty table holds only the columns that need a value) takes its default."""
        targets, values, always = [], [], False
        for col in table.columns:
            ident = sql.Identifier(col.name)
            if col.name in overrides:
                value = overrides[col.name]
            elif col.name not in template:
                continue
            elif fresh and self._needs_fresh(col):
                value = self.fresh_value(col, template)
                if value is None and col.has_default:
                    continue  # serial ids and the like: take the next value
                value = value if value is not None else self.literal(col, template)
            else:
                value = self.literal(col, template)
            targets.append(ident)
            values.append(value)
            always = always or col.identity == "a"
        return sql.SQL("INSERT INTO {t} ({cols}) {override}VALUES ({vals}) RETURNING {ret}").format(
            t=table.ident, cols=sql.SQL(", ").join(targets), vals=sql.SQL(", ").join(values),
            override=sql.SQL("OVERRIDING SYSTEM VALUE " if always else ""), ret=self.returning(table))

    def parent_overrides(self, table: Table, by_name: dict[str, Table], label: str, copy: int
                         ) -> dict[str, sql.Composable]:
        """Foreign key columns pointing at a probe row of the same probe tenant (copy k at parent row k), or NULL
        where the parent has none yet (a self-reference's first row) and the columns allow it. Raises LookupError
        when a parent without probe rows leaves no valid value."""
        overrides: dict[str, sql.Composable] = {}
        nullable = {c.name: c.nullable for c in table.columns}
        for fk in self.fks:
            if fk.child != table.name or fk.parent not in by_name:
                continue
            parent_rows = by_name[fk.parent].values.get(label) or []
            cols = [(c, r) for c, r in zip(fk.cols, fk.ref_cols) if c != TENANT_COLUMN]
            if parent_rows:
                ref = parent_rows[copy % len(parent_rows)]
                for col, ref_col in cols:
                    overrides[col] = sql.Literal(ref[ref_col])
            elif all(nullable[c] for c, _ in cols):
                for col, _ in cols:
                    overrides.setdefault(col, sql.NULL)
            else:
                raise LookupError(f"its parent {fk.parent} has no probe rows ({fk.name})")
        return overrides

    def seed_probe_rows(self, conn: psycopg.Connection, tables: list[Table], tenants: dict[str, int]) -> None:
        """Two rows per probe tenant in every tenant table, parents first; children point at their own tenant's
        parents. Fresh copies where they can be inserted, else existing rows moved to the probe tenants."""
        by_name = {t.name: t for t in tables}
        for name in _parents_first([t.name for t in tables], self.fks):
            table = by_name[name]
            with conn.cursor() as cur:
                cur.execute("SAVEPOINT seed_table")
                try:
                    self._fresh_rows(cur, table, by_name, tenants)
                    cur.execute("RELEASE SAVEPOINT seed_table")
                    continue
                except (psycopg.Error, LookupError) as exc:
                    cur.execute("ROLLBACK TO SAVEPOINT seed_table")
                    fresh_error = _first_line(exc)
                try:
                    self._existing_rows(cur, table, by_name, tenants)
                    cur.execute("RELEASE SAVEPOINT seed_table")
                    table.mode = EXISTING_ROWS
                except (psycopg.Error, LookupError) as exc:
                    cur.execute("ROLLBACK TO SAVEPOINT seed_table")
                    table.rows, table.values = {}, {}
                    table.problem = (f"cannot run: no fresh copy could be inserted ({fresh_error}) and no existing "
                                     f"rows could be moved to the probe tenants ({_first_line(exc)})")

    def _keep(self, table: Table, label: str, row) -> None:
        if row is None:
            raise LookupError("the table has no row to copy")
        key, values = self.row_of(table, tuple(row))
        table.rows[label].append(key)
        table.values[label].append(values)

    def _fresh_rows(self, cur, table: Table, by_name: dict[str, Table], tenants: dict[str, int]) -> None:
        table.rows, table.values = {}, {}
        for label in ("A", "B"):
            table.rows[label], table.values[label] = [], []
            self.set_setting(cur, str(tenants[label]))  # the writer's own tenant: its policies let the row in
            for copy in range(2):
                if not table.templates:
                    raise LookupError(table.no_template)
                overrides = {TENANT_COLUMN: sql.Literal(tenants[label]),
                             **self.parent_overrides(table, by_name, label, copy)}
                # one row to copy is enough: every copy gets fresh keys
                cur.execute(self.clone_sql(table, table.templates[copy % len(table.templates)], overrides))
                self._keep(table, label, next(iter(text_rows(cur)), None))

    def _existing_rows(self, cur, table: Table, by_name: dict[str, Table], tenants: dict[str, int]) -> None:
        """Four existing rows that no row references, moved to the probe tenants (two each) with their foreign
        keys pointing at the probe tenant's parents: deleted under their own tenant and inserted again, same keys,
        under the probe tenant's (the writer's policies allow no UPDATE from one tenant to another). Rows the
        application holds locked are skipped, not waited for; the move is rolled back with everything else."""
        table.rows, table.values = {"A": [], "B": []}, {"A": [], "B": []}
        moved = 0
        for key, tenant in table.candidates:
            if moved == 4:
                break
            where, args = self.pk_where(table, key)
            self.set_setting(cur, str(tenant))
            cur.execute(sql.SQL("SELECT 1 FROM {} WHERE ").format(table.ident) + where + sql.SQL(
                " FOR UPDATE SKIP LOCKED"), args)
            if cur.fetchone() is None:
                continue
            cur.execute(sql.SQL("DELETE FROM {} WHERE ").format(table.ident) + where + sql.SQL(" RETURNING ")
                        + self.returning(table), args)
            _, values = self.row_of(table, text_rows(cur)[0])
            label = "A" if moved < 2 else "B"
            self.set_setting(cur, str(tenants[label]))
            sets = {TENANT_COLUMN: sql.Literal(tenants[label]),
                    **self.parent_overrides(table, by_name, label, moved % 2)}
            cur.execute(self.clone_sql(table, values, sets, fresh=False))
            self._keep(table, label, next(iter(text_rows(cur)), None))
            moved += 1
        if moved < 4:
            raise LookupError(f"{moved} rows that no other row references (4 needed)")

    # -- the transactions
    @contextmanager
    def transaction_as(self, role: str):
        """A transaction in which `role` does everything, from its first statement: Citus refuses a query on
        placements another user modified in the same transaction ("cannot perform query on placements that were
        modified in this transaction by a different user"), so no probe writes as the migration role and then reads
        as another. Always rolled back."""
        raw = self.rb.engine.raw_connection()
        conn: psycopg.Connection = raw.driver_connection
        try:
            conn.autocommit = False
            conn.execute("SET LOCAL lock_timeout = %s" % int(self.p.locks.lock_timeout_ms))
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            yield conn
        finally:
            try:
                conn.rollback()
            finally:
                raw.close()

    def probe_tenant_uuids(self) -> dict[str, uuid.UUID]:
        """Fixed per System Tenant, so a run that was killed leaves tenants the next run recognises and removes."""
        return {label: uuid.uuid5(PROBE_NAMESPACE, f"{self.p.system_tenant.uuid}:{label}") for label in ("A", "B")}

    def create_probe_tenants(self) -> dict[str, int]:
        """The two probe tenants, committed (by the migration role, the only one that may write tenants): the
        probing role's own connections, on Citus its connections to the workers, must see them. They own no row
        outside the rolled-back probe transactions; remove_probe_tenants deletes them afterwards."""
        self.remove_probe_tenants()
        tenants_table = sql.Identifier(self.rb.schema, "tenants")
        out = {}
        with self.rb.engine.begin() as committed:
            conn: psycopg.Connection = committed.connection.driver_connection
            for label, key in self.probe_tenant_uuids().items():
                out[label] = conn.execute(sql.SQL("INSERT INTO {} (uuid, name) VALUES (%s, %s) RETURNING id").format(
                    tenants_table), (key, f"isolation probe {label}")).fetchone()[0]
            self.missing_tenant = conn.execute(sql.SQL("SELECT coalesce(max(id), 0) + 1000 FROM {}").format(
                tenants_table)).fetchone()[0]
        return out

    def remove_probe_tenants(self) -> None:
        with self.rb.engine.begin() as committed:
            committed.connection.driver_connection.execute(sql.SQL("DELETE FROM {} WHERE uuid = ANY(%s)").format(
                sql.Identifier(self.rb.schema, "tenants")), (list(self.probe_tenant_uuids().values()),))

    # -- the cases
    def run(self) -> pd.DataFrame:
        with self.rb.engine.connect() as catalog_conn:
            self.fks = catalog.foreign_keys(catalog_conn, self.rb.schema, self.p.tables)
            system = catalog.system_tenant_id(catalog_conn, self.rb.schema, self.p.system_tenant.uuid)
            # the workers matter once a table lives on them: before 07_distribute the coordinator answers alone
            # (07's preflight asks for the login before it distributes anything)
            citus = self.citus = rls.has_citus(catalog_conn) and catalog_conn.exec_driver_sql(
                "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL").scalar() and \
                catalog_conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition)").scalar()
            can_login = catalog_conn.exec_driver_sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s",
                                                     (self.role,)).scalar()
            tables = self.tables(catalog_conn.connection.driver_connection)  # as the migration role: every row
        if citus and not can_login:
            self.add(WORKER_LOGIN, self.role, "a role that can log in on every node",
                     f"cannot run: {self.role} is NOLOGIN, and Citus opens its connections to the workers as the "
                     f"current user (ALTER ROLE {self.role} LOGIN, and let the coordinator authenticate as it on the "
                     "workers: pg_hba.conf there, a .pgpass or certificate in citus.node_conninfo)", False)
            return accept(pd.DataFrame(self.results, columns=COLUMNS), self.p.rls.isolation_accept)
        try:
            tenants = {**self.create_probe_tenants(), "S": system}
            with self.transaction_as(self.role) as conn:
                self.seed_probe_rows(conn, tables, tenants)
                self.set_setting(conn, "")  # the probe rows' tenant cleared: every case sets its own
                for table in tables:
                    if table.problem:
                        self.add(PROBE_ROWS, table.name, "2 per probe tenant", table.problem, False)
                        continue
                    self.add(PROBE_ROWS, table.name, "2 per probe tenant", f"2 per probe tenant ({self.how(table)})",
                             True)
                    self.table_cases(conn, table, tenants)
                usable = [t for t in tables if not t.problem]
                if usable:
                    fresh = [t for t in usable if t.mode == FRESH_ROWS] or usable
                    self.setting_cases(conn, usable[0], tenants)
                    self.upsert_case(conn, fresh[0], tenants)
                    self.copy_case(conn, usable[0], tenants)
                    self.child_case(conn, tables, tenants)
            if usable:
                self.owner_cases(usable[0], tables, tenants)
                self.pooled_case(([t for t in usable if not t.made] or usable)[0], tenants)
        finally:
            self.remove_probe_tenants()
        return accept(pd.DataFrame(self.results, columns=COLUMNS), self.p.rls.isolation_accept)

    @staticmethod
    def how(table: Table) -> str:
        """How the table's probe rows came to be, for the probe rows case's result."""
        if table.mode != FRESH_ROWS:
            return "existing rows moved to the probe tenants"
        return "made for the empty table, with fresh keys" if table.made else "copies with fresh keys"

    def count(self, table: Table, where: sql.Composable | None = None) -> sql.Composed:
        q = sql.SQL("SELECT count(*) FROM {}").format(table.ident)
        return q + sql.SQL(" WHERE ") + where if where is not None else q

    def table_cases(self, conn, table: Table, t: dict[str, int]) -> None:
        a, b, s = str(t["A"]), t["B"], t["S"]
        own = self.as_app(conn, a, self.count(table))
        self.add("tenant sees exactly its own rows", table.name, "2 rows", self.describe(own), own == ("rows", 2))
        where, args = self.pk_where(table, table.rows["B"][0])
        out = self.as_app(conn, a, self.count(table, where), args)
        self.add("cross-tenant SELECT by key", table.name, "0 rows", self.describe(out), out == ("rows", 0))
        out = self.as_app(conn, a, sql.SQL("UPDATE {} SET {} = {} WHERE ").format(
            table.ident, sql.Identifier(TENANT_COLUMN), sql.Identifier(TENANT_COLUMN)) + where, args, raw=True)
        self.add("cross-tenant UPDATE by key", table.name, "0 rows", self.describe(out), out == ("rows", 0))
        out = self.as_app(conn, a, sql.SQL("DELETE FROM {} WHERE ").format(table.ident) + where, args, raw=True)
        self.add("cross-tenant DELETE by key", table.name, "0 rows", self.describe(out), out == ("rows", 0))
        src = table.values["A"][0]  # tenant A's first probe row, copied
        out = self.as_app(conn, a, self.clone_sql(table, src, {TENANT_COLUMN: sql.Literal(b)}))
        self.add("INSERT with another tenant's id", table.name, "error 42501 (row level security)", self.describe(out),
                 out[0] == "error" and out[1] == "42501")
        # No WHERE clause on purpose: a WHERE reads columns, which makes PostgreSQL check the new row against
        # the SELECT policy too and hides a missing WITH CHECK on the UPDATE policy.
        out = self.as_app(conn, a, sql.SQL("UPDATE {} SET {} = %s").format(
            table.ident, sql.Identifier(TENANT_COLUMN)), [b], raw=True)
        if table.distributed:  # Citus refuses it before the policies are asked: no row of it changes tenant
            self.add("UPDATE moving a row to another tenant", table.name,
                     f"error 42501 (row level security) or, distributed by {TENANT_COLUMN}, "
                     f"0A000 (Citus: {MOVE_REFUSED})",
                     self.describe(out), out[0] == "error" and (out[1] == "42501" or (
                         out[1] == "0A000" and out[2].startswith(MOVE_REFUSED))))
        else:
            self.add("UPDATE moving a row to another tenant", table.name, "error 42501 (row level security)",
                     self.describe(out), out[0] == "error" and out[1] == "42501")
        out = self.as_app(conn, a, sql.SQL("UPDATE {} SET {} = {} WHERE {} = %s").format(
            table.ident, sql.Identifier(TENANT_COLUMN), sql.Identifier(TENANT_COLUMN), sql.Identifier(TENANT_COLUMN)),
            [s], raw=True)
        deleted = self.as_app(conn, a, sql.SQL("DELETE FROM {} WHERE {} = %s").format(
            table.ident, sql.Identifier(TENANT_COLUMN)), [s], raw=True)
        inserted = self.as_app(conn, a, self.clone_sql(table, src, {TENANT_COLUMN: sql.Literal(s)}))
        ok = out == ("rows", 0) and deleted == ("rows", 0) and inserted[0] == "error" and inserted[1] == "42501"
        self.add("System Tenant rows not writable by a tenant", table.name,
                 "UPDATE 0 rows, DELETE 0 rows, INSERT error 42501",
                 f"UPDATE {self.describe(out)}, DELETE {self.describe(deleted)}, INSERT {self.describe(inserted)}", ok)

    def setting_cases(self, conn, table: Table, t: dict[str, int]) -> None:
        missing = str(self.missing_tenant)
        for label, value, expect_error in (("setting empty", "", False), ("setting garbage 'abc'", "abc", True),
                                           ("setting garbage '1 OR 1=1'", "1 OR 1=1", True),
                                           ("setting '-1'", "-1", False),
                                           ("setting an id that does not exist", missing, False)):
            out = self.as_app(conn, value, self.count(table))
            if expect_error:
                ok = out[0] == "error" and out[1] == "22P02"
                expected = "error 22P02 (no rows, fails closed)"
            else:
                ok = out == ("rows", 0)
                expected = "0 rows, no error"
            self.add(label, table.name, expected, self.describe(out), ok)
        with conn.cursor() as cur:  # SET LOCAL in a savepoint that is rolled back leaves '' behind
            cur.execute("SAVEPOINT revert")
            self.set_setting(cur, str(t["A"]))
            cur.execute("ROLLBACK TO SAVEPOINT revert")
        out = self.as_app(conn, None, self.count(table))
        self.add("setting reverted after SET LOCAL", table.name, "0 rows, no error", self.describe(out),
                 out == ("rows", 0))

    def upsert_case(self, conn, table: Table, t: dict[str, int]) -> None:
        b_key = dict(zip(table.pk, table.rows["B"][0]))
        src = table.values["A"][0]  # tenant A's first probe row, copied
        overrides = {c: sql.Literal(v) for c, v in b_key.items() if c != TENANT_COLUMN}
        overrides[TENANT_COLUMN] = sql.Literal(t["A"])
        insert = self.clone_sql(table, src, overrides)
        text = insert.as_string(conn)
        conflict = sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {} = EXCLUDED.{}").format(
            sql.SQL(", ").join(map(sql.Identifier, table.pk)), sql.Identifier(TENANT_COLUMN),
            sql.Identifier(TENANT_COLUMN)).as_string(conn)
        text = re.sub(r" RETURNING .*$", conflict, text)
        before = self._row_text(conn, table, table.rows["B"][0], t["B"])
        out = self.as_app(conn, str(t["A"]), text, raw=True)
        after = self._row_text(conn, table, table.rows["B"][0], t["B"])
        self.add("INSERT … ON CONFLICT DO UPDATE onto another tenant's key", table.name,
                 "the other tenant's row unchanged", f"{self.describe(out)}; other tenant's row "
                 f"{'unchanged' if before == after else 'CHANGED'}", before == after and before is not None)

    def _row_text(self, conn, table: Table, key: tuple, tenant: int) -> str | None:
        """The row as its own tenant sees it (the probe transaction is the probing role's alone)."""
        where, args = self.pk_where(table, key)
        out = self.as_app(conn, str(tenant), sql.SQL("SELECT (SELECT t::text FROM {} t WHERE ").format(table.ident)
                          + where + sql.SQL(")"), args)
        return out[1] if out[0] == "rows" else None

    def copy_case(self, conn, table: Table, t: dict[str, int]) -> None:
        with conn.cursor() as cur:
            cur.execute("SAVEPOINT copy")
            try:
                cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(self.role)))
                self.set_setting(cur, str(t["A"]))
                lines = 0
                with cur.copy(sql.SQL("COPY {} TO STDOUT").format(table.ident)) as copy:
                    for _ in copy.rows():
                        lines += 1
                out = f"{lines} rows"
                ok = lines == 2
            except psycopg.Error as exc:
                out, ok = f"error {exc.sqlstate}", False
            finally:
                cur.execute("ROLLBACK TO SAVEPOINT copy")
        self.add("COPY … TO exports only the tenant's rows", table.name, "2 rows", out, ok)

    def child_case(self, conn, tables: list[Table], t: dict[str, int]) -> None:
        by_name = {x.name: x for x in tables}
        # an accepted cross-tenant reference (cross_tenant.foreign_keys, wins: child) may point across tenants
        between = [fk for fk in self.fks if fk.parent in by_name and fk.child in by_name and fk.parent != fk.child
                   and self.p.cross_tenant.accepted(fk.child, fk.name) is None]
        fks = [fk for fk in between if not by_name[fk.child].problem and not by_name[fk.parent].problem]
        if not fks:
            if between:
                fk = between[0]
                self.add(CHILD_CASE, f"{fk.child} -> {fk.parent}", "error 23503 (foreign key includes tenant_id)",
                         "cannot run: no foreign key between tenant tables whose both sides have probe rows", False)
            return
        # a key whose columns are part of the child's primary key (a membership table keyed (account_id, person_id))
        # would give the probe row a key another row may hold: 23505 before the foreign key is ever checked
        fk = min(fks, key=lambda f: (bool(set(f.cols) & set(by_name[f.child].pk) - {TENANT_COLUMN}),
                                     by_name[f.child].mode != FRESH_ROWS))
        child, parent = by_name[fk.child], by_name[fk.parent]
        b_parent = parent.values["B"][0]
        refs = {col: sql.Literal(b_parent[ref]) for col, ref in zip(fk.cols, fk.ref_cols) if col != TENANT_COLUMN}
        if child.mode == FRESH_ROWS:
            src = child.values["A"][0]
            statement, args = self.clone_sql(child, src, {TENANT_COLUMN: sql.Literal(t["A"]), **refs}), None
        else:  # through an existing row: tenant A's own row pointed at tenant B's parent
            where, args = self.pk_where(child, child.rows["A"][0])
            statement = sql.SQL("UPDATE {} SET {} WHERE ").format(child.ident, sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(c), v) for c, v in refs.items())) + where
        out = self.as_app(conn, str(t["A"]), statement, args, raw=child.mode != FRESH_ROWS)
        self.add(CHILD_CASE, f"{child.name} -> {parent.name}",
                 "error 23503 (foreign key includes tenant_id)", self.describe(out),
                 out[0] == "error" and out[1] == "23503")

    def owner_cases(self, table: Table, tables: list[Table], t: dict[str, int]) -> None:
        with self.rb.engine.connect() as catalog_conn:
            bypass, can_login = catalog_conn.exec_driver_sql(
                "SELECT rolsuper OR rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = %s", (table.owner,)).one()
        if self.citus and not can_login:  # its transactions reach the workers as the owner
            why = (f"cannot run: the table owner {table.owner} is NOLOGIN, and Citus opens its connections to the "
                   f"workers as the current user (ALTER ROLE {table.owner} LOGIN, and let the coordinator authenticate "
                   "as it on the workers: pg_hba.conf there, a .pgpass or certificate in citus.node_conninfo)")
            self.add("table owner isolated too (FORCE)", table.name, "2 rows", why, False)
            self.add("negative control: owner without FORCE sees both tenants' rows", table.name, "4 rows", why, False)
            return
        if not bypass:
            out = self._as_owner(table, tables, t, force=True)
            self.add("table owner isolated too (FORCE)", table.name, "2 rows", self.describe(out), out == ("rows", 2))
        else:
            self.add("table owner isolated too (FORCE)", table.name, "an owner subject to RLS",
                     f"owner {table.owner} bypasses RLS (superuser or BYPASSRLS); see the lint", table.owner in
                     set(self.p.rls.bypass_roles) | {self.rb.identity.user})
        probes = sql.SQL("{} IN ({}, {})").format(sql.Identifier(TENANT_COLUMN), sql.Literal(t["A"]),
                                                    sql.Literal(t["B"]))
        out = self._as_owner(table, tables, t, force=False, where=probes)
        self.add("negative control: owner without FORCE sees both tenants' rows", table.name, "4 rows",
                 self.describe(out), out == ("rows", 4))

    def _as_owner(self, table: Table, tables: list[Table], t: dict[str, int], force: bool,
                  where: sql.Composable | None = None):
        """Counts as the table owner with tenant A set, in a transaction of the owner's own: it writes its probe
        rows itself (the table's and its parents'), and switches FORCE off itself for the control, first, before
        any row is written. The control counts only the probe tenants' rows: they are the probe's own (a live
        application cannot change the figure) and the count is quick while ALTER TABLE … NO FORCE holds the table."""
        wanted = {table.name}
        while True:  # the table and every tenant table it points at, their parents too
            more = {fk.parent for fk in self.fks if fk.child in wanted and fk.parent in {x.name for x in tables}}
            if more <= wanted:
                break
            wanted |= more
        mine = [dataclasses.replace(x, rows={}, values={}, problem=None, mode=FRESH_ROWS)
                for x in tables if x.name in wanted]
        with self.transaction_as(table.owner) as conn, conn.cursor() as cur:
            try:
                if not force:
                    cur.execute(sql.SQL("ALTER TABLE {} NO FORCE ROW LEVEL SECURITY").format(table.ident))
                self.seed_probe_rows(conn, mine, t)
                problem = next((x.problem for x in mine if x.problem), None)
                if problem:
                    return ("error", "probe rows", problem)
                self.set_setting(cur, str(t["A"]))
                cur.execute(self.count(table, where))
                return ("rows", cur.fetchone()[0])
            except psycopg.Error as exc:
                return ("error", exc.sqlstate, exc.diag.message_primary)

    def pooled_case(self, table: Table, t: dict[str, int]) -> None:
        """Real transactions on a fresh connection (reads only): a tenant's setting must not outlive its
        transaction, and a session that never set the tenant sees nothing. The connection comes from a pool of
        its own: one from the session's pool may have set the tenant before (a reverted setting reads '', not
        NULL), and the case would no longer see what a brand-new session sees. It reads committed rows, so it runs
        on a table that has some (run() picks one); where every tenant table is empty, it says it cannot run rather
        than pass on nothing."""
        if table.made:
            why = ("cannot run: every tenant table is empty, and this case reads rows committed under a tenant (the "
                   "probe rows never are)")
            self.add("setting never set in this session", table.name, "0 rows, no error", why, False)
            self.add(POOLED_CASE, table.name, "the tenant's rows inside its transaction, 0 rows after", why, False)
            return
        pool = self.rb.engine.pool.recreate()
        raw = pool.connect()
        conn: psycopg.Connection = raw.driver_connection
        try:
            # the tenant with the most rows in the table (the probe rows are gone with their transaction; the
            # System Tenant may own none of them once the legacy mapping has moved every row to its org)
            busiest = conn.execute(sql.SQL("SELECT {c} FROM {t} GROUP BY {c} ORDER BY count(*) DESC, {c} LIMIT 1").format(
                c=sql.Identifier(TENANT_COLUMN), t=table.ident)).fetchone()
            conn.rollback()
            tenant = busiest[0] if busiest else t["S"]
            conn.autocommit = False
            role = sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(self.role))
            conn.execute(role)
            never = conn.execute(self.count(table)).fetchone()[0]
            conn.rollback()
            self.add("setting never set in this session", table.name, "0 rows, no error", f"{never} rows", never == 0)
            conn.execute(role)
            self.set_setting(conn, str(tenant))
            during = conn.execute(self.count(table)).fetchone()[0]
            conn.commit()
            conn.execute(role)
            after = conn.execute(self.count(table)).fetchone()[0]
            conn.rollback()
            self.add(POOLED_CASE, table.name, "the tenant's rows inside its transaction, 0 rows after",
                     f"{during} rows inside, {after} rows after", during > 0 and after == 0)
        except psycopg.Error as exc:
            self.add(POOLED_CASE, table.name, "no error",
                     f"error {exc.sqlstate}: {exc.diag.message_primary}", False)
        finally:
            try:
                conn.rollback()
            finally:
                raw.close()
                pool.dispose()


PROBE_ROWS = "probe rows created"
WORKER_LOGIN = "application role can reach the Citus workers"
PROBE_NAMESPACE = uuid.UUID("6f0b1c3e-2b7a-5d4e-9a61-0c2f4e8d7b15")  # uuid5 namespace of the probe tenants' uuids
MOVE_REFUSED = "modifying the partition value of rows is not allowed"
CHILD_CASE = "child row referencing another tenant's parent"
POOLED_CASE = "pooled connection reused after a tenant's transaction"
ISOLATION_PREFIX = "isolation "  # validate prints a failed case as "isolation <case> [<table>]"


def text_rows(cur: psycopg.Cursor) -> list[tuple[str | None, ...]]:
    """The rows of the cursor's last result as PostgreSQL printed them (its text output, what `col::text` gives
    for nearly every type, and what a `'…'::type` literal reads back), without converting them to Python values."""
    res = cur.pgresult
    if res is None:
        return []
    encoding = cur.connection.info.encoding
    return [tuple(None if (v := res.get_value(r, c)) is None else bytes(v).decode(encoding)
                  for c in range(res.nfields)) for r in range(res.ntuples)]


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return exc.diag.message_primary.splitlines()[0]
    return (str(exc) or type(exc).__name__).splitlines()[0]


def accept(results: pd.DataFrame, accepted) -> pd.DataFrame:
    """A case that cannot run passes where params accept it (rls.isolation_accept: case, table, reason); a case
    that ran and failed is never accepted."""
    for item in accepted:
        mask = (results["case"].isin(case_spellings(item.case)) & (results["table"] == item.table) & ~results["passed"]
                & results["actual"].str.startswith("cannot run:"))
        results.loc[mask, "actual"] = results.loc[mask, "actual"] + f" (accepted: {item.reason})"
        results.loc[mask, "passed"] = True
    return results


def case_spellings(case: str) -> set[str]:
    """The case an acceptance names, as the suite names it and as validate's failure prints it ("isolation probe
    rows created [T]"): a user copies the failure's words into params, and both spellings mean the one case."""
    return {case, case.removeprefix(ISOLATION_PREFIX)}


def _parents_first(tables: list[str], fks) -> list[str]:
    parents = {t: {fk.parent for fk in fks if fk.child == t and fk.parent != t and fk.parent in tables} for t in tables}
    ordered: list[str] = []
    while len(ordered) < len(tables):
        ready = [t for t in tables if t not in ordered and parents[t] <= set(ordered)]
        if not ready:  # a cycle: take the rest as they come
            ready = [t for t in tables if t not in ordered]
        ordered.extend(ready)
    return ordered


def run(rb) -> pd.DataFrame:
    """The whole suite; requires row level security to be enabled (constrain with rls.enabled)."""
    return Suite(rb).run()


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """Passed and failed per case (deterministic: for nbval)."""
    grouped = results.groupby("case", sort=False)["passed"].agg(passed="sum", total="count").reset_index()
    grouped["failed"] = grouped["total"] - grouped["passed"]
    return grouped[["case", "passed", "failed"]]
