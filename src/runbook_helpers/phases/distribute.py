"""Phase 7 (07_distribute): shard the tenant tables by tenant_id with Citus, after 06_finalize, on a Citus
coordinator only.

The plan follows what a Citus 13 cluster accepted (issue 18; distribution/citus.py lists the facts):
  1. the key changes the application must agree to (distribution.application_keys_agreed): every primary key and
     unique key of a tenant table becomes (tenant_id, …), built CONCURRENTLY and swapped in separate statements
     (distribution/citus_keys.py);
  2. the foreign keys among the tenant tables and the reference tables dropped (definitions kept in the ledger), then
     every UNIQUE constraint that duplicates a key once the keys are (tenant_id, …) (04's composite UNIQUE
     (tenant_id, id) beside the primary key made (tenant_id, id)), recorded in the ledger;
  3. tenants, users, user_tenants, the shared tables and distribution.reference_tables made reference tables (each
     step names the tables outside the spec Citus makes Citus local tables on the way, and why);
  4. every tenant table distributed by tenant_id, colocated with the first (distribution/citus_tables.py);
  5. the foreign keys re-added NOT VALID (without an ON UPDATE action where they hold tenant_id), then validated.
Before any change it refuses, besides the blockers below, a multi-level partitioned tenant table and, on a
coordinator, an application or legacy role that cannot log in (Citus reaches the workers as the current user).
Every statement is shown with its lock and, for Citus's copies, the bytes it moves (pg_total_relation_size) before
anything runs. The phase refuses, changing nothing, on a server without Citus or that is not the coordinator (a
dry run shows the plan anywhere), while anything in `blockers` stands, and while the application has not agreed
to the key changes. 99_rollback does not undo it (see undo_steps).

Every step reads the catalog and the ledger's distribution_changes before acting, so a run that stopped anywhere
(killed, or a statement refused) resumes on a re-run: a foreign key to tenants that the ledger says 07 dropped
satisfies the precondition (tenant_id NOT NULL with a validated foreign key), since the plan re-adds and
validates it.
"""

from __future__ import annotations

import pandas as pd
from psycopg import sql

from ..db import catalog
from ..db.ddl import Step, plan_frame, results_frame
from ..db.sqltext import render
from ..errors import RunbookError
from ..distribution import citus, citus_keys, citus_tables
from ..tenancy import composite_keys
from . import state as table_states

PHASE = "distribute"
BLOCKER_COLUMNS = ["blocker", "object", "what to do"]


