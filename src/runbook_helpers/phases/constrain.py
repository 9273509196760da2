"""Phase 4: tenant_id NOT NULL, a validated foreign key and an index, without long locks.

Per table, each only if the catalog says it is still needed (so a re-run resumes, and after success
does nothing):
  1. CHECK (tenant_id IS NOT NULL) NOT VALID   ACCESS EXCLUSIVE, metadata only
  2. VALIDATE that CHECK                       SHARE UPDATE EXCLUSIVE: reads and writes continue
  3. SET NOT NULL                              ACCESS EXCLUSIVE, no scan: the valid CHECK proves it
  4. DROP the CHECK                            ACCESS EXCLUSIVE, metadata only
  5. FOREIGN KEY … NOT VALID                   SHARE ROW EXCLUSIVE on table and tenants, metadata only
  6. VALIDATE the FOREIGN KEY                  SHARE UPDATE EXCLUSIVE (+ ROW SHARE on tenants)
  7. DROP INDEX CONCURRENTLY an INVALID leftover of an interrupted build
  8. CREATE INDEX CONCURRENTLY on (tenant_id)  SHARE UPDATE EXCLUSIVE, outside any transaction
  9. ANALYZE, when anything above changed the table
A partitioned table (range, list or hash, sub-partitions included) takes the same end state by other
statements, so that every scan holds its lock on one partition only:
  NOT NULL: the CHECK NOT VALID on the parent (it reaches every partition), VALIDATE per leaf partition,
    then VALIDATE on the parent (every partition's is valid: no scan), SET NOT NULL on the parent (each
    partition's valid CHECK proves it: no scan), DROP the CHECK.
  FOREIGN KEY: per leaf partition NOT VALID, then VALIDATE; then on the parent without NOT VALID: PostgreSQL
    recognises each partition's validated key as its own part and scans nothing (PostgreSQL before 18 cannot
    add a NOT VALID foreign key to a partitioned table; this path works on every supported version).
  index: CREATE INDEX ON ONLY the parent (and each sub-partitioned level), CREATE INDEX CONCURRENTLY per leaf,
    ALTER INDEX … ATTACH PARTITION; the parent's index becomes valid when every partition's is attached.
Then, across tables: composite primary and foreign keys (distribution.composite_keys; see
tenancy/composite_keys.py) and row level security (rls.enabled; see tenancy/rls.py).

Before any VALIDATE, the rows as they are must stay within their tenants (legacy/conflicts.py): a conflict
without a rule stops the phase with nothing changed. A VALIDATE that fails anyway (a row written since)
names the count and the first keys of the violating rows, and drops the NOT VALID foreign key it was
validating when the runbook added it: NOT VALID, it would refuse the application's new rows of that kind
while the phase is stopped (the NOT NULL check stays: the rollout trigger gives every new row a tenant).
"""

from __future__ import annotations

import pandas as pd
from psycopg import sql
from sqlalchemy import text

from ..db import names, partitions, violations
from ..db.catalog import TableState
from ..db.ddl import (
    ACCESS_EXCLUSIVE_META,
    CONTINUES,
    SHARE_UPDATE_EXCLUSIVE,
    UNDO_PHASE,
    Lock,
    Step,
    concurrent_index_steps,
    drop_foreign_key_lock,
    foreign_key_lock,
    on_table,
    plan_frame,
    results_frame,
    validate_foreign_key_lock,
)
from ..db.names import TENANT_COLUMN
from ..errors import RunbookError
from ..legacy import conflicts
from ..tenancy import composite_keys, rls
from . import original_schema
from . import privileges
from . import state as table_states

PHASE = "constrain"
COL = sql.Identifier(TENANT_COLUMN)


def recorded_constraints(rb, conn) -> frozenset[str]:
    """The constraints the core tables had before the migration (inspect's snapshot): a failed VALIDATE drops
    only a constraint the runbook added."""
    return frozenset(c["conname"] for t in original_schema.tables(conn, rb.params.ledger_schema).values()
                     for c in t["constraints"])


