"""03_backfill: the fast default is metadata-only; batched keyset updates fill every NULL and resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.backfill.engine import BatchedBackfill
from runbook_helpers.phases import backfill

SYSTEM = "00000000-0000-4000-8000-000000000001"


def system_id(db) -> int:
    return db.scalar("SELECT id FROM tenants WHERE uuid = %s", (SYSTEM,))


def relfilenode(db, table):
    return db.scalar("SELECT relfilenode FROM pg_class WHERE oid = %s::regclass", (table,))


def test_fast_default_rewrites_nothing_and_gives_every_row_the_system_tenant(db):
    db.run("inspect", "seed")
    before = {t: relfilenode(db, t) for t in ("workflows", "rules", "widgets")}
    report = db.run("backfill")["backfill"]["report"].summary.set_index("table")
    assert report.loc["workflows", "strategy"] == "fast default"
    assert report.loc["workflows", "rows updated"] == 0
    for table, node in before.items():
        assert relfilenode(db, table) == node, f"{table} was rewritten"
        assert db.scalar(f"SELECT count(*) FROM {table} WHERE tenant_id IS DISTINCT FROM %s", (system_id(db),)) == 0
    # the column carries a DEFAULT for the rollout window, so legacy inserts get the System Tenant too
    db.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'new', 'x')")
    assert db.scalar("SELECT tenant_id FROM templates WHERE name = 'new'") == system_id(db)


def test_batched_backfill_fills_every_null_in_key_ordered_batches_and_checkpoints(db):
    db.run("inspect", "seed")
    nulls = db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL")
    assert nulls > 0
    params = params_mod.override(db.params, {"backfill": {"batch_size": 100, "target_batch_ms": None}})
    out = db.run("backfill", params=params)["backfill"]
    row = out["report"].summary.set_index("table").loc["knowledge_bases"]
    assert row["strategy"] == "batched" and row["rows updated"] == nulls
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0
    cp = db.scalar("SELECT row_to_json(c) FROM tenancy_runbook.backfill_checkpoints c "
                   "WHERE table_name = 'knowledge_bases'")
    assert cp["rows_updated"] == nulls and cp["finished_at"] is not None
    total = db.scalar("SELECT count(*) FROM knowledge_bases")
    assert cp["batches"] == total // 100 + 1  # 100 keys per batch (fixed size), then an open-ended last one
    progress = out["report"].progress
    assert progress["rows_done"].iloc[-1] == nulls
    assert progress["batch_rows"].max() <= 100 and len(progress) == cp["batches"]


def test_partly_applied_0001_is_finished(db):
    """0001 half applied by hand: column + a validated FK + index on models, some rows filled."""
    db.run("inspect", "seed")
    sid = system_id(db)
    db.execute("ALTER TABLE models ADD COLUMN tenant_id bigint REFERENCES tenants(id)")
    db.execute("CREATE INDEX models_tenant_id_idx ON models (tenant_id)")
    db.execute("UPDATE models SET tenant_id = %s WHERE id %% 2 = 0", (sid,))
    out = db.run("backfill", "constrain")
    row = out["backfill"]["report"].summary.set_index("table").loc["models"]
    assert row["strategy"] == "batched"
    assert row["rows updated"] == db.scalar("SELECT count(*) FROM models WHERE id % 2 = 1")
    status = out["constrain"]["status"].set_index("table").loc["models"]
    assert (status["tenant_id"], status["foreign key"], status["index"]) == ("NOT NULL", "validated", "valid")
    # the existing FK and index were kept, not duplicated (the composite (tenant_id, id) key is another index)
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conrelid = 'models'::regclass AND contype = 'f'") == 1
    assert db.scalar("SELECT count(*) FROM pg_index WHERE indrelid = 'models'::regclass AND indnkeyatts = 1 "
                     "AND indkey[0] = "
                     "(SELECT attnum FROM pg_attribute WHERE attrelid = 'models'::regclass AND attname = 'tenant_id')") == 1


def test_composite_key_tables_are_batched_on_the_whole_key(db):
    db.run("inspect", "seed")
    db.execute("ALTER TABLE widgets ADD COLUMN tenant_id bigint")
    params = params_mod.override(db.params, {"backfill": {"batch_size": 500}})
    db.run("backfill", params=params)
    assert db.scalar("SELECT count(*) FROM widgets WHERE tenant_id IS NULL") == 0
    cp = db.scalar("SELECT row_to_json(c) FROM tenancy_runbook.backfill_checkpoints c WHERE table_name = 'widgets'")
    assert cp["key_columns"] == ["template_id", "position"]
    assert len(cp["last_key"]) == 2
    assert cp["rows_updated"] == db.scalar("SELECT count(*) FROM widgets")


def test_tables_without_a_primary_key_use_ctid_ranges(db):
    db.execute("CREATE TABLE audit_events (at timestamptz NOT NULL DEFAULT now(), what text, tenant_id bigint)")
    db.execute("INSERT INTO audit_events (what) SELECT 'event ' || i FROM generate_series(1, 5000) i")
    params = params_mod.override(db.params, {"core_tables": {"audit_events": {}}, "backfill": {"batch_size": 700}})
    db.run("inspect", "seed", "backfill", "constrain", "validate", params=params)
    assert db.scalar("SELECT count(*) FROM audit_events WHERE tenant_id IS NULL") == 0
    cp = db.scalar("SELECT row_to_json(c) FROM tenancy_runbook.backfill_checkpoints c WHERE table_name = 'audit_events'")
    assert cp["strategy"] == "ctid" and cp["rows_updated"] == 5000 and cp["batches"] > 1


def test_backfill_refuses_to_start_without_baseline_or_system_tenant(db):
    with pytest.raises(RunbookError, match="no baseline"):
        db.run("backfill")
    db.execute("ALTER TABLE knowledge_bases DROP COLUMN tenant_id")
    db.execute("DELETE FROM tenants")
    db.run("inspect")
    with pytest.raises(RunbookError, match="run 02_seed first"):
        db.run("backfill")
    assert db.scalar("SELECT count(*) FROM pg_attribute WHERE attname = 'tenant_id' AND attrelid = 'workflows'::regclass") == 0


def test_nulls_written_during_the_backfill_are_swept(db):
    """A row inserted with an explicit NULL behind the keyset cursor is caught by the next pass."""
    db.run("inspect", "seed")
    rb = db.session("backfill", params=params_mod.override(db.params, {"backfill": {"batch_size": 200}}))
    try:
        plans = {p.state.name: p for p in backfill.plans(rb)}
        rb.executor().run_all(plans["knowledge_bases"].steps[:1])
        job = BatchedBackfill(rb, plans["knowledge_bases"].state, system_id(db))
        original = job._batch
        calls = {"n": 0}

        def batch_then_write(*args, **kw):
            seconds = original(*args, **kw)
            calls["n"] += 1
            if calls["n"] == 2:  # behind the cursor now: id 1 was in the first batch; written behind the rollout
                # trigger (a replication subscriber would), which would otherwise give the rows their tenant
                with db.connect(autocommit=True) as conn:
                    conn.execute("SET session_replication_role = replica")
                    conn.execute("UPDATE knowledge_bases SET tenant_id = NULL WHERE id IN (1, 2, 3)")
            return seconds
        job._batch = batch_then_write
        job.run()
    finally:
        rb.close()
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0
    assert db.scalar("SELECT pass FROM tenancy_runbook.backfill_checkpoints WHERE table_name = 'knowledge_bases'") == 2


WORKER = """
import json, sys
from runbook_helpers import params as params_mod
from runbook_helpers.run.session import PhaseSession
from runbook_helpers.phases.headless import run_phase
p = params_mod.override(params_mod.load("ci"), json.loads(sys.argv[2]))
run_phase(PhaseSession("backfill", params=p, database_name=sys.argv[1], log=lambda *_: None))
print("finished")
"""


def test_killed_mid_backfill_resumes_from_the_checkpoint_and_fills_every_row(db):
    db.run("inspect", "seed")
    # a bigger knowledge_bases so the kill lands mid-way: 60k more rows with NULL tenant_id
    db.execute("INSERT INTO knowledge_bases (uuid, org_id, name) SELECT gen_random_uuid(), 1, 'kb ' || i "
               "FROM generate_series(1, 60000) i")
    nulls = db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL")
    # the test's own params: ci.yaml with the legacy mapping off, as db.run used them for inspect and seed
    overrides = json.dumps({"backfill": {"batch_size": 1000, "pause_ms": 30}, "legacy": {"enabled": False}})
    env = dict(os.environ, RUNBOOK_HEADLESS="1")
    proc = subprocess.Popen([sys.executable, "-c", WORKER, db.name, overrides], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    batches = 0
    while time.monotonic() < deadline:
        batches = db.scalar("SELECT coalesce(max(batches), 0) FROM tenancy_runbook.backfill_checkpoints "
                            "WHERE table_name = 'knowledge_bases'") if _ledger_ready(db) else 0
        if batches >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert batches >= 5, proc.stderr.read().decode()
    done_before = db.scalar("SELECT rows_updated FROM tenancy_runbook.backfill_checkpoints "
                            "WHERE table_name = 'knowledge_bases'")
    remaining = db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL")
    assert 0 < remaining < nulls
    # every committed checkpoint describes exactly the rows committed with it
    assert done_before == nulls - remaining
    last_key = db.scalar("SELECT last_key FROM tenancy_runbook.backfill_checkpoints WHERE table_name = 'knowledge_bases'")
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL AND id <= %s", (int(last_key[0]),)) == 0

    rerun = subprocess.run([sys.executable, "-c", WORKER, db.name, overrides], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0
    assert db.scalar("SELECT rows_updated FROM tenancy_runbook.backfill_checkpoints "
                     "WHERE table_name = 'knowledge_bases'") == nulls


def _ledger_ready(db) -> bool:
    return db.scalar("SELECT to_regclass('tenancy_runbook.backfill_checkpoints') IS NOT NULL")


def test_a_checkpoint_on_another_key_is_not_reused(db):
    """If the params' key changed since a run was interrupted, the old position is meaningless: start over."""
    db.run("inspect", "seed")
    db.execute("ALTER TABLE widgets ADD COLUMN tenant_id bigint")
    small = params_mod.override(db.params, {"backfill": {"batch_size": 300}})
    rb = db.session("backfill", params=small)
    try:
        plans = {p.state.name: p for p in backfill.plans(rb)}
        job = BatchedBackfill(rb, plans["widgets"].state, system_id(db))
        original, calls = job._batch, {"n": 0}

        def die_after_two(*args, **kw):
            if calls["n"] == 2:
                raise KeyboardInterrupt  # the operator pressed Ctrl-C
            calls["n"] += 1
            return original(*args, **kw)
        job._batch = die_after_two
        with pytest.raises(KeyboardInterrupt):
            job.run()
    finally:
        rb.close()
    assert db.scalar("SELECT batches FROM tenancy_runbook.backfill_checkpoints WHERE table_name = 'widgets'") == 2
    rekeyed = params_mod.override(small, {"core_tables": {"widgets": {"key": ["position", "template_id"]}}})
    db.run("backfill", params=rekeyed)
    cp = db.scalar("SELECT row_to_json(c) FROM tenancy_runbook.backfill_checkpoints c WHERE table_name = 'widgets'")
    assert cp["key_columns"] == ["position", "template_id"] and cp["pass"] == 2
    assert db.scalar("SELECT count(*) FROM widgets WHERE tenant_id IS NULL") == 0


