"""`runbook plan` beside a run (issue 16, item 4): it takes neither single-runner lock, and its sessions are
read-only, so it can never change what the run relies on."""

import pytest
import sqlalchemy.exc
from sqlalchemy import text

from runbook_helpers.db import database
from runbook_helpers.run.session import PhaseSession
from test_accounting import cli, runner_home  # noqa: F401  (runner_home: a fixture)


def test_plan_runs_while_another_session_holds_the_run_lock(db, runner_home):  # noqa: F811
    with db.connect(autocommit=True) as holder:  # a run in progress: its runner and its kernel
        holder.execute("SELECT pg_advisory_lock(%s, %s), pg_advisory_lock(%s, %s)",
                       (database.LOCK_CLASS, database.RUN_LOCK, database.LOCK_CLASS, database.PHASE_LOCK))
        refused = cli(runner_home, "run", "--env", "ci", "--phases", "inspect")
        assert refused.returncode == 2 and "another runbook run is in progress" in refused.stderr
        plan = cli(runner_home, "plan", "--env", "ci")
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert "tenant_id" in plan.stdout and "constrain" in plan.stdout
    assert db.scalar("SELECT to_regnamespace('tenancy_runbook')") is None  # nothing written, not even the ledger


def test_a_read_only_session_cannot_write(db):
    with PhaseSession("inspect", params=db.params, database_name=db.name, read_only=True, log=lambda *_: None) as rb:
        assert rb.dry_run
        with rb.engine.connect() as conn:
            with pytest.raises(sqlalchemy.exc.DBAPIError, match="read-only transaction"):
                conn.execute(text("CREATE TABLE plan_wrote_this (x int)"))
        with pytest.raises(sqlalchemy.exc.DBAPIError, match="read-only transaction"):
            rb.control.execute(text("CREATE TABLE plan_wrote_this (x int)"))
    assert db.scalar("SELECT to_regclass('plan_wrote_this')") is None
