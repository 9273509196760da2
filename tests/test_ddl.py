"""The DDL executor: one statement per Step, journaled; connections go back to the pool as they came."""

from psycopg import sql

from runbook_helpers.db.ddl import Step


def test_connections_return_to_the_pool_out_of_autocommit(db):
    """A DDL try runs in autocommit; a pooled connection left that way would make a later backfill batch
    and its checkpoint commit separately (found by the kill test)."""
    rb = db.session("seed")
    try:
        step = Step("seed", "templates", "comment", sql.SQL("COMMENT ON TABLE templates IS 'probe'"), "x", "y")
        for _ in range(5):
            rb.executor().run(step)
        raws = [rb.engine.raw_connection() for _ in range(3)]
        try:
            assert [r.driver_connection.autocommit for r in raws] == [False, False, False]
        finally:
            for r in raws:
                r.close()
    finally:
        rb.close()


def test_a_dry_run_executes_and_journals_nothing(db):
    db.run("inspect")
    rb = db.session("seed", dry_run=True)
    try:
        step = Step("seed", "templates", "comment", sql.SQL("COMMENT ON TABLE templates IS 'probe'"), "x", "y")
        assert rb.executor().run(step).outcome == "dry run"
    finally:
        rb.close()
    assert db.scalar("SELECT obj_description('templates'::regclass)") is None
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.statement_journal") == 0


def test_a_steps_lock_mode_is_the_strongest_its_lock_text_names():
    """The ladder clears autovacuum and names long transactions by the mode a step takes: a step whose text
    was not one of ddl's constants (the rollout triggers: CREATE TRIGGER and DROP DEFAULT in one step) went
    without clearing and waited behind autovacuum (B10)."""
    from runbook_helpers.db import ddl
    from runbook_helpers.tenancy import rollout

    def mode(lock):
        return Step("p", "t", "a", sql.SQL("SELECT 1"), lock, "why").lock_mode

    assert mode(rollout.LOCK) == "AccessExclusiveLock"
    assert mode(ddl.foreign_key_lock("tenants")) == "ShareRowExclusiveLock"
    assert mode(rollout.TRIGGERS_ONLY_LOCK) == "ShareRowExclusiveLock"  # CREATE TRIGGER without DROP DEFAULT
    assert mode("SHARE UPDATE EXCLUSIVE on this partition only (reads and writes continue)") == "ShareUpdateExclusiveLock"
    assert mode(ddl.ROW_EXCLUSIVE_BATCH) == "RowExclusiveLock" and mode("ACCESS SHARE") == "AccessShareLock"
    assert mode(ddl.NEW_OBJECT) is None
    assert Step("p", "t", "a", sql.SQL("SELECT 1"), rollout.LOCK, "why").waits_for_autovacuum
    assert not Step("p", "t", "a", sql.SQL("SELECT 1"), ddl.ROW_EXCLUSIVE_BATCH, "why").waits_for_autovacuum