def test_batch_size_adapts_toward_the_target_duration_within_its_bounds(db):
    db.run("inspect", "seed")
    params = params_mod.override(db.params, {"backfill": {
        "batch_size": 50, "target_batch_ms": 5000, "min_batch_size": 10, "max_batch_size": 300}})
    progress = db.run("backfill", params=params)["backfill"]["report"].progress
    sizes = [int(r) for r in progress["batch_rows"]]
    # every batch is far below 5 s, so each next batch spans twice the keys (2 of every 3 keys are NULL)
    for got, keys in zip(sizes[:3], (50, 100, 200)):
        assert abs(got - keys * 2 / 3) <= 1, sizes
    assert max(sizes) <= 300
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0


def test_parallel_workers_split_the_key_space_and_fill_every_row(db):
    db.run("inspect", "seed")
    db.execute("INSERT INTO knowledge_bases (uuid, org_id, name) SELECT gen_random_uuid(), 1, 'kb ' || i "
               "FROM generate_series(1, 20000) i")
    db.execute("ANALYZE knowledge_bases")
    nulls = db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL")
    params = params_mod.override(db.params, {"backfill": {"workers": 3, "batch_size": 500}})
    db.run("backfill", params=params)
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0
    with db.connect() as conn:
        parts = conn.execute("SELECT part, lower_key, upper_key, rows_updated, finished_at IS NOT NULL "
                             "FROM tenancy_runbook.backfill_checkpoints WHERE table_name = 'knowledge_bases' "
                             "ORDER BY part").fetchall()
    assert len(parts) == 3
    assert parts[0][1] is None and parts[-1][2] is None
    assert parts[0][2] == parts[1][1] and parts[1][2] == parts[2][1]  # contiguous, disjoint ranges
    assert all(p[3] > 0 and p[4] for p in parts)
    assert sum(p[3] for p in parts) == nulls


