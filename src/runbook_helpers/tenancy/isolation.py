"""The isolation suite: attacks on tenant isolation, run as the application role, leaving nothing behind.

Everything happens inside one transaction that is rolled back at the end: two probe tenants (A, B) are
created next to the System Tenant, each gets copies of existing rows in every tenant table, and then,
as the application role (SET LOCAL ROLE), each case tries to read or write what it must not. Each case
runs in its own savepoint and reports expected, actual and passed. Two cases need real transactions
(a pooled connection reused after a tenant's transaction; a session that never set the tenant) and use
a second connection that only reads.

A negative control reads as the table owner with FORCE switched off: with tenant A set it must see tenant B's
rows too, which proves the probes would notice a leak. pytest removes each protection in turn and watches its case go red.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import psycopg
from psycopg import sql

from ..db import catalog
from ..db.names import TENANT_COLUMN

COLUMNS = ["case", "table", "expected", "actual", "passed"]


@dataclass
class Column:
    name: str
    type: str
    has_default: bool
    in_unique: bool


@dataclass
class Table:
    name: str
    ident: sql.Composed
    pk: list[str]
    columns: list[Column]
    owner: str
    rows: dict[str, list[tuple]] = field(default_factory=dict)  # probe tenant label -> primary keys
    problem: str | None = None


COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atthasdef OR a.attidentity <> '',
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisunique AND a.attnum = ANY(i.indkey))
FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum
"""