def plan_table(st: TableState, schema: str, parts: list[partitions.Partition] | None = None,
               conn=None, recorded: frozenset[str] = frozenset()) -> list[Step]:
    if not st.has_column:
        raise RunbookError(f"{st.name} has no tenant_id yet: run 03_backfill first. Nothing was changed.")
    if st.partitioned:
        return plan_partitioned(st, schema, parts or [], conn)
    t = st.qualified
    steps: list[Step] = []
    check = st.check_name or names.not_null_check_name(st.name)
    if not st.not_null:
        if st.check_name is None:
            steps.append(Step(PHASE, st.name, "add CHECK (tenant_id IS NOT NULL) NOT VALID",
                              sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID").format(
                                  t, sql.Identifier(check), COL),
                              ACCESS_EXCLUSIVE_META, "NOT VALID skips the scan; new writes are checked at once"))
        if not st.check_valid:
            steps.append(Step(PHASE, st.name, "validate the NOT NULL check",
                              sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(t, sql.Identifier(check)),
                              SHARE_UPDATE_EXCLUSIVE, "scans the table without blocking reads or writes",
                              long_scan=True, diagnose=violations.rows_where(
                                  t, st.pk_columns, [TENANT_COLUMN], sql.SQL("x.{} IS NULL").format(COL))))
        steps.append(Step(PHASE, st.name, "set tenant_id NOT NULL",
                          sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(t, COL),
                          ACCESS_EXCLUSIVE_META, "the validated CHECK proves no NULLs, so PostgreSQL skips the scan"))
    if st.check_name is not None or not st.not_null:
        steps.append(Step(PHASE, st.name, "drop the now redundant CHECK",
                          sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(t, sql.Identifier(check)),
                          ACCESS_EXCLUSIVE_META, "catalog change only"))
    fk = st.fk_name or names.fk_name(st.name)
    if st.fk_name is None:
        steps.append(Step(PHASE, st.name, "add foreign key to tenants NOT VALID",
                          sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} (id) NOT VALID").format(
                              t, sql.Identifier(fk), COL, sql.Identifier(schema, "tenants")),
                          foreign_key_lock("tenants"), "NOT VALID skips the scan; new writes are checked at once"))
    if not st.fk_valid:
        steps.append(Step(PHASE, st.name, "validate the foreign key",
                          sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(t, sql.Identifier(fk)),
                          validate_foreign_key_lock("tenants"), "scans without blocking reads or writes", long_scan=True,
                          diagnose=violations.foreign_key_violations(
                              t, [TENANT_COLUMN], sql.Identifier(schema, "tenants"), ["id"], st.pk_columns),
                          on_error=None if fk in recorded else sql.SQL(
                              "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(t, sql.Identifier(fk))))
    index = names.index_name(st.name)
    steps += concurrent_index_steps(
        PHASE, st.name, schema, index, None if st.index_name is not None else sql.SQL(
            "CREATE INDEX CONCURRENTLY {} ON {} ({})").format(sql.Identifier(index), t, COL),
        "build the tenant_id index", leftovers=st.invalid_tenant_indexes)
    if steps:
        steps.append(Step(PHASE, st.name, "refresh planner statistics", sql.SQL("ANALYZE {}").format(t),
                          SHARE_UPDATE_EXCLUSIVE, "samples the table; reads and writes continue", long_scan=True))
    return steps


PARTITIONS_META = on_table("ACCESS EXCLUSIVE", brief=True, scope="and its partitions")


def leaf_scan(partition: str) -> Lock:
    """A scan or build of one partition: SHARE UPDATE EXCLUSIVE on it alone."""
    return on_table("SHARE UPDATE EXCLUSIVE", note=CONTINUES, relation=partition)


def _not_null_partitioned(st: TableState, parts: list[partitions.Partition]) -> list[Step]:
    t, steps = st.qualified, []
    every = tuple(p.name for p in parts)  # ALTER TABLE on a partitioned table recurses: it locks each of them
    spread_meta = on_table("ACCESS EXCLUSIVE", brief=True, scope="and its partitions", spread=every)
    check = sql.Identifier(st.check_name or names.not_null_check_name(st.name))
    if not st.not_null:
        if st.check_name is None:
            steps.append(Step(PHASE, st.name, "add CHECK (tenant_id IS NOT NULL) NOT VALID to the table and every "
                              "partition", sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID")
                              .format(t, check, COL), spread_meta,
                              "NOT VALID skips the scan; every partition inherits the CHECK; new writes are checked"))
        for part in partitions.leaves(parts):
            if not part.state.not_null and not part.state.check_valid:
                steps.append(Step(PHASE, st.name, f"validate the NOT NULL check on partition {part.name}",
                                  sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(part.state.qualified, check),
                                  leaf_scan(part.name), "scans one partition without blocking its reads or writes",
                                  long_scan=True))
        if not st.check_valid:
            steps.append(Step(PHASE, st.name, "validate the NOT NULL check on the table",
                              sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(t, check),
                              on_table("SHARE UPDATE EXCLUSIVE", note="no scan", scope="and its partitions",
                                       spread=every),
                              "every partition's CHECK is validated already, so PostgreSQL only marks it valid"))
        steps.append(Step(PHASE, st.name, "set tenant_id NOT NULL on the table and every partition",
                          sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(t, COL), spread_meta,
                          "each partition's validated CHECK proves no NULLs, so PostgreSQL scans none"))
    if st.check_name is not None or not st.not_null:
        steps.append(Step(PHASE, st.name, "drop the now redundant CHECK (from every partition)",
                          sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(t, check), spread_meta,
                          "catalog change only"))
    return steps


def _fk_partitioned(st: TableState, schema: str, parts: list[partitions.Partition]) -> list[Step]:
    steps = []
    tenants = sql.Identifier(schema, "tenants")
    if st.fk_name is not None and st.fk_valid:
        return steps
    every = tuple(p.name for p in parts)
    for part in partitions.leaves(parts):
        ps = part.state
        fk = sql.Identifier(ps.fk_name or names.fk_name(ps.name))
        if ps.fk_name is None:
            steps.append(Step(PHASE, st.name, f"add foreign key to tenants NOT VALID on partition {ps.name}",
                              sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} (id) NOT VALID")
                              .format(ps.qualified, fk, COL, tenants),
                              foreign_key_lock("tenants", relation=ps.name),
                              "NOT VALID skips the scan; new writes to the partition are checked at once"))
        if not ps.fk_valid:
            steps.append(Step(PHASE, st.name, f"validate the foreign key on partition {ps.name}",
                              sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(ps.qualified, fk),
                              validate_foreign_key_lock("tenants", relation=ps.name),
                              "scans one partition without blocking it",
                              long_scan=True))
    fk = sql.Identifier(st.fk_name or names.fk_name(st.name))
    if st.fk_name is None:
        steps.append(Step(PHASE, st.name, "add the foreign key to tenants on the table",
                          sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} (id)").format(
                              st.qualified, fk, COL, tenants),
                          on_table("SHARE ROW EXCLUSIVE", ("tenants", "ACCESS EXCLUSIVE"), brief=True,
                                   scope="and its partitions", spread=every),
                          "every partition's key is validated already: PostgreSQL attaches them and scans nothing; "
                          "partitions created later get it"))
    else:
        steps.append(Step(PHASE, st.name, "validate the foreign key on the table",
                          sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(st.qualified, fk),
                          validate_foreign_key_lock("tenants", scope="and its partitions", note="no scan",
                                                    spread=every),
                          "every partition's key is validated already"))
    return steps


