"""The rollout window's triggers: every row the application writes gets the tenant its own data implies,
and every write is recorded, from backfill until 06_finalize removes them.

Per core table, installed by backfill before it moves any row (so writes during the backfill are covered):

- `tenancy_rollout_assign`, BEFORE INSERT OR UPDATE: a row written without tenant_id gets its parent's
  tenant (`parent` in params), else its org's (`org_column`, through the legacy mapping), else the System
  Tenant; an UPDATE that changes the org column or the parent key moves the row with it. A tenant_id the
  writer sets itself is kept; where the row has a parent it must be the parent's, or the write is refused
  (SQLSTATE 23503, naming both) — never silently rewritten. Each write that needed the trigger is counted
  per row in the ledger (`rollout_assists`): 06_finalize refuses while recent writes still do.
- `tenancy_rollout_children`, AFTER UPDATE on a parent whose tenant changed: its mapped children follow
  (with composite keys on, the (tenant_id, …) foreign keys cascade the change themselves, first).
- `tenancy_rollout_record`, AFTER INSERT OR UPDATE OR DELETE: the key of every row the application
  writes, and the hash of the row as it was before its first write (`app_writes`). Validate proves every
  other row unchanged (phases/validate.py) and lists these as the application's.

No DEFAULT is needed while the triggers are there: the column's DEFAULT would hide whether the writer set
tenant_id, so backfill drops it in the same transaction that creates the triggers (existing rows keep
their value: a fast default is stored in the catalog, not read from the DEFAULT).

The runbook's own sessions set `tenancy_runbook.session = runbook` (db/database.py), which the triggers
ignore: the backfill writes tenant_id itself, and the isolation suite probes the end state, not the
scaffolding. The functions live in the ledger schema, run as their owner (SECURITY DEFINER, search_path
pinned) so they see the parent row and the ledger whatever the writer may read, and pin the settings
row text depends on, so a hash taken here equals the one validate computes. This is not an isolation
boundary (row level security is): a writer that sets the runbook's setting skips the triggers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..db import catalog
from ..db.database import RUNBOOK_SESSION_SETTING
from ..db.ddl import ACCESS_EXCLUSIVE_META, CONTINUES, UNDO_PHASE, Step, on_table
from ..db.fingerprint import PINNED_SETTINGS, pin_settings, row_hash, row_key
from ..db.names import TENANT_COLUMN, truncate
from ..db.sqltext import render

SESSION_SETTING, SESSION_VALUE = RUNBOOK_SESSION_SETTING, "runbook"
ASSIGN, CHILDREN, RECORD = "tenancy_rollout_assign", "tenancy_rollout_children", "tenancy_rollout_record"
TRIGGERS = (ASSIGN, CHILDREN, RECORD)
# CREATE TRIGGER takes SHARE ROW EXCLUSIVE; dropping the fast DEFAULT in the same transaction, ACCESS EXCLUSIVE
LOCK = on_table("ACCESS EXCLUSIVE", brief=True)
TRIGGERS_ONLY_LOCK = on_table("SHARE ROW EXCLUSIVE", brief=True)


@dataclass(frozen=True)
class Parent:
    table: str
    column: str   # this table's column that references the parent
    key: str      # the parent's key column


@dataclass(frozen=True)
class RolloutTable:
    """What the triggers of one core table need to know."""
    schema: str
    name: str
    key: list[str]                  # the primary key: how the record names a row
    columns: list[str]              # the pre-existing columns: what the record hashes
    system_tenant: sql.Composable   # the System Tenant's id (a placeholder while planning before seed)
    ledger: str
    org_column: str | None = None
    org_tenants: str | None = None  # the ledger table mapping org ids to tenants (the legacy mapping)
    parent: Parent | None = None
    children: list[tuple[str, str]] = field(default_factory=list)  # (child table, its column referencing key)

    @property
    def qualified(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def function(self, trigger: str) -> sql.Identifier:
        return sql.Identifier(self.ledger, truncate(f"{trigger.removeprefix('tenancy_')}_{self.name}"))

    def why(self) -> str:
        source = ([f"its {self.parent.table} row's tenant"] if self.parent else []) + (
            [f"its org's tenant ({self.org_column})"] if self.org_column else [])
        what = " else ".join(source + ["the System Tenant"])
        follow = f"; its {', '.join(c for c, _ in self.children)} rows follow it when it moves" if self.children else ""
        return (f"rows the application writes without tenant_id get {what}{follow}; every write is recorded for "
                f"validate; the DEFAULT goes (the trigger decides)")


def _ledger(t: RolloutTable, name: str) -> sql.Identifier:
    return sql.Identifier(t.ledger, name)


def _function(t: RolloutTable, trigger: str, declare: str, body: sql.Composable, ret: str,
              pin: bool = False) -> sql.Composed:
    settings = sql.SQL("").join(sql.SQL(" SET {} TO {}").format(sql.Identifier(k), sql.Literal(v))
                                for k, v in PINNED_SETTINGS.items()) if pin else sql.SQL("")
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
        "SET search_path TO pg_catalog, pg_temp{settings} AS $rollout$\n{declare}BEGIN\n"
        "  IF current_setting({s}, true) = {v} THEN RETURN {ret}; END IF;\n{body}\n  RETURN {ret};\nEND\n$rollout$"
    ).format(fn=t.function(trigger), settings=settings, declare=sql.SQL(declare), s=sql.Literal(SESSION_SETTING),
             v=sql.Literal(SESSION_VALUE), ret=sql.SQL(ret), body=body)


def assign_function(t: RolloutTable) -> sql.Composed:
    col = sql.Identifier(TENANT_COLUMN)
    decides = [c for c in ([t.org_column] if t.org_column else []) + ([t.parent.column] if t.parent else [])]
    unchanged = sql.SQL("").join(sql.SQL(" AND NEW.{c} IS NOT DISTINCT FROM OLD.{c}").format(c=sql.Identifier(c))
                                 for c in decides)
    lines = [sql.SQL(
        "  IF TG_OP = 'UPDATE' AND NEW.{col} IS NOT NULL AND NEW.{col} IS NOT DISTINCT FROM OLD.{col}{unchanged} "
        "THEN\n    RETURN NEW;  -- nothing that decides the tenant changed\n  END IF;").format(col=col, unchanged=unchanged)]
    implied: list[sql.Composable] = []
    if t.parent is not None:
        lines.append(sql.SQL(
            "  IF NEW.{c} IS NOT NULL THEN\n    SELECT p.{col} INTO parent_tenant FROM {pt} AS p WHERE p.{pk} = NEW.{c};"
            "\n  END IF;").format(c=sql.Identifier(t.parent.column), col=col,
                                  pt=sql.Identifier(t.schema, t.parent.table), pk=sql.Identifier(t.parent.key)))
        implied.append(sql.SQL("parent_tenant"))
    if t.org_column and t.org_tenants:
        implied.append(sql.SQL("(SELECT m.tenant_id FROM {ot} AS m WHERE m.org_id = NEW.{oc})").format(
            ot=_ledger(t, t.org_tenants), oc=sql.Identifier(t.org_column)))
    implied.append(t.system_tenant)
    lines.append(sql.SQL(
        "  IF NEW.{col} IS NULL OR (TG_OP = 'UPDATE' AND NEW.{col} IS NOT DISTINCT FROM OLD.{col}) THEN\n"
        "    -- the writer left tenant_id to the row's own data\n"
        "    implied := COALESCE({implied});\n"
        "    IF NEW.{col} IS DISTINCT FROM implied THEN\n"
        "      NEW.{col} := implied;\n"
        "      INSERT INTO {assists} AS a (table_name, key) VALUES ({name}, {key})\n"
        "        ON CONFLICT (table_name, key) DO UPDATE SET last_at = now(), times = a.times + 1;\n"
        "    END IF;").format(col=col, implied=sql.SQL(", ").join(implied), assists=_ledger(t, "rollout_assists"),
                              name=sql.Literal(t.name), key=row_key("NEW", t.key)))
    if t.parent is not None:
        lines.append(sql.SQL(
            "  ELSIF parent_tenant IS NOT NULL AND NEW.{col} <> parent_tenant THEN\n"
            "    RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',\n"
            "      MESSAGE = format('%s: tenant_id %s differs from the tenant %s of its %s row (%s = %s)', {name}, "
            "NEW.{col}, parent_tenant, {pname}, {pcol}, NEW.{c}),\n"
            "      HINT = 'leave tenant_id out: the rollout trigger gives the row its parent''s tenant';").format(
            col=col, name=sql.Literal(t.name), pname=sql.Literal(t.parent.table), pcol=sql.Literal(t.parent.column),
            c=sql.Identifier(t.parent.column)))
    lines.append(sql.SQL("  END IF;"))
    return _function(t, ASSIGN, "DECLARE\n  parent_tenant bigint;\n  implied bigint;\n", sql.SQL("\n").join(lines),
                     "NEW")


def children_function(t: RolloutTable) -> sql.Composed:
    col = sql.Identifier(TENANT_COLUMN)
    updates = sql.SQL("\n").join(sql.SQL(
        "  UPDATE {child} AS c SET {col} = NEW.{col} WHERE c.{ref} = NEW.{key} AND c.{col} IS DISTINCT FROM NEW.{col};"
    ).format(child=sql.Identifier(t.schema, child), col=col, ref=sql.Identifier(ref), key=sql.Identifier(t.key[0]))
        for child, ref in t.children)
    return _function(t, CHILDREN, "", updates, "NULL")


def record_function(t: RolloutTable) -> sql.Composed:
    log = _ledger(t, "app_writes")

    def entry(record: str, op: str, with_hash: bool) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {log} AS w (table_name, key, first_op, old_hash, first_xid, last_op) "
            "VALUES ({name}, {key}, {op}, {hash}, pg_current_xact_id(), {op})\n"
            "      ON CONFLICT (table_name, key) DO UPDATE SET last_op = EXCLUDED.last_op, last_at = now(), "
            "writes = w.writes + 1;").format(
            log=log, name=sql.Literal(t.name), key=row_key(record, t.key), op=sql.Literal(op),
            hash=row_hash(record, t.columns) if with_hash else sql.SQL("NULL"))

    body = sql.SQL(
        "  IF TG_OP = 'INSERT' THEN\n    {ins}\n"
        "  ELSIF TG_OP = 'DELETE' THEN\n    {dele}\n"
        "  ELSE\n    {upd}\n    IF {new_key} <> {old_key} THEN\n      {moved}\n    END IF;\n"
        "  END IF;").format(ins=entry("NEW", "INSERT", False), dele=entry("OLD", "DELETE", True),
                            upd=entry("OLD", "UPDATE", True), new_key=row_key("NEW", t.key),
                            old_key=row_key("OLD", t.key), moved=entry("NEW", "INSERT", False))
    return _function(t, RECORD, "", body, "NULL", pin=True)


def install_statement(t: RolloutTable, drop_default: bool) -> sql.Composed:
    """The functions, the triggers and (where there is one) the DEFAULT's removal, in one transaction."""
    parts = [assign_function(t), record_function(t)]
    parts.append(sql.SQL("CREATE TRIGGER {trg} BEFORE INSERT OR UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {fn}()").format(
        trg=sql.Identifier(ASSIGN), t=t.qualified, fn=t.function(ASSIGN)))
    parts.append(sql.SQL("CREATE TRIGGER {trg} AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION "
                         "{fn}()").format(trg=sql.Identifier(RECORD), t=t.qualified, fn=t.function(RECORD)))
    if t.children:
        parts.insert(2, children_function(t))
        parts.append(sql.SQL("CREATE TRIGGER {trg} AFTER UPDATE ON {t} FOR EACH ROW WHEN (OLD.{col} IS DISTINCT FROM "
                             "NEW.{col}) EXECUTE FUNCTION {fn}()").format(
            trg=sql.Identifier(CHILDREN), t=t.qualified, col=sql.Identifier(TENANT_COLUMN), fn=t.function(CHILDREN)))
    if drop_default:
        parts.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(
            t.qualified, sql.Identifier(TENANT_COLUMN)))
    return sql.SQL(";\n").join(parts)


