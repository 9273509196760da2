"""The plan's lock column against what PostgreSQL really locks (issue 17): every step the phases plan on the demo
(seed with the legacy mapping, backfill's columns, rollout triggers, record and one batch UPDATE, VACUUM, every
constrain step with composite keys and row level security, then 99_rollback's undo, which drops the foreign
keys) is run in the order the phases run it, on a clone, and the relation locks its backend holds are read from
pg_locks before it commits; they must be exactly what the step's Lock says, table by table.

The rule the plan follows (db/ddl.py's Lock): it names every table lock stronger than ACCESS SHARE on the
application's tables; a plain read (ACCESS SHARE, which conflicts with ACCESS EXCLUSIVE only) may go unnamed;
the runbook's own ledger schema is not listed. CONCURRENTLY and VACUUM cannot run in a transaction: they are
observed from a third session while they wait behind one holding SHARE UPDATE EXCLUSIVE on their table (what
they request is what they then hold).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from runbook_helpers import params as params_mod
from runbook_helpers.db.ddl import PG_LOCK_MODES, Lock, Step
from runbook_helpers.db.sqltext import render
from runbook_helpers.phases import backfill, constrain, rollback, seed

from conftest import LEGACY_ON

MODES = list(PG_LOCK_MODES.values())  # weakest first

LOCKS_SQL = """
SELECT c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.pid = %s AND l.locktype = 'relation' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', %s)
"""


def strongest(rows) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel, mode in rows:
        if rel not in out or MODES.index(mode) > MODES.index(out[rel]):
            out[rel] = mode
    return out


def whole_table_bounds(step: Step) -> list[str]:
    """Bounds for a batch over every row of the demo's tables (integer keys): lower bounds first, then upper."""
    half = len(step.params) // 2
    return ["-1"] * half + ["2147483647"] * half


def observe_in_transaction(rb, step: Step) -> dict[str, str]:
    """Run the step as the Executor would (one transaction), read its backend's locks before it commits."""
    raw = rb.engine.raw_connection()
    try:
        conn: psycopg.Connection = raw.driver_connection
        conn.autocommit = True
        statement = render(None, step.statement)
        with conn.transaction():
            conn.execute(statement, whole_table_bounds(step) if step.params else None)
            rows = conn.execute(LOCKS_SQL, (conn.info.backend_pid, rb.params.ledger_schema)).fetchall()
        conn.autocommit = False
        return strongest(rows)
    finally:
        raw.close()


def observe_outside_a_transaction(rb, step: Step, db) -> dict[str, str] | None:
    """CONCURRENTLY / VACUUM: a blocker holds SHARE UPDATE EXCLUSIVE on the table (not ACCESS EXCLUSIVE: VACUUM
    would queue for the ACCESS SHARE it looks the table up with), the statement queues for its lock, a third
    session reads what it holds and requests; then the blocker lets go and it completes. None: it completed
    without queuing (it takes nothing that conflicts with SHARE UPDATE EXCLUSIVE)."""
    blocker = db.connect()
    target = next(iter(step.lock.relations(step.table)))  # the table, or the one partition it works on
    blocker.execute(f'LOCK TABLE "{rb.schema}"."{target}" IN SHARE UPDATE EXCLUSIVE MODE')
    raw = rb.engine.raw_connection()
    conn: psycopg.Connection = raw.driver_connection
    conn.autocommit = True
    pid = conn.info.backend_pid
    failure: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute(render(None, step.statement))
        except BaseException as exc:  # reported by the test below
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        with db.connect(autocommit=True) as watcher:
            deadline = time.monotonic() + 10
            while not watcher.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted)",
                                      (pid,)).fetchone()[0]:
                if not worker.is_alive():
                    return None
                assert time.monotonic() < deadline, f"{step.action}: never queued behind the blocker"
                time.sleep(0.02)
            rows = watcher.execute(LOCKS_SQL, (pid, rb.params.ledger_schema)).fetchall()
    finally:
        blocker.rollback()
        blocker.close()
        worker.join(30)
        conn.autocommit = False
        raw.close()
    assert not failure, failure
    return strongest(rows)