def partition_index_steps(phase: str, conn, st: TableState, parts: list[partitions.Partition], index_of,
                          create: sql.Composable, what: str) -> list[Step]:
    """An index on a partitioned table built online: ON ONLY the table and each sub-partitioned level (an
    empty, INVALID index), CONCURRENTLY on each leaf partition (an INVALID leftover of an interrupted build
    dropped first), each attached to its parent's; the parent's becomes valid when all are attached.
    `index_of(table)` names each level's index; `create` is `CREATE [UNIQUE] INDEX` and what follows ON is
    the column list `what`."""
    schema, steps = st.schema, []
    top = index_of(st.name)
    if conn is not None and partitions.index_state(conn, schema, top):
        return steps  # valid: every partition's is attached
    if conn is None or partitions.index_state(conn, schema, top) is None:
        steps.append(Step(phase, st.name, f"create the index on ({what}) ON ONLY the table (INVALID until every "
                          "partition's is attached)",
                          sql.SQL("{} {} ON ONLY {} ({})").format(create, sql.Identifier(top), st.qualified,
                                                                  sql.SQL(what)),
                          on_table("SHARE", brief=True, note="ON ONLY builds nothing", scope="(alone)"),
                          "builds no index entries; partitions created later get theirs automatically"))
    for part in parts:
        name, parent_index = index_of(part.name), index_of(part.parent)
        attached = partitions.attached_index(conn, schema, parent_index, part.state) if conn is not None else None
        if attached is not None and (not part.leaf or partitions.index_state(conn, schema, attached)):
            continue
        exists = partitions.index_state(conn, schema, name) if conn is not None else None
        if not part.leaf:
            if exists is None:
                steps.append(Step(phase, st.name, f"create the index ON ONLY sub-partitioned {part.name}",
                                  sql.SQL("{} {} ON ONLY {} ({})").format(create, sql.Identifier(name),
                                                                          part.state.qualified, sql.SQL(what)),
                                  Lock(((part.name, "SHARE"),), brief=True), "builds no index entries"))
        else:
            steps += concurrent_index_steps(
                phase, st.name, schema, name, None if exists else sql.SQL("{} CONCURRENTLY {} ON {} ({})").format(
                    create, sql.Identifier(name), part.state.qualified, sql.SQL(what)),
                f"build the index on ({what}) of partition {part.name}", leaf_scan(part.name),
                leftovers=[name] if exists is False else [])
        if attached is None:
            steps.append(Step(phase, st.name, f"attach {name} to {parent_index}",
                              sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                                  sql.Identifier(schema, parent_index), sql.Identifier(schema, name)),
                              Lock(((parent_index, "SHARE UPDATE EXCLUSIVE"), (name, "ACCESS EXCLUSIVE")), brief=True,
                                   note="the two indexes only; no table lock blocks writes"),
                              "catalog change only: the partition's index is built"))
    return steps


