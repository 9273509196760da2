"""Phase 2: tenants, users and user_tenants to the house convention, and the System Tenant.

Missing tables are created exactly as the application's Drizzle migration 0000 would create them (same
columns, constraint names and foreign keys), so the hand-over to Drizzle finds the schema it expects.
Existing tables are never altered: their shape is compared with the convention and differences are
reported. The System Tenant is inserted by its fixed UUID with ON CONFLICT DO NOTHING: re-runs are no-ops.
With legacy.enabled, the orgs, users and memberships of the legacy data follow (legacy/seed.py).
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field

import pandas as pd
from psycopg import sql
from sqlalchemy import text

from ..db import catalog
from ..db.ddl import UNDO_PHASE, Lock, Step, on_table, plan_frame, results_frame
from ..errors import RunbookError
from ..legacy import checks as legacy_checks
from ..legacy import conflicts as legacy_conflicts
from ..legacy import mapping as legacy_mapping
from ..legacy import seed as legacy_seed
from ..legacy import signups as legacy_signups
from . import privileges
from . import state as table_states

PHASE = "seed"
TS = "timestamp with time zone"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool = True


@dataclass(frozen=True)
class TableConvention:
    name: str
    columns: tuple[Column, ...]
    unique: tuple[tuple[str, ...], ...]
    foreign_keys: tuple[tuple[str, str], ...] = field(default=())  # (column, referenced table), to its id

    @property
    def create_sql(self) -> str:
        return _CREATE[self.name]


_BASE = (Column("id", "bigint"), Column("uuid", "uuid"))
_STAMPS = (Column("created_at", TS), Column("updated_at", TS))

CONVENTIONS = {
    "tenants": TableConvention("tenants", _BASE + (Column("name", "text"),) + _STAMPS, (("uuid",),)),
    "users": TableConvention("users", _BASE + (Column("email", "text"), Column("name", "text", False)) + _STAMPS,
                             (("uuid",), ("email",))),
    "user_tenants": TableConvention(
        "user_tenants",
        _BASE + (Column("user_id", "bigint"), Column("tenant_id", "bigint"), Column("role", "text")) + _STAMPS,
        (("uuid",), ("user_id", "tenant_id")),
        (("user_id", "users"), ("tenant_id", "tenants")),
    ),
}

# The statements of Drizzle's 0000 migration, schema-qualified. {s} is the schema identifier.
_CREATE = {
    "tenants": """CREATE TABLE {s}."tenants" (
  "id" bigserial PRIMARY KEY NOT NULL,
  "uuid" uuid DEFAULT gen_random_uuid() NOT NULL,
  "name" text NOT NULL,
  "created_at" timestamp with time zone DEFAULT now() NOT NULL,
  "updated_at" timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT "tenants_uuid_unique" UNIQUE("uuid")
)""",
    "users": """CREATE TABLE {s}."users" (
  "id" bigserial PRIMARY KEY NOT NULL,
  "uuid" uuid DEFAULT gen_random_uuid() NOT NULL,
  "email" text NOT NULL,
  "name" text,
  "created_at" timestamp with time zone DEFAULT now() NOT NULL,
  "updated_at" timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT "users_uuid_unique" UNIQUE("uuid"),
  CONSTRAINT "users_email_unique" UNIQUE("email")
)""",
    "user_tenants": """CREATE TABLE {s}."user_tenants" (
  "id" bigserial PRIMARY KEY NOT NULL,
  "uuid" uuid DEFAULT gen_random_uuid() NOT NULL,
  "user_id" bigint NOT NULL,
  "tenant_id" bigint NOT NULL,
  "role" text DEFAULT 'member' NOT NULL,
  "created_at" timestamp with time zone DEFAULT now() NOT NULL,
  "updated_at" timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT "user_tenants_uuid_unique" UNIQUE("uuid"),
  CONSTRAINT "user_tenants_user_id_tenant_id_unique" UNIQUE("user_id","tenant_id"),
  CONSTRAINT "user_tenants_user_id_users_id_fk" FOREIGN KEY ("user_id") REFERENCES {s}."users"("id") ON DELETE cascade,
  CONSTRAINT "user_tenants_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES {s}."tenants"("id") ON DELETE cascade
)""",
}

SHAPE_SQL = text("""
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid) AS default_expr, a.attidentity
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped
""")

KEYS_SQL = text("""
SELECT con.contype,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS cols,
       con.confrelid::regclass::text AS ref, con.convalidated
