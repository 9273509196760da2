"""04_constrain: NOT NULL, validated FK and index without long locks; lock contention fails clearly and
changes nothing; an INVALID index left by an interrupted build is rebuilt."""

import threading
import time

import psycopg
import pytest

from conftest import CORE_ONLY
from runbook_helpers import params as params_mod
from runbook_helpers.errors import LockNotAcquired

FAST_LADDER = {"locks": {"first_lock_timeout_ms": 150, "lock_timeout_ms": 150,
                         "retry": {"attempts": 3, "backoff_ms": 50, "backoff_max_ms": 100}}}


def constraint_names(db, table):
    with db.connect() as conn:
        return sorted(r[0] for r in conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass", (table,)))


def test_constrain_leaves_not_null_validated_fk_and_valid_index_everywhere(db):
    out = db.run("inspect", "seed", "backfill", "constrain", params=params_mod.override(db.params, CORE_ONLY))["constrain"]
    status = out["status"]
    assert set(status["tenant_id"]) == {"NOT NULL"}
    assert set(status["foreign key"]) == {"validated"}
    assert set(status["index"]) == {"valid"}
    with db.connect() as conn:
        for table in db.params.tables:
            names = conn.execute("SELECT conname, convalidated FROM pg_constraint WHERE conrelid = %s::regclass "
                                 "AND contype IN ('c', 'f') AND conname LIKE %s", (table, f"{table}_tenant_id%")).fetchall()
            assert names == [(f"{table}_tenant_id_tenants_id_fk", True)], table  # the temporary CHECK is gone
            assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass",
                                (f"{table}_tenant_id_idx",)).fetchone()[0]
    applied = out["applied"]
    assert set(applied["outcome"]) == {"applied"}
    assert (applied.groupby("table").size() == 8).all()


def test_lock_contention_fails_naming_the_blocker_and_changes_nothing(db):
    db.run("inspect", "seed", "backfill")
    params = params_mod.override(db.params, FAST_LADDER)
    before = db.schema_dump()
    with db.connect() as blocker:
        blocker.execute("SELECT count(*) FROM workflows")  # an open transaction holding ACCESS SHARE
        blocker_pid = blocker.info.backend_pid
        started = time.monotonic()
        with pytest.raises(LockNotAcquired) as err:
            db.run("constrain", params=params)
        elapsed = time.monotonic() - started
        message = str(err.value)
        assert "workflows: add CHECK (tenant_id IS NOT NULL) NOT VALID: could not take its lock" in message
        assert "after 3 tries of 150 ms each" in message
        assert f"pid {blocker_pid}" in message and "SELECT count(*) FROM workflows" in message
        assert "Nothing of this step was applied" in message
        assert elapsed < 10
        blocker.rollback()
    assert db.schema_dump() == before
    journal = db.scalar("SELECT json_agg(j ORDER BY id) FROM tenancy_runbook.statement_journal j WHERE phase = 'constrain'")
    assert [(j["outcome"], j["attempts"]) for j in journal] == [("lock timeout", 3)]
    # after the blocker ends, a re-run succeeds
    status = db.run("constrain", params=params)["constrain"]["status"]
    assert set(status["foreign key"]) == {"validated"}


def test_application_waits_at_most_lock_timeout_behind_the_runbook(db):
    """While the runbook waits for its lock, queries queue behind it; each wait is bounded by lock_timeout."""
    db.run("inspect", "seed", "backfill")
    params = params_mod.override(db.params, FAST_LADDER)
    waits = []
    with db.connect() as blocker:
        blocker.execute("SELECT count(*) FROM workflows")
        stop = threading.Event()

        def application():
            with db.connect(autocommit=True) as app:
                while not stop.is_set():
                    t0 = time.monotonic()
                    app.execute("SELECT count(*) FROM workflows WHERE id = 1")
                    waits.append(time.monotonic() - t0)
                    time.sleep(0.01)

        worker = threading.Thread(target=application)
        worker.start()
        try:
            with pytest.raises(LockNotAcquired):
                db.run("constrain", params=params)
        finally:
            stop.set()
            worker.join(10)
            blocker.rollback()
    assert waits and max(waits) < 0.15 + 0.25, f"an application query waited {max(waits):.3f} s"