def plan_partitioned(st: TableState, schema: str, parts: list[partitions.Partition], conn=None) -> list[Step]:
    """NOT NULL, the foreign key and the index of a partitioned table, per partition then on the parent
    (see the module's docstring); `conn` reads which indexes exist (None: plan as if none did)."""
    steps = _not_null_partitioned(st, parts) + _fk_partitioned(st, schema, parts)
    if st.index_name is None:
        steps += partition_index_steps(PHASE, conn, st, parts, names.index_name, sql.SQL("CREATE INDEX"),
                                       TENANT_COLUMN)
    if steps:
        steps.append(Step(PHASE, st.name, "refresh planner statistics (the table and every partition)",
                          sql.SQL("ANALYZE {}").format(st.qualified),
                          on_table("SHARE UPDATE EXCLUSIVE", note=CONTINUES, scope="and every partition",
                                   spread=tuple(p.name for p in parts)),
                          "samples the partitions; reads and writes continue",
                          long_scan=True))
    return steps


def partitions_of(rb, conn, st: TableState, project=None) -> list[partitions.Partition]:
    """The partitions of a core table (empty for a plain one), as backfill leaves them when `project`."""
    parts = partitions.tree(conn, st, table_states.tenants_oid(conn, rb.schema))
    if project is not None:
        for part in parts:
            part.state = project(part.state)
    return parts


def _planned_state(rb, st: TableState) -> TableState:
    """In a dry run before backfill, plan as if backfill had run (a dry run shows every phase's plan)."""
    if rb.dry_run and not st.has_column:
        from .backfill import project
        return project(st, table_states.system_tenant_id(rb))
    return st


def extra_steps(rb) -> list[Step]:
    """After every table has tenant_id constrained: composite keys (opt-in), then row level security."""
    out: list[Step] = []
    with rb.engine.connect() as conn:
        if rb.params.distribution.composite_keys:
            out += composite_keys.steps(conn, rb.schema, rb.params.tables, recorded=recorded_constraints(rb, conn),
                                      plain=composite_keys.accepted_references(rb.params))
        if rb.params.rls.enabled:
            out += rls.steps(rb, conn)
    return out


