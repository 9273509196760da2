"""`runbook run` end to end: papermill executes the five notebooks, the run is archived and verifiable."""

import csv
import hashlib
import json
import time
from pathlib import Path

import psycopg
import pytest

from conftest import ROOT, runbook_cli
from runbook_helpers.run import archive
from runbook_helpers.db import database
from runbook_helpers.legacy import checks as legacy_checks
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.db.server import EmbeddedServer
from runbook_helpers.run.session import PHASES, PhaseSession

# Every test that uses the ci demo database or runs/ci lives in this file: `--dist loadfile` runs a file on one
# worker, so they never meet, and the rest of the suite runs beside them on the other.
pytestmark = [pytest.mark.slow]


def latest_run(before: set[Path]) -> Path:
    runs = set((Path(archive.paths.project_root()) / "runs" / "ci").glob("*"))
    new = sorted(runs - before)
    assert len(new) == 1, new
    return new[0]


def existing_runs() -> set[Path]:
    return set((Path(archive.paths.project_root()) / "runs" / "ci").glob("*"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def app_schema(url: str, server: EmbeddedServer) -> str:
    import subprocess
    out = subprocess.run([str(server.tool("pg_dump")), "--schema-only", "--exclude-schema=tenancy_runbook", "-d", url],
                         capture_output=True, text=True, check=True).stdout
    return "\n".join(l for l in out.splitlines() if not l.startswith(("\\restrict", "\\unrestrict")))


UNLISTED_NOTE = "unlisted_tables.csv: 3 tables in neither core_tables nor shared_tables (org, org_user, user)"


def test_run_dry_run_then_for_real_then_again(server):
    demo = runbook_cli("demo-db", "--env", "ci")
    assert demo.returncode == 0, demo.stderr
    url = server.url("tenancy_demo")
    legacy = app_schema(url, server)

    # a dry run changes nothing, not even the ledger
    before = existing_runs()
    dry = runbook_cli("run", "--env", "ci", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert app_schema(url, server) == legacy
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regnamespace('tenancy_runbook')").fetchone()[0] is None
    dry_manifest = json.loads((latest_run(before) / "manifest.json").read_text())
    assert dry_manifest["dry_run"] is True and dry_manifest["status"] == "succeeded"
    # the tables in neither core_tables nor shared_tables are in the archive, a dry run's too (issue 27)
    assert dry_manifest["unlisted_tables"] == UNLISTED_NOTE

    # the real run
    before = existing_runs()
    result = runbook_cli("run", "--env", "ci")
    assert result.returncode == 0, result.stdout + result.stderr
    folder = latest_run(before)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["env"] == "ci"
    assert [p["name"] for p in manifest["phases"]] == ["inspect", "seed", "backfill", "constrain", "validate"]
    assert {p["status"] for p in manifest["phases"]} == {"succeeded"}
    notebooks = sorted(p.name for p in folder.glob("*.ipynb"))
    htmls = sorted(p.name for p in folder.glob("*.html"))
    assert notebooks == ["01_inspect.ipynb", "02_seed.ipynb", "03_backfill.ipynb", "04_constrain.ipynb",
                         "05_validate.ipynb"]
    assert htmls == [n.replace(".ipynb", ".html") for n in notebooks]
    assert manifest["files"] == {p.name: sha256(p) for p in folder.iterdir() if p.name != "manifest.json"}
    # ci.yaml opts into the legacy mapping: every planted ambiguity kind is in the archive's CSV
    with open(folder / "legacy_ambiguities.csv", newline="") as f:
        kinds = {row["kind"] for row in csv.DictReader(f)}
    assert kinds == set(legacy_checks.KINDS) - {legacy_checks.NO_ROLE}
    assert manifest["legacy_ambiguities"].startswith("legacy_ambiguities.csv: ")
    # every foreign key between the demo's tenant tables checked for rows across tenants: none
    with open(folder / "tenant_conflicts.csv", newline="") as f:
        checked = list(csv.DictReader(f))
    assert checked and {row["status"] for row in checked} == {"ok"}
    assert manifest["tenant_conflicts"].startswith(f"tenant_conflicts.csv: {len(checked)} checked, 0 with rows")
    # the demo's tables in neither list: its legacy tables, which ci.yaml names as the tenant source
    with open(folder / "unlisted_tables.csv", newline="") as f:
        unlisted = {row["table"]: row for row in csv.DictReader(f)}
    assert sorted(unlisted) == ["org", "org_user", "user"]
    assert unlisted["org"]["known as"] == "legacy.source.tenants"
    assert unlisted["user"]["referenced by core tables"] == "workflows.workflows_created_by_fkey (created_by -> user)"
    assert manifest["unlisted_tables"] == UNLISTED_NOTE
    # the Drizzle hand-over: what schema.ts declares now, per table and as the diff of demo/app/src/schema.ts
    assert "## rules (`rules`)" in (folder / "drizzle_schema.md").read_text()
    assert '+  pgPolicy("tenant_legacy_access"' in (folder / "drizzle_schema.diff").read_text()
    assert manifest["drizzle_schema"].startswith("drizzle_schema.md and drizzle_schema.diff")
    assert manifest["application_writes"] is None  # nothing wrote during this run
    # what paced the batched backfill (knowledge_bases, and the tables the legacy mapping moves), per batch:
    # archived as CSV and chart
    with open(folder / "backfill_pace.csv", newline="") as f:
        pace = list(csv.DictReader(f))
    batches = {t: sum(r["table_name"] == t for r in pace) for t in {r["table_name"] for r in pace}}
    assert "knowledge_bases" in batches and set(batches) <= set(manifest["params"]["core_tables"])
    assert all(int(r["batch_size"]) > 0 and float(r["pace_ms"]) >= 0 for r in pace)
    assert any(r["canary_p99_ms"] for r in pace)
    assert (folder / "backfill_pace.png").read_bytes()[:4] == b"\x89PNG"
    assert manifest["backfill_pace"] == "backfill_pace.csv and backfill_pace.png: " + ", ".join(
        f"{t}: {n} batches" for t, n in sorted(batches.items()))
    assert manifest["server"]["database"] == "tenancy_demo" and manifest["server"]["version"]
    assert manifest["params"]["system_tenant"]["uuid"] == "00000000-0000-4000-8000-000000000001"
    assert manifest["headline"]["baseline_rows"] > 90_000
    assert manifest["secret_scan"] == "clean"
    assert manifest["previous_manifest"]["sha256"] == sha256(sorted(before)[-1] / "manifest.json")
    # the executed validate notebook carries the verdict; the papermill parameters hold no secret
    validate = json.loads((folder / "05_validate.ipynb").read_text())
    assert "all " in json.dumps(validate) and "checks passed" in json.dumps(validate)
    with psycopg.connect(url) as conn:
        run_row = conn.execute("SELECT status, manifest_sha256, phases FROM tenancy_runbook.runs "
                               "WHERE run_id = %s", (manifest["run_id"],)).fetchone()
        assert run_row == ("succeeded", sha256(folder / "manifest.json"),
                           ["inspect", "seed", "backfill", "constrain", "validate"])
        phase_rows = conn.execute("SELECT phase, status FROM tenancy_runbook.phase_runs WHERE run_id = %s "
                                  "ORDER BY id", (manifest["run_id"],)).fetchall()
        assert phase_rows == [(p, "succeeded") for p in ("inspect", "seed", "backfill", "constrain", "validate")]
    migrated = app_schema(url, server)
    assert migrated != legacy

    # running again succeeds and changes nothing; what the application wrote meanwhile is in its archive
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE templates SET name = name || ' (renamed)' WHERE id = 7")
    before = existing_runs()
    again = runbook_cli("run", "--env", "ci")
    assert again.returncode == 0, again.stdout + again.stderr
    second = latest_run(before)
    second_manifest = json.loads((second / "manifest.json").read_text())
    with open(second / "application_writes.csv", newline="") as f:
        assert [(r["table"], r["key"], r["change"]) for r in csv.DictReader(f)] == [("templates", '["7"]', "updated")]
    assert "(renamed)" not in (second / "application_writes.csv").read_text()  # keys only
    assert second_manifest["previous_manifest"] == {"run": folder.name, "sha256": sha256(folder / "manifest.json")}
    assert app_schema(url, server) == migrated
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM tenancy_runbook.statement_journal WHERE run_id = %s",
                            (second_manifest["run_id"],)).fetchone()[0] == 0


def test_a_failing_phase_stops_the_run_with_its_error(server):
    assert runbook_cli("demo-db", "--env", "ci").returncode == 0
    before = existing_runs()
    result = runbook_cli("run", "--env", "ci", "--phases", "validate,backfill")
    assert result.returncode == 1
    assert "backfill failed" in result.stdout
    assert "RunbookError: no baseline for" in result.stdout
    manifest = json.loads((latest_run(before) / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert [p["name"] for p in manifest["phases"]] == ["backfill"]  # phases run in runbook order; validate never ran
    assert manifest["phases"][0]["error"].startswith("RunbookError: no baseline for")
    url = server.url("tenancy_demo")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT status FROM tenancy_runbook.runs WHERE run_id = %s",
                            (manifest["run_id"],)).fetchone()[0] == "failed"


def test_a_second_runner_fails_fast_naming_the_holder(server):
    url = server.url("tenancy_demo")
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SET application_name = 'someone-elses-run'")
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (database.LOCK_CLASS, database.RUN_LOCK))
        holder_pid = holder.info.backend_pid
        started = time.monotonic()
        result = runbook_cli("run", "--env", "ci", "--phases", "inspect")
        elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert "another runbook run is in progress on this database" in result.stderr
    assert f"pid {holder_pid} (someone-elses-run" in result.stderr
    assert elapsed < 30


def test_prod_requires_yes_before_anything_happens():
    result = runbook_cli("run", "--env", "prod", env={"RUNBOOK_PROD_DSN": ""})
    assert result.returncode == 2
    assert "add --yes to confirm" in result.stderr


def test_archive_scan_redacts_and_reports_a_planted_secret(tmp_path):
    (tmp_path / "01_inspect.ipynb").write_text('{"text": "connected with hunter2-password"}')
    (tmp_path / "clean.html").write_text("<p>nothing here</p>")
    (tmp_path / "log.txt").write_text("url postgresql://app:pw123@db.internal/app")
    findings = archive.scan_for_secrets(tmp_path, ["hunter2-password"])
    assert findings == ["01_inspect.ipynb: contained a secret of this run (plain) (redacted)",
                        "log.txt: contained a URL with an inline password (redacted)"]
    assert "hunter2" not in (tmp_path / "01_inspect.ipynb").read_text()
    assert "pw123" not in (tmp_path / "log.txt").read_text()


def test_sigterm_cancels_the_statement_on_the_server_and_a_rerun_resumes(server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    assert runbook_cli("demo-db", "--env", "ci").returncode == 0
    url = server.url("tenancy_demo")
    for phase in ("inspect", "seed", "backfill"):  # not the subject: the run SIGTERMed in constrain is
        run_phase(PhaseSession(phase, "ci", log=lambda *_: None))
    marker = tmp_path / "paused"
    env = dict(os.environ, RUNBOOK_FAULT="ddl.before_step=validate the NOT NULL check@pause",
               RUNBOOK_FAULT_MARKER=str(marker))
    runbook = Path(sys.executable).with_name("runbook")
    before = existing_runs()
    proc = subprocess.Popen([str(runbook), "run", "--env", "ci", "--phases", "constrain,validate"], env=env,
                            cwd=archive.paths.project_root(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the run never reached VALIDATE"
        time.sleep(0.1)
    with psycopg.connect(url) as blocker:
        blocker.execute("LOCK TABLE workflows IN SHARE MODE")  # VALIDATE will wait behind this
        marker.unlink()

        def validating():
            with psycopg.connect(url, autocommit=True) as c:
                return c.execute("SELECT pid FROM pg_stat_activity WHERE query LIKE 'ALTER TABLE%VALIDATE CONSTRAINT%' "
                                 "AND application_name LIKE 'tenancy-runbook/ci/constrain/%'").fetchall()
        while not validating():
            assert time.monotonic() < deadline, "VALIDATE never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, out + err
        assert "interrupted" in out
        # the runner cancels the statement, unless the server already ended it when the kernel died
        assert ("cancelled 1 statement(s)" in out or "no statement of this run is still running" in out), out
        assert validating() == []  # no orphaned VALIDATE keeps running (or waiting) for nobody
        blocker.rollback()
    manifest = json.loads((latest_run(before) / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [p["status"] for p in manifest["phases"]][-1] == "interrupted"
    again = runbook_cli("run", "--env", "ci", "--phases", "constrain,validate")  # the phases it had not finished
    assert again.returncode == 0, again.stdout + again.stderr


def test_finalize_then_rollback_cli_restores_the_legacy_schema(server):
    assert runbook_cli("demo-db", "--env", "ci").returncode == 0
    url = server.url("tenancy_demo")
    legacy = app_schema(url, server)
    for phase in PHASES:  # migrated without notebooks (the runs above prove those); finalize and rollback are the subject
        run_phase(PhaseSession(phase, "ci", log=lambda *_: None))
    assert app_schema(url, server) != legacy
    bad = runbook_cli("finalize", "--env", "ci", "--since", "last tuesday")
    assert bad.returncode == 2 and "is not a time" in bad.stderr
    before = existing_runs()
    closed = runbook_cli("finalize", "--env", "ci", "--since", "2026-01-01T00:00:00+00:00")
    assert closed.returncode == 0, closed.stdout + closed.stderr
    folder = latest_run(before)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [p["name"] for p in manifest["phases"]] == ["finalize"] and manifest["status"] == "succeeded"
    assert (folder / "06_finalize.ipynb").exists() and (folder / "06_finalize.html").exists()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tenancy_rollout_%'").fetchone()[0] == 0
    # 07_distribute: refused without Citus before anything runs (no run folder, nothing changed); its dry run runs
    # the notebook and shows the plan
    finalized, before = app_schema(url, server), existing_runs()
    refused = runbook_cli("distribute", "--env", "ci")
    assert refused.returncode == 2 and refused.stderr.startswith("runbook: error: this server has no citus extension")
    assert existing_runs() == before and app_schema(url, server) == finalized
    dry = runbook_cli("distribute", "--env", "ci", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert [p["name"] for p in json.loads((latest_run(before) / "manifest.json").read_text())["phases"]] == ["distribute"]
    assert app_schema(url, server) == finalized
    before = existing_runs()
    result = runbook_cli("rollback", "--env", "ci")
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((latest_run(before) / "manifest.json").read_text())
    assert [p["name"] for p in manifest["phases"]] == ["rollback"]
    assert app_schema(url, server) == legacy
    assert runbook_cli("audit", "verify", manifest["run_id"], "--env", "ci").returncode == 0


def test_a_cell_timeout_cancels_the_statement_on_the_server_and_a_rerun_resumes(server, home):
    """papermill's cell timeout ends the kernel; the statement it was waiting on must not live on."""
    assert runbook_cli("demo-db", "--env", "ci").returncode == 0
    url = server.url("tenancy_demo")
    for phase in ("inspect", "seed", "backfill"):
        run_phase(PhaseSession(phase, "ci", log=lambda *_: None))
    (home / ".runbook").symlink_to(ROOT / ".runbook")  # the same ci server, with edited params
    ci = home / "params" / "ci.yaml"
    # every try waits 120 s: so the statement waits, not the ladder
    ci.write_text(ci.read_text() + "locks:\n  first_lock_timeout_ms: 120000\n  lock_timeout_ms: 120000\n")
    with psycopg.connect(url) as blocker:
        blocker.execute("LOCK TABLE workflows IN SHARE MODE")  # constrain's first statement on workflows waits
        started = time.monotonic()
        result = runbook_cli("run", "--env", "ci", "--phases", "constrain", "--cell-timeout", "10",
                             env={"RUNBOOK_HOME": str(home)})
        elapsed = time.monotonic() - started
        assert result.returncode == 1, result.stdout + result.stderr
        assert elapsed < 90  # far less than the 120 s lock wait
        folder = next((home / "runs" / "ci").iterdir())
        manifest = json.loads((folder / "manifest.json").read_text())
        with psycopg.connect(url, autocommit=True) as conn:
            left = conn.execute("SELECT pid, state, query FROM pg_stat_activity WHERE application_name LIKE %s",
                                (f"%/{manifest['run_id']}",)).fetchall()
        assert left == []  # no orphaned backend keeps waiting (and would then run) for a dead kernel
        blocker.rollback()
    assert manifest["status"] == "failed"
    assert "Timeout" in manifest["phases"][0]["error"] or "timed out" in manifest["phases"][0]["error"]
    again = runbook_cli("run", "--env", "ci", "--phases", "constrain,validate")
    assert again.returncode == 0, again.stdout + again.stderr


def test_cli_reset_rebuilds_the_demo_database(server):
    with psycopg.connect(server.url("tenancy_demo"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS leftover (x int)")
    result = runbook_cli("db", "reset", "--env", "ci")
    assert result.returncode == 0, result.stderr
    assert "demo database tenancy_demo: 101,411 rows in 15 tables" in result.stdout
    with psycopg.connect(server.url("tenancy_demo")) as conn:
        assert conn.execute("SELECT to_regclass('leftover')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == 20000