class Suite:
    def __init__(self, rb):
        self.rb = rb
        self.p = rb.params
        self.setting = self.p.rls.setting
        self.role = self.p.rls.app_role
        self.results: list[dict[str, Any]] = []

    # -- helpers
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
                    cur.execute("SELECT set_config(%s, %s, true)", (self.setting, tenant))
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
        for name in self.p.tables:
            oid = conn.execute("SELECT c.oid, pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON "
                               "n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                               (self.rb.schema, name)).fetchone()
            cols = [Column(*r) for r in conn.execute(COLUMNS_SQL, (oid[0],)).fetchall()]
            pk = conn.execute("SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c CROSS JOIN LATERAL "
                              "unnest(c.conkey) WITH ORDINALITY k(attnum, ord) JOIN pg_attribute a ON a.attrelid = "
                              "c.conrelid AND a.attnum = k.attnum WHERE c.conrelid = %s AND c.contype = 'p'",
                              (oid[0],)).fetchone()[0]
            # a table without a primary key is probed by the physical row address instead
            out.append(Table(name, sql.Identifier(self.rb.schema, name), list(pk or ["ctid"]), cols, oid[1]))
        return out

    def clone_sql(self, table: Table, template_where: sql.Composable, overrides: dict[str, sql.Composable],
                  offset: int = 0) -> sql.Composed:
        """INSERT a copy of one existing row, with new values where uniqueness or the test requires."""
        targets, values = [], []
        for col in table.columns:
            ident = sql.Identifier(col.name)
            if col.name in overrides:
                value = overrides[col.name]
            elif col.in_unique and col.has_default:
                continue  # serial ids and the like: take the next value
            elif col.in_unique and col.type == "uuid":
                value = sql.SQL("gen_random_uuid()")
            elif col.in_unique and col.type in ("text", "character varying"):
                value = sql.SQL("src.{} || ' probe ' || gen_random_uuid()").format(ident)
            else:
                value = sql.SQL("src.{}").format(ident)
            targets.append(ident)
            values.append(value)
        returning = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in table.pk)
        order = sql.SQL(", ").join(sql.SQL("src.{}").format(sql.Identifier(c)) for c in table.pk)
        return sql.SQL("INSERT INTO {t} ({cols}) SELECT {vals} FROM {t} AS src WHERE {where} "
                       "ORDER BY {order} LIMIT 1 OFFSET {offset} RETURNING {ret}").format(
            t=table.ident, cols=sql.SQL(", ").join(targets), vals=sql.SQL(", ").join(values), where=template_where,
            order=order, offset=sql.Literal(offset), ret=returning)

    def seed_probe_rows(self, conn: psycopg.Connection, tables: list[Table], tenants: dict[str, int]) -> None:
        """Two rows per probe tenant in every tenant table; children point at their own tenant's parents."""
        fks = self.fks
        by_name = {t.name: t for t in tables}
        order = _parents_first([t.name for t in tables], fks)
        for name in order:
            table = by_name[name]
            for label in ("A", "B"):
                table.rows[label] = []
                for copy in range(2):
                    overrides = {TENANT_COLUMN: sql.Literal(tenants[label])}
                    for fk in fks:
                        if fk.child == name and fk.parent in by_name and by_name[fk.parent].rows.get(label):
                            parent_key = by_name[fk.parent].rows[label][0]
                            ref = dict(zip(by_name[fk.parent].pk, parent_key))
                            for col, ref_col in zip(fk.cols, fk.ref_cols):
                                if col != TENANT_COLUMN:
                                    overrides[col] = sql.Literal(ref[ref_col])
                    with conn.cursor() as cur:
                        cur.execute("SAVEPOINT seed")
                        try:
                            cur.execute(self.clone_sql(table, sql.SQL("true"), overrides, offset=copy))
                            row = cur.fetchone()
                            if row is None:
                                raise LookupError("the table has no row to copy")
                            table.rows[label].append(tuple(row))
                            cur.execute("RELEASE SAVEPOINT seed")
                        except (psycopg.Error, LookupError) as exc:
                            cur.execute("ROLLBACK TO SAVEPOINT seed")
                            table.problem = f"cannot create probe rows: {str(exc).splitlines()[0]}"
                            break
                if table.problem:
                    break

    # -- the cases
    def run(self) -> pd.DataFrame:
        with self.rb.engine.connect() as catalog_conn:
            self.fks = catalog.foreign_keys(catalog_conn, self.rb.schema, self.p.tables)
            system = catalog.system_tenant_id(catalog_conn, self.rb.schema, self.p.system_tenant.uuid)
        tables: list[Table] = []
        tenants: dict[str, int] = {}
        raw = self.rb.engine.raw_connection()
        conn: psycopg.Connection = raw.driver_connection
        try:
            conn.autocommit = False
            conn.execute("SET LOCAL lock_timeout = %s" % int(self.p.locks.lock_timeout_ms))
            a = conn.execute("INSERT INTO {} (uuid, name) VALUES (gen_random_uuid(), 'isolation probe A') "
                             "RETURNING id".format(sql.Identifier(self.rb.schema, "tenants").as_string(conn))).fetchone()[0]
            b = conn.execute("INSERT INTO {} (uuid, name) VALUES (gen_random_uuid(), 'isolation probe B') "
                             "RETURNING id".format(sql.Identifier(self.rb.schema, "tenants").as_string(conn))).fetchone()[0]
            tenants = {"A": a, "B": b, "S": system}
            tables = self.tables(conn)
            self.seed_probe_rows(conn, tables, tenants)
            for table in tables:
                if table.problem:
                    self.add("probe rows created", table.name, "2 per probe tenant", table.problem, False)
                    continue
                self.table_cases(conn, table, tenants)
            usable = [t for t in tables if not t.problem]
            if usable:
                self.setting_cases(conn, usable[0], tenants)
                self.upsert_case(conn, usable[0], tenants)
                self.copy_case(conn, usable[0], tenants)
                self.child_case(conn, tables, tenants)
                self.owner_cases(conn, usable[0], tenants)
        finally:
            try:
                conn.rollback()
            finally:
                raw.close()
        usable = [t for t in tables if not t.problem]
        if usable:
            self.pooled_case(usable[0], tenants)
        return pd.DataFrame(self.results, columns=COLUMNS)

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
        src = sql.SQL(" AND ").join(sql.SQL("src.{} = {}").format(sql.Identifier(c), sql.Literal(v))
                                    for c, v in zip(table.pk, table.rows["A"][0]))
        out = self.as_app(conn, a, self.clone_sql(table, src, {TENANT_COLUMN: sql.Literal(b)}))
        self.add("INSERT with another tenant's id", table.name, "error 42501 (row level security)", self.describe(out),
                 out[0] == "error" and out[1] == "42501")
        # No WHERE clause on purpose: a WHERE reads columns, which makes PostgreSQL check the new row against
        # the SELECT policy too and hides a missing WITH CHECK on the UPDATE policy.
        out = self.as_app(conn, a, sql.SQL("UPDATE {} SET {} = %s").format(
            table.ident, sql.Identifier(TENANT_COLUMN)), [b], raw=True)
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
        missing = str(conn.execute("SELECT coalesce(max(id), 0) + 1000 FROM {}".format(
            sql.Identifier(self.rb.schema, "tenants").as_string(conn))).fetchone()[0])
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
            cur.execute("SELECT set_config(%s, %s, true)", (self.setting, str(t["A"])))
            cur.execute("ROLLBACK TO SAVEPOINT revert")
        out = self.as_app(conn, None, self.count(table))
        self.add("setting reverted after SET LOCAL", table.name, "0 rows, no error", self.describe(out),
                 out == ("rows", 0))

    def upsert_case(self, conn, table: Table, t: dict[str, int]) -> None:
        b_key = dict(zip(table.pk, table.rows["B"][0]))
        src = sql.SQL(" AND ").join(sql.SQL("src.{} = {}").format(sql.Identifier(c), sql.Literal(v))
                                    for c, v in zip(table.pk, table.rows["A"][0]))
        overrides = {c: sql.Literal(v) for c, v in b_key.items() if c != TENANT_COLUMN}
        overrides[TENANT_COLUMN] = sql.Literal(t["A"])
        insert = self.clone_sql(table, src, overrides)
        text = insert.as_string(conn)
        conflict = sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {} = EXCLUDED.{}").format(
            sql.SQL(", ").join(map(sql.Identifier, table.pk)), sql.Identifier(TENANT_COLUMN),
            sql.Identifier(TENANT_COLUMN)).as_string(conn)
        text = re.sub(r" RETURNING .*$", conflict, text)
        before = self._row_text(conn, table, table.rows["B"][0])
        out = self.as_app(conn, str(t["A"]), text, raw=True)
        after = self._row_text(conn, table, table.rows["B"][0])
        self.add("INSERT … ON CONFLICT DO UPDATE onto another tenant's key", table.name,
                 "the other tenant's row unchanged", f"{self.describe(out)}; other tenant's row "
                 f"{'unchanged' if before == after else 'CHANGED'}", before == after and before is not None)

    def _row_text(self, conn, table: Table, key: tuple) -> str | None:
        where, args = self.pk_where(table, key)
        row = conn.execute(sql.SQL("SELECT t::text FROM {} t WHERE ").format(table.ident) + where, args).fetchone()
        return row[0] if row else None

    def copy_case(self, conn, table: Table, t: dict[str, int]) -> None:
        with conn.cursor() as cur:
            cur.execute("SAVEPOINT copy")
            try:
                cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(self.role)))
                cur.execute("SELECT set_config(%s, %s, true)", (self.setting, str(t["A"])))
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
        fks = [fk for fk in self.fks
               if fk.parent in by_name and fk.child in by_name and not by_name[fk.child].problem
               and not by_name[fk.parent].problem]
        if not fks:
            return
        fk = fks[0]
        child, parent = by_name[fk.child], by_name[fk.parent]
        b_parent = dict(zip(parent.pk, parent.rows["B"][0]))
        overrides = {TENANT_COLUMN: sql.Literal(t["A"])}
        for col, ref in zip(fk.cols, fk.ref_cols):
            if col != TENANT_COLUMN:
                overrides[col] = sql.Literal(b_parent[ref])
        src = sql.SQL(" AND ").join(sql.SQL("src.{} = {}").format(sql.Identifier(c), sql.Literal(v))
                                    for c, v in zip(child.pk, child.rows["A"][0]))
        out = self.as_app(conn, str(t["A"]), self.clone_sql(child, src, overrides))
        self.add("child row referencing another tenant's parent", f"{child.name} -> {parent.name}",
                 "error 23503 (foreign key includes tenant_id)", self.describe(out),
                 out[0] == "error" and out[1] == "23503")

    def owner_cases(self, conn, table: Table, t: dict[str, int]) -> None:
        bypass = conn.execute("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s",
                              (table.owner,)).fetchone()[0]
        if not bypass:
            out = self._as_owner(conn, table, str(t["A"]), force=True)
            self.add("table owner isolated too (FORCE)", table.name, "2 rows", self.describe(out), out == ("rows", 2))
        else:
            self.add("table owner isolated too (FORCE)", table.name, "an owner subject to RLS",
                     f"owner {table.owner} bypasses RLS (superuser or BYPASSRLS); see the lint", table.owner in
                     set(self.p.rls.bypass_roles) | {self.rb.identity.user})
        probes = sql.SQL("{} IN ({}, {})").format(sql.Identifier(TENANT_COLUMN), sql.Literal(t["A"]),
                                                    sql.Literal(t["B"]))
        out = self._as_owner(conn, table, str(t["A"]), force=False, where=probes)
        self.add("negative control: owner without FORCE sees both tenants' rows", table.name, "4 rows",
                 self.describe(out), out == ("rows", 4))

    def _as_owner(self, conn, table: Table, tenant: str, force: bool, where: sql.Composable | None = None):
        """Counts as the table owner with tenant A set. The control counts only the probe tenants' rows: they
        are the probe's own (a live application cannot change the figure) and the count is quick while
        ALTER TABLE … NO FORCE holds the table."""
        with conn.cursor() as cur:
            cur.execute("SAVEPOINT owner")
            try:
                if not force:
                    cur.execute(sql.SQL("ALTER TABLE {} NO FORCE ROW LEVEL SECURITY").format(table.ident))
                cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(table.owner)))
                cur.execute("SELECT set_config(%s, %s, true)", (self.setting, tenant))
                cur.execute(self.count(table, where))
                return ("rows", cur.fetchone()[0])
            except psycopg.Error as exc:
                return ("error", exc.sqlstate, exc.diag.message_primary)
            finally:
                cur.execute("ROLLBACK TO SAVEPOINT owner")

    def pooled_case(self, table: Table, t: dict[str, int]) -> None:
        """Real transactions on a fresh connection (reads only): a tenant's setting must not outlive its
        transaction, and a session that never set the tenant sees nothing. The connection comes from a pool of
        its own: one from the session's pool may have set the tenant before (a reverted setting reads '', not
        NULL), and the case would no longer see what a brand-new session sees."""
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
            conn.execute("SELECT set_config(%s, %s, true)", (self.setting, str(tenant)))
            during = conn.execute(self.count(table)).fetchone()[0]
            conn.commit()
            conn.execute(role)
            after = conn.execute(self.count(table)).fetchone()[0]
            conn.rollback()
            self.add("pooled connection reused after a tenant's transaction", table.name,
                     "the tenant's rows inside its transaction, 0 rows after",
                     f"{during} rows inside, {after} rows after", during > 0 and after == 0)
        except psycopg.Error as exc:
            self.add("pooled connection reused after a tenant's transaction", table.name, "no error",
                     f"error {exc.sqlstate}: {exc.diag.message_primary}", False)
        finally:
            try:
                conn.rollback()
            finally:
                raw.close()
                pool.dispose()


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
