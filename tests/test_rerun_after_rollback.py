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
    # a completed rollback retires the baseline itself (see the test below); inspect captures one again
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline") == 0
    runner("run", "--env", "ci", "--phases", "inspect")
    assert db.scalar("SELECT row_count FROM tenancy_runbook.baseline WHERE table_name = 'workflows'") == before
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


def test_a_completed_rollback_archives_the_baseline_and_the_next_inspect_captures_a_fresh_one(db):
    """After 99_rollback reached its end state, the next 01_inspect measures the tables as they are now (the
    application kept writing); the old baseline stays readable in the ledger's past_baselines, under the rollback's
    run id. A dry run, or a rollback that has not reached its end, keeps it."""
    db.run("inspect", "seed", "backfill")
    query = "SELECT row_count, fingerprint, captured_at FROM tenancy_runbook.baseline WHERE table_name = 'workflows'"
    with db.connect() as conn:
        old = conn.execute(query).fetchone()
    db.execute("INSERT INTO workflows (uuid, name) VALUES (gen_random_uuid(), 'written before the rollback')")
    run_phase(db.session("rollback", dry_run=True))
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline") == len(db.params.tables)  # dry run: kept
    out = run_phase(db.session("rollback", run_id="rb0000a1"))
    assert "baseline" in out["verdict"] and "past_baselines" in out["verdict"], out["verdict"]
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline") == 0
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline_rows") == 0
    with db.connect() as conn:
        archived = conn.execute(
            "SELECT row_count, fingerprint, captured_at FROM tenancy_runbook.past_baselines WHERE table_name = "
            "'workflows' AND rollback_run_id = 'rb0000a1'").fetchone()
        assert archived == old
        assert conn.execute("SELECT count(*) FROM tenancy_runbook.past_baselines").fetchone()[0] == len(db.params.tables)
    run_phase(db.session("rollback"))  # a re-run of the finished rollback changes nothing, archives nothing more
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.past_baselines") == len(db.params.tables)
    db.execute("INSERT INTO workflows (uuid, name) VALUES (gen_random_uuid(), 'written after the rollback')")
    out = run_phase(db.session("inspect"))
    status = out["baseline"].set_index("table").loc["workflows", "status"]
    assert status == "captured now", status
    with db.connect() as conn:
        new = conn.execute(query).fetchone()
    assert new[0] == old[0] + 2 and new[1] != old[1] and new[2] > old[2]
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline_rows WHERE table_name = 'workflows'") == new[0]