FROM pg_constraint con WHERE con.conrelid = :oid AND con.contype IN ('p', 'u', 'f')
UNION ALL
SELECT 'u', (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum), NULL, i.indisvalid
FROM pg_index i WHERE i.indrelid = :oid AND i.indisunique AND NOT i.indisprimary AND i.indpred IS NULL
""")


def shape_differences(conn, schema: str, convention: TableConvention) -> list[dict]:
    """Rows (table, check, expected, actual, ok) comparing an existing table with the convention."""
    oid = catalog.relation_oid(conn, schema, convention.name)
    rows: list[dict] = []

    def check(what: str, expected: str, actual: str) -> None:
        rows.append({"table": convention.name, "check": what, "expected": expected, "actual": actual,
                     "ok": expected == actual})

    if oid is None:
        check("exists", "yes", "no (seed creates it)")
        return rows
    cols = {r["attname"]: r for r in conn.execute(SHAPE_SQL, {"oid": oid}).mappings()}
    for col in convention.columns:
        found = cols.get(col.name)
        expected = f"{col.type}{' NOT NULL' if col.not_null else ''}"
        actual = "missing" if found is None else f"{found['type']}{' NOT NULL' if found['attnotnull'] else ''}"
        check(f"column {col.name}", expected, actual)
    id_col = cols.get("id")
    generated = id_col is not None and (bool(id_col["attidentity"]) or "nextval(" in (id_col["default_expr"] or ""))
    check("id generated (bigserial or identity)", "yes", "yes" if generated else "no")
    keys = conn.execute(KEYS_SQL, {"oid": oid}).mappings().all()
    pk = [tuple(k["cols"] or ()) for k in keys if k["contype"] == "p"]
    check("primary key", "(id)", f"({', '.join(pk[0])})" if pk else "none")
    uniques = {tuple(k["cols"] or ()) for k in keys if k["contype"] in ("u", "p")}
    for unique in convention.unique:
        check(f"unique ({', '.join(unique)})", "yes", "yes" if unique in uniques else "no")
    fks = {(tuple(k["cols"] or ()), (k["ref"] or "").split(".")[-1].strip('"')) for k in keys if k["contype"] == "f"}
    for column, ref in convention.foreign_keys:
        check(f"foreign key {column} -> {ref}(id)", "yes", "yes" if ((column,), ref) in fks else "no")
    return rows


def shape_report(rb) -> pd.DataFrame:
    """How tenants, users and user_tenants compare with the house convention (nothing is altered)."""
    with rb.engine.connect() as conn:
        rows = [r for conv in CONVENTIONS.values() for r in shape_differences(conn, rb.schema, conv)]
    return pd.DataFrame(rows, columns=["table", "check", "expected", "actual", "ok"])


def _references(create_sql: str) -> list[str]:
    """The tables a CREATE TABLE's foreign keys reference."""
    return list(dict.fromkeys(re.findall(r'REFERENCES \{s\}\."(\w+)"', create_sql)))


def create_lock(name: str, create_sql: str) -> Lock:
    """A new table (ACCESS EXCLUSIVE on it, which no one else can see yet) and SHARE ROW EXCLUSIVE on each table
    its foreign keys reference (they get its triggers)."""
    return Lock(((name, "ACCESS EXCLUSIVE"), *((r, "SHARE ROW EXCLUSIVE") for r in _references(create_sql))),
                brief=True, note="a new table")