class Analysis:
    """Everything the plan is made of, read from the catalog at once."""

    def __init__(self, rb, conn):
        p, schema = rb.params, rb.schema
        self.server = citus.server(conn)
        self.tables = citus.existing(conn, schema, p.tables)
        self.reference = citus.reference_tables(conn, schema, p)
        managed = citus.citus_tables(conn, schema)
        self.managed = managed
        self.blockers: list[dict] = []
        block = self._block

        # the foreign keys to tenants that 07 itself dropped (a run that stopped after dropping them) are its own
        # work to finish: the plan re-adds and validates them
        dropped = citus_tables.dropped_tenant_keys(conn, p.ledger_schema)
        for name, st in table_states.core_states(rb, conn).items():
            if st.exists and not (st.not_null and (st.fk_valid or name in dropped)):
                block("tenant_id is not NOT NULL with a validated foreign key", name,
                      "run 03_backfill, 04_constrain and 05_validate first")
        unsafe: set[str] = set()
        for trig in citus.triggers(conn, schema, self.tables):
            if trig.rollout:
                block("the rollout window is open", f"{trig.table}.{trig.name}",
                      "run 06_finalize once the application writes tenant_id itself: it removes the rollout triggers")
            elif p.distribution.triggers == "stop":
                block("Citus refuses to distribute a table with triggers", f"{trig.table}.{trig.name}",
                      "set distribution.triggers: enable_unsafe (citus.enable_unsafe_triggers for this table's "
                      "distribution: Citus creates the trigger on every shard, safe for one that only changes NEW) "
                      "or drop the trigger")
            else:
                unsafe.add(trig.table)

        for table, parts in citus.multi_level_partitioned(conn, schema, self.tables).items():
            if managed.get(table) != "distributed":
                block("Citus cannot distribute a multi-level partitioned table", table,
                      f"{', '.join(parts)} {'is' if len(parts) == 1 else 'are'} partitioned too (Citus: \"distributing "
                      f"multi-level partitioned tables is not supported\"): " + citus.multi_level_todo(table, parts))
        if self.server.refusal is None:  # on a Citus coordinator: the workers are reached as the current user
            for role in citus.querying_roles(conn, schema, self.tables, p):
                if role.exists and not role.can_login:
                    block(f"{role.purpose} is NOLOGIN: Citus opens its connections to the workers as the current "
                          f"user, so its queries of the distributed tables would fail", role.name,
                          citus.login_todo(role))

        fks = catalog.foreign_keys(conn, schema, self.tables)
        plain = composite_keys.accepted_references(p)
        keys = [k for k in citus.keys_without_tenant(conn, schema, self.tables) if managed.get(k.table) != "distributed"]
        self.keys = []
        for key in keys:
            why = citus_keys.blockers(key, self.tables, fks, plain)
            for reason in why:
                block(f"{key.kind} {key.name} cannot become ({', '.join(key.tenant_columns)})", key.table, reason)
            if not why:
                self.keys.append(key)
        dropped_by_keys = {(c, n) for k in self.keys for c, n in k.referenced_by}

        inside = set(self.tables) | set(self.reference)
        # the tables outside the spec that create_reference_table takes along (Citus local tables): named in the plan
        self.local = citus.becoming_local(conn, schema, self.reference, sorted(inside))
        refs = citus.references_from(conn, schema, self.tables + self.reference)
        for fk in refs:
            if fk.parent not in inside:
                block("a foreign key to a table outside the spec", fk.key,
                      f"name {fk.parent} in distribution.reference_tables (it becomes a reference table) or drop the "
                      f"foreign key")
            elif fk.child in self.reference and fk.parent in self.tables:
                block("a reference table references a tenant table", fk.key,
                      "Citus cannot: make the child a tenant table (core_tables) or drop the foreign key")
            elif citus_tables.delete_sets_null(fk.definition):
                block("Citus refuses ON DELETE SET NULL or SET DEFAULT on a foreign key that holds the distribution "
                      "column", fk.key, citus_tables.SET_NULL_TODO)
        for child, name, parent in citus.referenced_from_outside(conn, schema, self.tables, sorted(inside)):
            if (child, name) not in {(c, n) for k in keys for c, n in k.referenced_by}:
                block("a table outside the spec references a tenant table", f"{child}.{name}",
                      f"a distributed table ({parent}) can be referenced only by colocated tables: drop the key, or "
                      f"make {child} a tenant table")

        # a UNIQUE constraint with the very columns of a key that is (or becomes) (tenant_id, …): 04's composite
        # UNIQUE (tenant_id, id) beside the primary key made (tenant_id, id), or beside another unique key (or unique
        # index) made (tenant_id, …); the foreign keys on its index go around distribution anyway and come back on
        # the kept key's index
        self.redundant = citus.redundant_keys(conn, schema, self.tables, self.keys,
                                              frozenset(citus_keys.swapped(conn, p.ledger_schema)))
        on_redundant = {u for k in self.redundant for u in k.used_by}
        cycle = [f for f in citus_tables.cycle(refs, inside) if (f.child, f.name) not in dropped_by_keys
                 and (not (f.child in managed and f.parent in managed) or f.key in on_redundant)]
        dropping = {f.key for f in cycle}
        recorded = [r for r in citus_tables.recorded_foreign_keys(conn, rb.params.ledger_schema)
                    if r.key not in dropping]
        present = {f.key: f for f in refs if f.key not in dropping}
        self.sizes = {t: citus_tables.size(conn, schema, t) for t in self.tables + self.reference}
        distributed = [t for t in self.tables if managed.get(t) == "distributed"]
        self.steps: list[Step] = (
            citus_keys.steps(conn, schema, p.ledger_schema, self.keys)
            + citus_tables.drop_steps(schema, p.ledger_schema, cycle)
            + citus_tables.redundant_steps(schema, p.ledger_schema, self.redundant)
            + citus_tables.reference_steps(schema, [t for t in self.reference if managed.get(t) != "reference"],
                                           self.sizes, {t: citus.reference_reason(t, p) for t in self.reference},
                                           {t: v for t, v in self.local.items() if t not in managed})
            + citus_tables.distribute_steps(schema, [t for t in self.tables if t not in distributed],
                                            distributed[0] if distributed else None, self.sizes, unsafe)
            + citus_tables.readd_steps(schema, cycle + recorded, present,
                                       {t for t in self.tables if catalog.table_state(conn, schema, t).partitioned}))
        self.agreed = p.distribution.application_keys_agreed

    def _block(self, blocker: str, obj: str, todo: str) -> None:
        self.blockers.append({"blocker": blocker, "object": obj, "what to do": todo})

    @property
    def agreement_missing(self) -> str | None:
        if not self.keys or self.agreed:
            return None
        listing = ", ".join(f"{k.table}.{k.name} ({', '.join(k.columns)})" for k in self.keys)
        return (f"distribution.application_keys_agreed is false: the application still relies on keys without "
                f"tenant_id ({listing}): an id or uuid alone stays unique only by constraint, ON CONFLICT (id) and "
                f"REFERENCES t(id) need them. Once every query of the application names tenant_id and nothing relies "
                f"on those keys alone, set distribution.application_keys_agreed: true and re-run. Nothing was changed.")