def steps(rb) -> list[Step]:
    """Every statement constrain will run, from the catalog as it is now (apply re-reads it per table)."""
    per_table = []
    with rb.engine.connect() as conn:
        recorded = recorded_constraints(rb, conn)
        for st in table_states.core_states(rb, conn).values():
            per_table += _table_steps(rb, conn, st, recorded)
    return per_table + extra_steps(rb)


def _table_steps(rb, conn, st: TableState, recorded: frozenset[str]) -> list[Step]:
    planned = _planned_state(rb, st)
    parts = partitions_of(rb, conn, st, (lambda s: _planned_state(rb, s)) if planned is not st else None)
    return plan_table(planned, rb.schema, parts, conn, recorded)


def plan(rb) -> pd.DataFrame:
    with rb.engine.connect() as conn:
        return plan_frame(steps(rb), conn)


def apply(rb) -> pd.DataFrame:
    """Table by table, re-reading the catalog before each, so an interrupted run resumes cleanly. A failure
    says what is already in force on the application's writes."""
    rb.require_baseline()
    if not rb.dry_run:
        privileges.require(rb)
    if not rb.dry_run and any(s.diagnose is not None for s in steps(rb)):
        # a VALIDATE is still to run: rows as they are now must stay within their tenants, or it would fail
        conflicts.require_resolved(rb, actual=True)
    executor = rb.executor()
    results = []
    try:
        for table in rb.params.tables:
            with rb.engine.connect() as conn:
                st = table_states.core_state(rb, conn, table)
                table_steps = _table_steps(rb, conn, st, recorded_constraints(rb, conn))
            results += executor.run_all(table_steps)
        results += executor.run_all(extra_steps(rb))
    except RunbookError as exc:
        raise type(exc)(f"{exc}\n{in_force(rb)}") from None
    return results_frame(results)


def in_force(rb) -> str:
    """Every constraint and policy constrain has put on core tables so far: NOT VALID ones are enforced on new
    writes already, which is what the application meets while the phase is stopped."""
    parts = []
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            found = [f"{r['conname']} ({'valid' if r['convalidated'] else 'NOT VALID'})" for r in conn.execute(text(
                "SELECT con.conname, con.convalidated FROM pg_constraint con WHERE con.conrelid = :oid AND "
                "con.contype IN ('c', 'f', 'u') AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = "
                "con.conrelid AND a.attnum = ANY(con.conkey) AND a.attname = :col) ORDER BY 1"),
                {"oid": st.oid, "col": TENANT_COLUMN}).mappings()] if st.oid else []
            if st.not_null:
                found.insert(0, "tenant_id NOT NULL")
            if st.rls_enabled:
                found.append("row level security" + (", forced" if st.rls_forced else ""))
            if found:
                parts.append(f"{name}: {', '.join(found)}")
    if not parts:
        return "Nothing of constrain is in force yet."
    return ("In force on the application's writes now: " + "; ".join(parts) + ". Every row the application "
            "writes meanwhile gets its tenant from the rollout trigger, so it keeps working in this state; "
            "re-run 04_constrain to finish, or 99_rollback to remove them.")


def status(rb) -> pd.DataFrame:
    """Per core table: tenant_id NOT NULL, FK validated, index valid (deterministic: for nbval)."""
    rows = []
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            rows.append({
                "table": name,
                "tenant_id": "NOT NULL" if st.not_null else ("nullable" if st.has_column else "absent"),
                "foreign key": "validated" if st.fk_valid else ("NOT VALID" if st.fk_name else "absent"),
                "index": "valid" if st.index_name else ("INVALID" if st.invalid_tenant_indexes else "absent"),
                "default": "System Tenant" if st.default else "none",
            })
    return pd.DataFrame(rows, columns=["table", "tenant_id", "foreign key", "index", "default"])


def assert_constrained(rb) -> str:
    """The notebook's last cell: NOT NULL, validated FK and valid index on every core table."""
    if rb.dry_run:
        return "dry run: nothing was changed"
    frame = status(rb)
    bad = frame[(frame["tenant_id"] != "NOT NULL") | (frame["foreign key"] != "validated") | (frame["index"] != "valid")]
    if len(bad):
        raise RunbookError("constrain incomplete for " + ", ".join(bad["table"]) + "; re-run 04_constrain: it resumes")
    return f"{len(frame)} core tables: tenant_id NOT NULL, foreign key validated, index valid"