def steps(rb) -> list[Step]:
    """CREATE TABLE for each missing table, then the System Tenant if it is not there yet."""
    steps: list[Step] = []
    schema = sql.Identifier(rb.schema)
    with rb.engine.connect() as conn:
        missing = [name for name in CONVENTIONS if catalog.relation_oid(conn, rb.schema, name) is None]
    for name in missing:
        statement = sql.SQL(CONVENTIONS[name].create_sql.replace("{s}", "{schema}")).format(schema=schema)
        steps.append(Step(PHASE, name, f"create {name}", statement, create_lock(name, CONVENTIONS[name].create_sql),
                          "a new, empty table: no existing table is locked or rewritten"))
    if missing or table_states.system_tenant_id(rb) is None:
        tenant = rb.params.system_tenant
        statement = sql.SQL("INSERT INTO {} (uuid, name) VALUES ({}, {}) ON CONFLICT (uuid) DO NOTHING").format(
            sql.Identifier(rb.schema, "tenants"), sql.Literal(str(tenant.uuid)), sql.Literal(tenant.name))
        steps.append(Step(PHASE, "tenants", "insert the System Tenant", statement,
                          on_table("ROW EXCLUSIVE", note="one row"),
                          "one idempotent insert keyed by the fixed UUID; nothing else is touched", planned_rows=1))
    if legacy_mapping.enabled(rb.params):
        with rb.engine.connect() as conn:
            # what the legacy application creates from now on gets its tenant at once (until 06_finalize)
            triggers = [] if legacy_signups.window_closed(conn, rb.params) else \
                legacy_signups.install_steps(conn, rb.params, PHASE)
            steps += legacy_seed.steps(rb, conn, tables_ready=not missing, before_mapping=triggers)
    return steps


def plan(rb) -> pd.DataFrame:
    """The statements seed will run, each with the lock it takes."""
    with rb.engine.connect() as conn:
        return plan_frame(steps(rb), conn)


INSERTED = "rows inserted"
NOT_INSERTED = "planned, not inserted"


def apply(rb) -> pd.DataFrame:
    """Run the plan (or only list it in a dry run); not before 01_inspect, nor while a conflict between tenants
    has no rule. Beside each step, the rows it inserted (the table's count after less before) and, for the
    legacy mapping's steps, how many of the rows its plan counted were not inserted: a membership whose user is
    not migrated (a duplicate email, listed with the ambiguities) or that is there already."""
    if not rb.dry_run:
        rb.require_baseline()
        privileges.require(rb)
        legacy_conflicts.require_resolved(rb)
    executor = rb.executor()
    results, inserted, planned = [], [], []
    for step in steps(rb):
        before = _count_rows(rb, step.table)
        results.append(executor.run(step))
        after = _count_rows(rb, step.table)
        inserted.append(None if rb.dry_run or before is None and after is None else (after or 0) - (before or 0))
        planned.append(step.planned_rows)
    frame = results_frame(results)
    frame.insert(frame.columns.get_loc("outcome") + 1, INSERTED, pd.array(inserted, dtype="Int64"))
    frame.insert(frame.columns.get_loc(INSERTED) + 1, NOT_INSERTED, pd.array(
        [None if n is None or p is None else max(p - n, 0) for n, p in zip(inserted, planned)], dtype="Int64"))
    return frame


def _count_rows(rb, table: str | None) -> int | None:
    if table not in CONVENTIONS:
        return None
    with rb.engine.connect() as conn:
        if catalog.relation_oid(conn, rb.schema, table) is None:
            return None
        return catalog.exact_count(conn, rb.schema, table)


def system_tenant(rb) -> pd.DataFrame:
    """The System Tenant row, found by its fixed UUID."""
    cols = ["id", "uuid", "name"]
    with rb.engine.connect() as conn:
        if catalog.relation_oid(conn, rb.schema, "tenants") is None:
            return pd.DataFrame(columns=cols)
        query = sql.SQL("SELECT id, uuid::text, name FROM {} WHERE uuid = %s::uuid").format(
            sql.Identifier(rb.schema, "tenants"))
        from ..db.sqltext import render
        rows = conn.exec_driver_sql(render(conn, query), (str(rb.params.system_tenant.uuid),)).all()
    return pd.DataFrame(rows, columns=cols)


