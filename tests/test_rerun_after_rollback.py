"""Rollback, then run again (issue 16, item 4): the second migration goes through in one go, and the baseline
can be reset deliberately (`runbook baseline reset`)."""

import pytest

from conftest import LEGACY_ON
from runbook_helpers import params as params_mod
from runbook_helpers.phases.headless import run_phase
from test_accounting import runner_home  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

FORWARD = ("inspect", "seed", "backfill", "constrain", "validate")


def test_rollback_then_run_succeeds_in_one_go(db):
    params = params_mod.override(db.params, LEGACY_ON)
    db.run(*FORWARD, params=params)
    run_phase(db.session("rollback", params=params))
    results = db.run(*FORWARD, params=params)  # raised before the fix: seed's "still to do: … memberships"
    assert results["validate"]["checks"]["passed"].all()
    assert db.scalar("SELECT count(*) FROM user_tenants") > 0


def test_baseline_reset_is_guarded_archived_and_lets_inspect_capture_anew(db, runner_home):  # noqa: F811
    import json

    from runbook_helpers.db import database
    from test_accounting import cli, run_folders, start_runner

    def runner(*args):
        proc = start_runner(runner_home, *args)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err

    runner("run", "--env", "ci", "--phases", "inspect,seed")  # partly migrated: seed inserted tenants
    before = db.scalar("SELECT row_count FROM tenancy_runbook.baseline WHERE table_name = 'workflows'")
    partly = cli(runner_home, "baseline", "reset", "--env", "ci")
    assert partly.returncode == 2 and "is migrated or partly migrated" in partly.stderr, partly.stderr
    assert "runbook rollback --env ci" in partly.stderr
    runner("rollback", "--env", "ci")
    with db.connect(autocommit=True) as holder:  # a run in progress
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (database.LOCK_CLASS, database.RUN_LOCK))
        busy = cli(runner_home, "baseline", "reset", "--env", "ci")
        assert busy.returncode == 2 and "another runbook run is in progress" in busy.stderr, busy.stderr
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline") == len(db.params.tables)  # refused: unchanged
    db.execute("INSERT INTO workflows (uuid, name) VALUES (gen_random_uuid(), 'written after the rollback')")
    done = cli(runner_home, "baseline", "reset", "--env", "ci")
    assert done.returncode == 0, done.stdout + done.stderr
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline") == 0
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.legacy_tables") == 0
    folder = run_folders(runner_home)[-1]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["phases"][0]["name"] == "baseline reset" and manifest["status"] == "succeeded"
    assert "workflows," in (folder / "baseline_before.csv").read_text()
    assert db.scalar("SELECT status FROM tenancy_runbook.runs WHERE run_id = %s", (manifest["run_id"],)) == "succeeded"
    assert cli(runner_home, "audit", "verify", "--env", "ci").returncode == 0
    runner("run", "--env", "ci", "--phases", "inspect")
    assert db.scalar("SELECT row_count FROM tenancy_runbook.baseline WHERE table_name = 'workflows'") == before + 1


def test_baseline_reset_needs_yes_where_the_env_requires_it():
    from conftest import runbook_cli
    result = runbook_cli("baseline", "reset", "--env", "prod", env={"RUNBOOK_PROD_DSN": ""})
    assert result.returncode == 2 and "add --yes to confirm the baseline reset" in result.stderr