def test_throttle_sees_sessions_waiting_on_the_backfill_and_pauses(db):
    from runbook_helpers.backfill.throttle import Throttle
    from runbook_helpers.params import ThrottleParams
    logged = []
    with db.connect() as backfill_like, db.connect() as application:
        backfill_like.execute("UPDATE knowledge_bases SET name = name WHERE id = 1")  # holds the row lock
        waiter = threading.Thread(target=lambda: application.execute("UPDATE knowledge_bases SET name = 'x' WHERE id = 1"))
        waiter.start()
        rb = db.session("backfill")
        try:
            limits = ThrottleParams(max_lock_waiters=0, pause_ms=50, max_pause_s=0.6)
            oid = db.scalar("SELECT 'knowledge_bases'::regclass::oid")
            with Throttle(rb.engine, oid, limits, logged.append) as throttle:
                throttle.pids.add(backfill_like.info.backend_pid)
                deadline = time.monotonic() + 10
                while throttle.waiters == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert throttle.waiters == 1
                started = time.monotonic()
                throttle.wait("backfill knowledge_bases")
                assert 0.5 <= time.monotonic() - started < 3
        finally:
            rb.close()
            backfill_like.rollback()
            waiter.join(10)
            application.rollback()
    assert logged[0] == "backfill knowledge_bases: pausing: 1 sessions wait on the backfill's locks (limit 0)"
    assert logged[1].startswith("backfill knowledge_bases: still over the limit after")