def install_step(phase: str, t: RolloutTable, drop_default: bool, partitions: tuple[str, ...] = ()) -> Step:
    """`partitions`: a partitioned table's, which CREATE TRIGGER and DROP DEFAULT reach (and lock) too."""
    lock = LOCK if drop_default else TRIGGERS_ONLY_LOCK
    if partitions:
        lock = replace(lock, spread=tuple(partitions), scope="and every partition")
    return Step(phase, t.name, "install the rollout triggers" + (" (and drop the DEFAULT)" if drop_default else ""),
                install_statement(t, drop_default), lock, t.why())


def installed(conn: Connection, schema: str, table: str) -> set[str]:
    """Which of the rollout triggers the table has."""
    return {r[0] for r in conn.execute(text(
        "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON "
        "n.oid = c.relnamespace WHERE n.nspname = :s AND c.relname = :t AND t.tgname = ANY(:names)"),
        {"s": schema, "t": table, "names": list(TRIGGERS)})}


def remove_statement(t: RolloutTable, present: set[str]) -> sql.Composed:
    parts = [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), t.qualified)
             for name in TRIGGERS if name in present]
    parts += [sql.SQL("DROP FUNCTION IF EXISTS {}()").format(t.function(name)) for name in TRIGGERS]
    return sql.SQL(";\n").join(parts)