def is_table(rb, relation: str) -> bool:
    """A lock the plan names on an index (ATTACH PARTITION of an index) is not compared: pg_locks is read for tables."""
    with rb.engine.connect() as conn:
        kind = conn.exec_driver_sql("SELECT relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                    "WHERE c.relname = %s AND n.nspname = %s", (relation, rb.schema)).scalar()
    return kind not in ("i", "I")


def check(rb, db, step: Step, seen: list[str], wrong: list[str]) -> None:
    assert isinstance(step.lock, Lock), f"{step.table}: {step.action}: lock is free text: {step.lock!r}"
    observed = observe_in_transaction(rb, step) if step.transactional else observe_outside_a_transaction(rb, step, db)
    if observed is None:
        if "IF EXISTS" not in render(None, step.statement):
            wrong.append(f"{step.table}: {step.phase}: {step.action}: took no lock that conflicts with SHARE UPDATE "
                         f"EXCLUSIVE; the plan says {step.lock_text!r}")
        return  # else: an IF EXISTS whose object an earlier step of the same plan dropped (a no-op)
    expected = {rel: mode for rel, mode in step.lock.relations(step.table).items() if is_table(rb, rel)}
    listed = {rel: mode for rel, mode in observed.items() if mode != "AccessShareLock" or rel in expected}
    kind = f"{step.phase}: {step.action}"
    seen.append(kind)
    if listed != expected:
        wrong.append(f"{step.table}: {kind}: the plan says {expected} ({step.lock_text!r}); pg_locks shows "
                     f"{observed}")


def run_and_check(rb, db, steps: list[Step], seen: list[str], wrong: list[str]) -> None:
    for step in steps:
        check(rb, db, step, seen, wrong)


def check_every_phase(db, p, undo: bool = True) -> list[str]:
    """Seed, backfill and constrain as planned from the catalog before each, then (`undo`) 99_rollback; returns the
    step kinds checked, fails listing every step whose lock differs from pg_locks."""
    seen: list[str] = []
    wrong: list[str] = []
    for phase, plan in (("seed", seed.steps), ("backfill", lambda rb: backfill.execution_order(backfill.plans(rb))),
                        ("constrain", constrain.steps)):
        rb = db.session(phase, params=p)
        try:
            run_and_check(rb, db, plan(rb), seen, wrong)
        finally:
            rb.close()
    rb = db.session("rollback", params=p)
    try:
        for step in rollback.steps(rb) if undo else []:
            if len(step.lock.holds) > 1:  # a delete: what it locks depends on the keys the steps before it dropped,
                step = next(s for s in rollback.steps(rb)  # so as a resumed rollback would plan it now
                            if (s.table, s.action) == (step.table, step.action))
            check(rb, db, step, seen, wrong)
    finally:
        rb.close()
    assert not wrong, "\n".join(wrong)
    return seen


@pytest.mark.timeout(600)
def test_every_steps_lock_is_what_pg_locks_shows(migrated_db, ci_params):
    """The demo with the legacy mapping, composite keys and row level security."""
    p = params_mod.override(ci_params, LEGACY_ON)
    kinds = " | ".join(check_every_phase(migrated_db("inspect", params=p), p))
    for kind in ("memberships from", "add tenant_id with the System Tenant", "install the rollout triggers (and drop "
                 "the DEFAULT)", "install the rollout triggers |", "open the record", "its org's tenant in batches",
                 "VACUUM (ANALYZE)", "add CHECK (tenant_id IS NOT NULL) NOT VALID",
                 "validate the NOT NULL check", "set tenant_id NOT NULL", "drop the now redundant CHECK",
                 "add foreign key to tenants NOT VALID", "validate the foreign key", "build the tenant_id index",
                 "build the unique index", "using that index", "_fk NOT VALID", "tenant policy",
                 "enable row level security", "force row level security", "security_invoker", "grant app_user",
                 "rollback: drop ", "drop the foreign key to tenants", "disable row level security", "drop index",
                 "remove the rollout triggers", "drop tenant_id", "delete the tenants the legacy mapping created"):
        assert kind in kinds, f"no step of kind {kind!r} was checked"


@pytest.mark.timeout(600)
def test_every_steps_lock_on_a_partitioned_schema_is_what_pg_locks_shows(migrated_db, ci_params):
    """Range, list and hash partitions (sub-partitioned), a foreign key from and to the partitioned table: each
    partition a recursing ALTER TABLE reaches is named, and each step on one partition names that partition
    (forward phases)."""
    from test_partitions import SCHEMA, partition_params

    p = partition_params(ci_params)
    # not yet 99_rollback here: its drops on a partitioned table recurse to every partition, which their Lock
    # does not name yet (the forward steps' do)
    kinds = " | ".join(check_every_phase(migrated_db("inspect", params=p, schema=SCHEMA), p, undo=False))
    for kind in ("create user_tenants", "(on the table and every partition)", "on partition events_2024_eu",
                 "ON ONLY the table", "ON ONLY sub-partitioned", "attach events_2024_eu_tenant_id_idx",
                 "add the foreign key to tenants on the table", "to partition events_2024_eu using that index",
                 "NOT VALID to partition events_2024_eu", "_fk to the table",
                 "refresh planner statistics (the table and every partition)"):
        assert kind in kinds, f"no step of kind {kind!r} was checked"