def analyse(rb) -> Analysis:
    with rb.engine.connect() as conn:
        return Analysis(rb, conn)


def target(rb) -> pd.DataFrame:
    """The server: Citus or not, coordinator or not, and whether the phase may change it."""
    with rb.engine.connect() as conn:
        server = citus.server(conn)
    return pd.DataFrame([
        {"check": "citus extension", "found": server.citus_version or "none"},
        {"check": "coordinator", "found": "yes" if server.coordinator else "no"},
        {"check": "07_distribute may change this server", "found": "yes" if server.refusal is None else
         "no: " + server.refusal}], columns=["check", "found"])


def blockers(rb) -> pd.DataFrame:
    """What stops the phase before its first change, each with what to do (empty: nothing)."""
    a = analyse(rb)
    rows = list(a.blockers)
    if a.agreement_missing:
        rows.append({"blocker": "the application has not agreed to the key changes", "object": "(params)",
                     "what to do": "set distribution.application_keys_agreed: true once it relies on no key without "
                                   "tenant_id"})
    return pd.DataFrame(rows, columns=BLOCKER_COLUMNS)


def plan(rb) -> pd.DataFrame:
    """Every statement with its lock and, for Citus's copies, the bytes it moves."""
    a = analyse(rb)
    with rb.engine.connect() as conn:
        frame = plan_frame(a.steps, conn)
    moved = [a.sizes.get(s.table, 0) if "a reference table" in s.action or s.action.startswith("distribute ")
             else None for s in a.steps]
    frame.insert(4, "data moved (bytes)", pd.array(moved, dtype="Int64"))
    return frame