def remove_steps(phase: str, t: RolloutTable, present: set[str], why: str) -> list[Step]:
    if not present:
        return []
    return [Step(phase, t.name, "remove the rollout triggers", remove_statement(t, present), ACCESS_EXCLUSIVE_META, why)]


def undo_steps(t: RolloutTable, present: set[str]) -> list[Step]:
    return remove_steps(UNDO_PHASE, t, present, "catalog change only; the legacy application wrote without them before")


# --- the record of the application's writes ---------------------------------------------------------

def capture_statement(t: RolloutTable) -> sql.Composed:
    """One statement, so the digest and the snapshot it records are the same: rows, and rows the application
    has not written yet, with the sums of their hashes."""
    log = _ledger(t, "app_writes")
    h, key = row_hash("t", t.columns), row_key("t", t.key)
    return sql.SQL(
        "{pin};\nINSERT INTO {start} (table_name, snapshot, columns, key_columns, rows_all, digest_all, rows_untouched, "
        "digest_untouched)\nSELECT {name}, pg_current_snapshot(), {cols}, {keys}, count(*), coalesce(sum(h), 0), "
        "count(*) FILTER (WHERE NOT written), coalesce(sum(h) FILTER (WHERE NOT written), 0)\n"
        "FROM (SELECT {h}::numeric AS h, EXISTS (SELECT 1 FROM {log} AS w WHERE w.table_name = {name} AND "
        "w.key = {key}) AS written FROM {t} AS t) AS x\nON CONFLICT (table_name) DO NOTHING").format(
        pin=pin_settings(), start=_ledger(t, "capture_start"), name=sql.Literal(t.name),
        cols=sql.Literal(list(t.columns)), keys=sql.Literal(list(t.key)), h=h, log=log, key=key, t=t.qualified)


def capture_step(phase: str, t: RolloutTable) -> Step:
    return Step(phase, t.name, "open the record of the application's writes (one read of every row)",
                capture_statement(t), on_table("ACCESS SHARE", note="a read: " + CONTINUES),
                "one scan hashes every row as the rollout window opens; validate proves them unchanged against it",
                long_scan=True)


def capture_started(conn: Connection, ledger: str, table: str) -> bool:
    if catalog.relation_oid(conn, ledger, "capture_start") is None:
        return False
    query = sql.SQL("SELECT 1 FROM {} WHERE table_name = %s").format(sql.Identifier(ledger, "capture_start"))
    return conn.exec_driver_sql(render(conn, query), (table,)).first() is not None
