"""06_finalize: it refuses while the application's writes still need the rollout trigger (or before
constrain), changing nothing; once they do not, it removes the triggers and leaves the end state the
schema declares; validate and rollback still work afterwards."""

import psycopg
import pytest

from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import finalize, rollback
from runbook_helpers.phases.headless import run_phase

TRIGGERS = ("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tenancy_rollout_%'")


def finalize_run(db, since=None, force=False, dry_run=False):
    return run_phase(db.session("finalize", dry_run=dry_run), since=since, force=force)


@pytest.fixture
def migrated(migrated_db):
    return migrated_db("inspect", "seed", "backfill", "constrain", "validate")


def test_it_refuses_while_writes_still_need_the_trigger_and_changes_nothing(migrated):
    db = migrated
    installed = db.scalar(TRIGGERS)
    assert installed >= 2 * len(db.params.tables)
    db.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'legacy write', 'x')")
    with pytest.raises(RunbookError, match=r"still writes rows without their tenant \(templates: 1 \(last .*\)\).* "
                                           r"Nothing was changed"):
        finalize_run(db)
    assert db.scalar(TRIGGERS) == installed
    assert db.scalar("SELECT status FROM tenancy_runbook.phase_runs WHERE phase = 'finalize'") == "failed"


def test_once_the_application_writes_tenant_id_it_closes_the_window(migrated):
    db = migrated
    db.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'before the release', 'x')")
    release = db.scalar("SELECT now()")
    system = db.scalar("SELECT id FROM tenants WHERE uuid = %s", (str(db.params.system_tenant.uuid),))
    db.execute("INSERT INTO templates (uuid, name, category, tenant_id) VALUES (gen_random_uuid(), 'after', 'x', %s)",
               (system,))
    out = finalize_run(db, since=release.isoformat())
    assert out["assists"]["writes that needed the trigger"].sum() == 0
    assert set(out["status"]["rollout trigger"]) == {"removed"} and set(out["status"]["default"]) == {"none"}
    assert db.scalar(TRIGGERS) == 0
    assert db.scalar("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                     "WHERE n.nspname = 'tenancy_runbook' AND p.proname LIKE 'rollout_%'") == 0
    # the end state: what the application's schema declares, so a write without tenant_id now fails
    with pytest.raises(psycopg.errors.NotNullViolation):
        db.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'legacy', 'x')")
    assert finalize_run(db)["applied"].empty  # a re-run does nothing
    # validate afterwards shows the reconciliation stored when the window closed, and passes
    checks = db.run("validate")["validate"]["checks"]
    assert checks["passed"].all(), checks[~checks["passed"]].to_dict("records")
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.capture_end") == len(db.params.tables)
    # a backfill re-run does not reopen the window
    db.run("backfill")
    assert db.scalar(TRIGGERS) == 0


def test_force_closes_the_window_anyway(migrated):
    db = migrated
    db.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'legacy write', 'x')")
    finalize_run(db, force=True)
    assert db.scalar(TRIGGERS) == 0


def test_it_refuses_before_constrain_and_on_a_bad_time(db):
    db.run("inspect", "seed", "backfill")
    with pytest.raises(RunbookError, match="not NOT NULL with a validated foreign key yet; run 04_constrain"):
        finalize_run(db)
    db.run("constrain")
    with pytest.raises(RunbookError, match="since='yesterday' is not a time"):
        finalize_run(db, since="yesterday")
    with pytest.raises(RunbookError, match="has no time zone"):
        finalize_run(db, since="2026-12-01T09:00:00")
    assert db.scalar(TRIGGERS) > 0


def test_rollback_after_finalize_restores_the_legacy_database(db):
    legacy_schema = db.schema_dump(exclude_ledger=True)
    db.run("inspect", "seed", "backfill", "constrain", "validate")
    finalize_run(db)
    rb = db.session("rollback")
    try:
        rollback.apply(rb)
        assert rollback.assert_rolled_back(rb).startswith("the database is back")
    finally:
        rb.close()
    assert db.schema_dump(exclude_ledger=True) == legacy_schema
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.capture_start") == 0  # the window's record is gone too


def test_a_dry_run_lists_the_plan_and_changes_nothing(migrated):
    db = migrated
    out = finalize_run(db, dry_run=True)
    assert set(out["applied"]["outcome"]) == {"dry run"}
    assert set(out["plan"]["action"]) == {"remove the rollout triggers"}
    assert db.scalar(TRIGGERS) > 0
    with db.session("finalize") as rb:
        assert len(finalize.steps(rb)) == len(db.params.tables)