def counts(rb) -> pd.DataFrame:
    """Rows in tenants, users and user_tenants (for the chart and the summary)."""
    out = []
    with rb.engine.connect() as conn:
        for name in CONVENTIONS:
            if catalog.relation_oid(conn, rb.schema, name) is None:
                out.append({"table": name, "rows": 0})
            else:
                out.append({"table": name, "rows": catalog.exact_count(conn, rb.schema, name)})
    return pd.DataFrame(out, columns=["table", "rows"])


def legacy_ambiguities(rb) -> pd.DataFrame:
    """What the legacy mapping did not guess, one row per case (empty when legacy.enabled is false); the
    archive keeps all of it as legacy_ambiguities.csv."""
    return legacy_checks.ambiguities(rb)


def legacy_ambiguity_summary(frame: pd.DataFrame) -> pd.DataFrame:
    return legacy_checks.ambiguity_summary(frame)


def legacy_examples(frame: pd.DataFrame) -> pd.DataFrame:
    return legacy_checks.examples(frame)


def assert_seeded(rb) -> str:
    """The notebook's last cell: the tenancy tables and the System Tenant exist (skipped in a dry run)."""
    if rb.dry_run:
        return "dry run: nothing was created"
    report = shape_report(rb)
    missing = report[(report["check"] == "exists") & ~report["ok"]]
    if len(missing) or table_states.system_tenant_id(rb) is None:
        raise RunbookError("seed did not finish: " + (", ".join(missing["table"]) + " missing; " if len(missing) else "")
                           + "re-run 02_seed and read the error of the failing cell")
    left = [s.action for s in steps(rb)]
    if left:
        raise RunbookError("seed did not finish: still to do: " + "; ".join(left) + ". Re-run 02_seed.")
    differences = int((~report["ok"]).sum())
    return (f"tenancy tables present, System Tenant id {table_states.system_tenant_id(rb)}"
            + (f"; {differences} convention differences reported above (validate will fail on them)" if differences else ""))


# --- undo (run by 99_rollback) ---------------------------------------------------------------------

def undo_steps(rb, conn, before) -> list[Step]:
    """What reverses seed, from the pre-change snapshot: the legacy mapping's users, tenants and memberships
    (where the tables stay), the System Tenant, and the tenancy tables where they did not exist before."""
    p = rb.params
    out: list[Step] = []
    existed = {name: before.existed("table", name) for name in CONVENTIONS}
    if legacy_mapping.enabled(p):  # first: nothing may create a tenant while the mapping's are deleted
        out += legacy_signups.undo_steps(conn, p)
    if all(existed.values()):
        out += legacy_seed.undo_steps(conn, p)
    if table_states.system_tenant_id(rb) is not None and existed["tenants"] \
            and not before.existed("system tenant", str(p.system_tenant.uuid)):
        out.append(Step(UNDO_PHASE, "tenants", "delete the System Tenant", sql.SQL("DELETE FROM {} WHERE uuid = {}").format(
            sql.Identifier(rb.schema, "tenants"), sql.Literal(str(p.system_tenant.uuid))),
            on_table("ROW EXCLUSIVE", *catalog.delete_locks(conn, rb.schema, "tenants"), note="one row"), "nothing refers to it any more"))
    for name in ("user_tenants", "users", "tenants"):
        if not existed[name] and catalog.relation_oid(conn, rb.schema, name) is not None:
            out.append(Step(UNDO_PHASE, name, f"drop {name}", sql.SQL("DROP TABLE {}").format(
                sql.Identifier(rb.schema, name)),
                on_table("ACCESS EXCLUSIVE", *((r, "ACCESS EXCLUSIVE") for r in _references(CONVENTIONS[name].create_sql)),
                         note="a table the runbook created"),
                "the application did not have this table before the migration"))
    return out


def forget(rb) -> None:
    """After the undo: what the legacy mapping recorded in the ledger is gone with the rows it describes."""
    if rb.ledger.exists(rb.control):
        legacy_seed.forget(rb.control, rb.params)