def cost(rb) -> pd.DataFrame:
    """Per table: what Citus makes of it and what it copies (the table's size as pg_total_relation_size gives
    it: heap, indexes and TOAST; a reference table is copied to every node)."""
    a = analyse(rb)
    rows = [{"table": t, "becomes": "distributed by tenant_id" if t in a.tables else "reference table",
             "bytes": a.sizes[t], "size": _pretty(a.sizes[t])} for t in a.tables + a.reference]
    rows += [{"table": t, "becomes": f"Citus local table (stays on the coordinator): {why}", "bytes": 0,
              "size": _pretty(0)} for t, (_, why) in a.local.items()]
    rows.append({"table": "(all)", "becomes": "", "bytes": sum(a.sizes.values()), "size": _pretty(sum(a.sizes.values()))})
    return pd.DataFrame(rows, columns=["table", "becomes", "bytes", "size"])


def _pretty(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def apply(rb) -> pd.DataFrame:
    """Refuses, changing nothing, off a Citus coordinator, while a blocker stands, and while the application has
    not agreed to the key changes; then runs the plan. A dry run lists the plan on any server."""
    a = analyse(rb)
    if rb.dry_run:
        return results_frame(rb.executor().run_all(a.steps))
    if a.server.refusal:
        raise RunbookError(a.server.refusal)
    if a.blockers:
        raise RunbookError("07_distribute cannot start: " + "; ".join(
            f"{b['object']}: {b['blocker']} ({b['what to do']})" for b in a.blockers) + ". Nothing was changed.")
    if a.agreement_missing:
        raise RunbookError(a.agreement_missing)
    rb.ensure_ledger()
    return results_frame(rb.executor().run_all(a.steps))


def status(rb) -> pd.DataFrame:
    """Per table: what it should become and what Citus has made of it."""
    a = analyse(rb)
    rows = [{"table": t, "should be": "distributed" if t in a.tables else "reference",
             "is": a.managed.get(t, "not a Citus table")} for t in a.tables + a.reference]
    rows += [{"table": t, "should be": "local", "is": a.managed.get(t, "not a Citus table")} for t in a.local]
    return pd.DataFrame(rows, columns=["table", "should be", "is"])


def assert_distributed(rb) -> str:
    if rb.dry_run:
        a = analyse(rb)
        refusal = f"; a run would be refused here: {a.server.refusal}" if a.server.refusal else ""
        return f"dry run: nothing was changed{refusal}"
    a = analyse(rb)
    if a.steps:
        raise RunbookError("distribution incomplete: " + "; ".join(f"{s.table}: {s.action}" for s in a.steps[:10])
                           + ". Re-run 07_distribute: it resumes.")
    return (f"{len(a.tables)} tenant tables distributed by tenant_id and colocated, {len(a.reference)} reference "
            f"tables, every foreign key back and validated")


def changes(conn, ledger_schema: str) -> list[str]:
    """What 07_distribute recorded as changed (keys swapped, foreign keys dropped), as "<kind> <table>.<name>"."""
    if catalog.relation_oid(conn, ledger_schema, "distribution_changes") is None:
        return []
    return [f"{k} {t}.{n}" for k, t, n in conn.exec_driver_sql(render(conn, sql.SQL(
        "SELECT kind, table_name, name FROM {} ORDER BY recorded_at, table_name, name").format(
        sql.Identifier(ledger_schema, "distribution_changes")))).all()]


def undo_steps(rb, conn, before) -> list[Step]:
    """None: 99_rollback refuses once 07_distribute changed anything. Its key changes drop the foreign keys that
    relied on the old keys, and a distributed table comes back only through Citus's undistribute_table; neither
    is something a rollback should guess at. On plain PostgreSQL the phase refuses before any change, so this
    never stands in a rollback's way there."""
    done = changes(conn, rb.params.ledger_schema)
    if done:
        raise RunbookError(f"07_distribute changed this database ({', '.join(done[:8])}"
                           f"{', …' if len(done) > 8 else ''}); 99_rollback does not undo distribution: undistribute "
                           f"the tables with Citus (undistribute_table), put the keys back by hand from the ledger's "
                           f"distribution_changes, then roll back. Nothing was changed.")
    return []