# --- undo (run by 99_rollback) ---------------------------------------------------------------------

def granted_roles(rb, before: dict) -> list[str]:
    """Roles constrain granted privileges to (from the statement journal) that held none on the spec
    tables before the migration: their grants are revoked; anyone else's are left alone."""
    if not rb.ledger.exists(rb.control):
        return []
    journal = rb.ledger.journal(rb.control)
    if journal.empty:
        return []
    grants = journal[(journal["outcome"] == "applied") & journal["action"].str.startswith("grant ")]
    roles = {a.split()[1] for a in grants["action"]}
    acls_before = " ".join(t.get("acl") or "" for t in before.values())
    return sorted(r for r in roles if f"{r}=" not in acls_before)


def _applied_actions(rb) -> list[str]:
    """The actions of the statement journal that were applied, oldest first."""
    if not rb.ledger.exists(rb.control):
        return []
    journal = rb.ledger.journal(rb.control)
    return [] if journal.empty else list(journal[journal["outcome"] == "applied"]["action"])


def _tenant_indexes(conn, oid: int | None) -> list[str]:
    if oid is None:
        return []
    return [r[0] for r in conn.execute(text(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_attribute a ON "
        "a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = :oid AND a.attname = :col "
        "AND NOT i.indisprimary ORDER BY 1"), {"oid": oid, "col": TENANT_COLUMN})]


def _undo_table(conn, schema: str, st: TableState, was: dict) -> list[Step]:
    """One table's tenant_id index, foreign key to tenants, NOT NULL check and NOT NULL, where they were not
    there before (the column itself, where backfill added it, goes with backfill's undo)."""
    out: list[Step] = []
    for index in _tenant_indexes(conn, st.oid):
        if index not in was["indexes"]:
            if st.partitioned:  # a partitioned index cannot be dropped CONCURRENTLY; it has no entries of its own
                out.append(Step(UNDO_PHASE, st.name, f"drop index {index} (and every partition's part of it)",
                                sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(schema, index)),
                                PARTITIONS_META, "catalog change only: the files of the partitions' indexes go"))
                continue
            out.append(Step(UNDO_PHASE, st.name, f"drop index {index}",
                            sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, index)),
                            SHARE_UPDATE_EXCLUSIVE, "CONCURRENTLY: reads and writes continue", transactional=False))
    if st.fk_name and st.fk_name not in {c["conname"] for c in was["constraints"]}:
        out.append(Step(UNDO_PHASE, st.name, "drop the foreign key to tenants",
                        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(st.qualified, sql.Identifier(st.fk_name)),
                        drop_foreign_key_lock("tenants"), "catalog change only"))
    if st.check_name:
        out.append(Step(UNDO_PHASE, st.name, "drop the NOT NULL check", sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            st.qualified, sql.Identifier(st.check_name)), ACCESS_EXCLUSIVE_META, "catalog change only"))
    # NOT NULL goes here, before backfill's undo removes the rollout triggers, also where the column itself goes
    # later with backfill's undo: between those two steps the application's inserts, no longer given a tenant by
    # the trigger, would otherwise fail on NOT NULL (23502)
    if st.not_null and not (was["had_tenant_column"] and was["tenant_column_not_null"]):
        out.append(Step(UNDO_PHASE, st.name, "drop NOT NULL on tenant_id",
                        sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(st.qualified, COL),
                        ACCESS_EXCLUSIVE_META, "catalog change only"))
    return out


def undo_steps(rb, conn, before) -> list[Step]:
    """What reverses constrain, from the pre-change snapshot: row level security, its grants and the views'
    options first, then the composite keys back to the original ones, then per table the tenant_id index,
    foreign key and NOT NULL."""
    p = rb.params
    states = table_states.core_states(rb, conn)
    out = rls.view_grant_undo_steps(conn, _applied_actions(rb))  # the grants first: the role is refused, never
    out += rls.undo_steps(conn, rb.schema, states, before.views(), granted_roles(rb, before.tables),  # shown all
                          p.tables + p.shared_tables)
    out += composite_keys.undo_steps(conn, rb.schema, states, before.tables)
    for name, st in states.items():
        out += _undo_table(conn, rb.schema, st, before.tables[name])
    return out