def test_invalid_index_left_by_an_interrupted_build_is_rebuilt(db):
    db.run("inspect", "seed", "backfill")
    with db.connect(autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            # a failed CONCURRENTLY build leaves an INVALID index behind, under the runbook's name
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY workflows_tenant_id_idx ON workflows (tenant_id)")
    assert db.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'workflows_tenant_id_idx'::regclass") is False
    out = db.run("constrain")["constrain"]
    actions = list(out["applied"][out["applied"]["table"] == "workflows"]["action"])
    assert "drop INVALID index workflows_tenant_id_idx left by an interrupted build" in actions
    assert db.scalar("SELECT indisvalid AND NOT indisunique FROM pg_index "
                     "WHERE indexrelid = 'workflows_tenant_id_idx'::regclass") is True
    assert db.scalar("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                     "WHERE c.relname = 'workflows' AND NOT i.indisvalid") == 0


def test_resumes_from_any_leftover_state(db):
    """An interrupted constrain leaves e.g. a NOT VALID check and a NOT VALID FK: the re-run finishes them."""
    db.run("inspect", "seed", "backfill")
    db.execute("ALTER TABLE rules ADD CONSTRAINT rules_tenant_id_nn_check CHECK (tenant_id IS NOT NULL) NOT VALID")
    db.execute("ALTER TABLE models ADD CONSTRAINT models_tenant_id_tenants_id_fk FOREIGN KEY (tenant_id) "
               "REFERENCES tenants(id) NOT VALID")
    db.execute("ALTER TABLE endpoints ALTER COLUMN tenant_id SET NOT NULL")
    db.execute("ALTER TABLE endpoints ADD CONSTRAINT endpoints_tenant_id_nn_check CHECK (tenant_id IS NOT NULL)")
    out = db.run("constrain")["constrain"]
    applied = out["applied"]
    rules = list(applied[applied["table"] == "rules"]["action"])
    assert rules[0] == "validate the NOT NULL check"
    models = list(applied[applied["table"] == "models"]["action"])
    assert "add foreign key to tenants NOT VALID" not in models and "validate the foreign key" in models
    endpoints = list(applied[applied["table"] == "endpoints"]["action"])
    assert endpoints[0] == "drop the now redundant CHECK" and "set tenant_id NOT NULL" not in endpoints
    assert set(out["status"]["foreign key"]) == {"validated"}
    assert constraint_names(db, "endpoints").count("endpoints_tenant_id_nn_check") == 0


def test_no_default_is_left_the_rollout_trigger_gives_new_rows_their_tenant(db):
    db.run("inspect", "seed", "backfill", "constrain")
    assert db.scalar("SELECT count(*) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid "
                     "AND a.attnum = d.adnum WHERE a.attname = 'tenant_id'") == 0
    # existing rows keep their tenant (the fast default lives on in the catalog)
    assert db.scalar("SELECT count(*) FROM workflows WHERE tenant_id IS NULL") == 0
    db.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'n', 'x')")
    assert db.scalar("SELECT t.tenant_id = s.id FROM templates t, tenants s WHERE t.name = 'n' AND s.uuid = %s",
                     (str(db.params.system_tenant.uuid),))
    # behind the trigger (as the runbook's own sessions are), NOT NULL holds
    with pytest.raises(psycopg.errors.NotNullViolation):
        db.execute_unrecorded("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'n2', 'x')")


def test_constrain_refuses_before_backfill(db):
    db.run("inspect", "seed")
    from runbook_helpers.errors import RunbookError
    with pytest.raises(RunbookError, match="has no tenant_id yet: run 03_backfill first"):
        db.run("constrain")


def test_an_index_build_timed_out_by_a_writer_leaves_no_invalid_index_behind(db):
    """CREATE INDEX CONCURRENTLY waits for open writers; a lock timeout there leaves an INVALID index,
    which the executor tries to drop before each retry (that drop waits for the same writer). When the
    ladder is exhausted the phase fails naming the writer and saying what is left; the re-run after the
    writer ends drops the leftover and builds a valid index."""
    core = params_mod.override(db.params, CORE_ONLY)  # no composite (tenant_id, id) index to stand in
    db.run("inspect", "seed", "backfill", "constrain", params=core)
    db.execute("DROP INDEX workflows_tenant_id_idx")  # only the index build is left to do
    params = params_mod.override(core, FAST_LADDER)
    with db.connect() as writer:
        writer.execute("UPDATE workflows SET name = name WHERE id = 1")  # holds ROW EXCLUSIVE, uncommitted
        writer_pid = writer.info.backend_pid
        with pytest.raises(LockNotAcquired) as err:
            db.run("constrain", params=params)
        assert "workflows: build the tenant_id index: could not take its lock" in str(err.value)
        assert f"pid {writer_pid}" in str(err.value)
        assert "left an INVALID index" in str(err.value) and "the re-run drops and rebuilds it" in str(err.value)
        writer.rollback()
    status = db.run("constrain", params=params)["constrain"]["status"].set_index("table")
    assert status.loc["workflows", "index"] == "valid"
    assert db.scalar("SELECT count(*) FROM pg_index WHERE indrelid = 'workflows'::regclass AND NOT indisvalid") == 0


def test_an_index_build_that_timed_out_is_cleaned_up_and_retried_within_the_ladder(db):
    core = params_mod.override(db.params, CORE_ONLY)  # no composite (tenant_id, id) index to stand in
    db.run("inspect", "seed", "backfill", "constrain", params=core)
    db.execute("DROP INDEX workflows_tenant_id_idx")
    params = params_mod.override(core, {"locks": {"first_lock_timeout_ms": 150, "lock_timeout_ms": 150, "retry": {
        "attempts": 8, "backoff_ms": 100, "backoff_max_ms": 200}}})
    writer = db.connect()
    writer.execute("UPDATE workflows SET name = name WHERE id = 1")

    def end_after_the_first_timeout() -> None:
        """The writer ends once a try has timed out — the ladder then drops the INVALID index the try left — while
        the ladder is still climbing: on a busy machine a fixed delay could end it before the first try."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not db.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'DROP INDEX CONCURRENTLY%workflows_tenant_id_idx%'"):
            time.sleep(0.01)
        writer.rollback()
    ends = threading.Thread(target=end_after_the_first_timeout)
    ends.start()
    try:
        out = db.run("constrain", params=params)["constrain"]
    finally:
        ends.join()
        writer.close()
    built = out["applied"].set_index("action").loc["build the tenant_id index"]
    assert built["outcome"] == "applied" and built["attempts"] > 1
    assert db.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'workflows_tenant_id_idx'::regclass") is True
    assert db.scalar("SELECT count(*) FROM pg_index WHERE indrelid = 'workflows'::regclass AND NOT indisvalid") == 0