def test_the_pass_budget_is_per_run_not_for_ever(db):
    """NULLs written behind the rollout trigger outrun a two-pass budget; the message says where to look. The
    re-run, which meets such a write only once, gets a fresh budget: it used to count the passes recorded in
    the ledger and fail at once."""
    db.run("inspect", "seed")
    two_passes = params_mod.override(db.params, {"backfill": {"batch_size": 200, "max_passes": 2}})

    def run_with_writes(times: int | None) -> None:
        rb = db.session("backfill", params=two_passes)
        try:
            plans = {p.state.name: p for p in backfill.plans(rb)}
            rb.executor().run_all(plans["knowledge_bases"].steps[:1])
            job = BatchedBackfill(rb, plans["knowledge_bases"].state, system_id(db))
            original, left = job._batch, {"n": times}

            def batch_then_write(*args, **kw):
                seconds = original(*args, **kw)
                if left["n"] is None or left["n"] > 0:
                    with db.connect(autocommit=True) as conn:
                        conn.execute("SET session_replication_role = replica")
                        conn.execute("UPDATE knowledge_bases SET tenant_id = NULL WHERE id = 1")
                    left["n"] = None if left["n"] is None else left["n"] - 1
                return seconds
            job._batch = batch_then_write
            job.run()
        finally:
            rb.close()

    with pytest.raises(RunbookError, match="after 2 passes in this run; something writes them behind the "
                                           "rollout trigger"):
        run_with_writes(None)  # a writer that never stops
    assert db.scalar("SELECT pass FROM tenancy_runbook.backfill_checkpoints WHERE table_name = 'knowledge_bases'") == 2
    run_with_writes(1)
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0
