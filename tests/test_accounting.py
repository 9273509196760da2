"""Every run accounted for (issue 16, item 3): a runner killed mid-run is closed by the next command, with a
manifest in the hash chain; its kernels leave no connection file; Ctrl-C ends with one line.

Each test drives `runbook run` on its own database (a copy of the test template, named in an edited ci.yaml
under RUNBOOK_HOME), so it never meets the ci demo database of tests/test_runner.py. Where papermill is not
under test, the runner executes the phases in-process (RUNNER below)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, ci_home, runbook_cli
from runbook_helpers.db import database

pytestmark = pytest.mark.slow

# `runbook run`, its notebooks replaced by the same phases run in-process (tests/conftest.py's run_phase)
RUNNER = """
import sys
from runbook_helpers import cli
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.run import runner
from runbook_helpers.run.session import PhaseSession
PHASE_OF = {notebook: phase for phase, notebook in runner.NOTEBOOKS.items()}

def in_process(source, target, parameters, timeout_s=None):
    run_phase(PhaseSession(PHASE_OF[source.name], parameters["env"], dry_run=parameters["dry_run"],
                           run_id=parameters["run_id"], log=lambda *_: None))

runner.execute_notebook = in_process
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def runner_home(db, home) -> Path:
    """RUNBOOK_HOME whose ci env is this test's database on the ci server."""
    return ci_home(home, db.name)


def cli(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return runbook_cli(*args, env={"RUNBOOK_HOME": str(home), **(env or {})})


def start_runner(home: Path, *args: str, env: dict | None = None, in_process: bool = True) -> subprocess.Popen:
    full = dict(os.environ, RUNBOOK_HOME=str(home), **(env or {}))
    command = [sys.executable, "-c", RUNNER] if in_process else [str(Path(sys.executable).with_name("runbook"))]
    return subprocess.Popen(command + list(args), env=full, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_folders(home: Path) -> list[Path]:
    base = home / "runs" / "ci"
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def wait_until(predicate, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def backends_of(db, run_id: str) -> list:
    with db.connect(autocommit=True) as conn:
        return conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
                            (f"%/{run_id}",)).fetchall()


def kill_runner_mid_constrain(db, home: Path) -> tuple[str, Path]:
    """SIGKILL the runner (in-process phases) in constrain, right after its first SET NOT NULL; returns its run id and folder."""
    proc = start_runner(home, "run", "--env", "ci", env={"RUNBOOK_FAULT": "ddl.after_step=set tenant_id NOT NULL#1"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "the fault point was never reached"
    (folder,) = run_folders(home)
    run_id = folder.name.rsplit("-", 1)[-1]
    assert not (folder / "manifest.json").exists()
    wait_until(lambda: not backends_of(db, run_id), "the killed runner's backends never went away", 30)
    return run_id, folder


def test_a_killed_run_is_closed_by_the_next_run_and_chained(db, runner_home):
    run_id, folder = kill_runner_mid_constrain(db, runner_home)
    with db.connect() as conn:
        assert conn.execute("SELECT status FROM tenancy_runbook.runs WHERE run_id = %s", (run_id,)).fetchone() == (
            "running",)
    # the next run closes it before its own starts
    again = start_runner(runner_home, "run", "--env", "ci")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, out + err
    assert f"run {run_id} died (its runner ended without finishing it): phases finished: inspect, seed, backfill; " \
           f"died in constrain" in out
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "died" and manifest["run_id"] == run_id
    assert manifest["reached"]["phases_finished"] == ["inspect", "seed", "backfill"]
    assert manifest["reached"]["in_phase"] == "constrain"
    assert manifest["closed_by"].startswith("run ")
    first, second = run_folders(runner_home)
    assert first == folder
    assert json.loads((second / "manifest.json").read_text())["previous_manifest"]["run"] == folder.name
    with db.connect() as conn:
        assert conn.execute("SELECT status, manifest_sha256 IS NOT NULL FROM tenancy_runbook.runs WHERE run_id = %s",
                            (run_id,)).fetchone() == ("died", True)
        assert conn.execute("SELECT array_agg(DISTINCT status) FROM tenancy_runbook.phase_runs WHERE run_id = %s "
                            "AND phase = 'constrain'", (run_id,)).fetchone()[0] == ["died"]
        assert conn.execute("SELECT count(*) FROM tenancy_runbook.statement_journal WHERE outcome = 'running'"
                            ).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM tenancy_runbook.runs WHERE status = 'running'").fetchone()[0] == 0
    listed = cli(runner_home, "audit", "list", "--env", "ci")
    assert listed.returncode == 0, listed.stderr
    assert f"{folder.name}  died" in listed.stdout and "gap" not in listed.stdout
    verified = cli(runner_home, "audit", "verify", "--env", "ci")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{folder.name}: every file matches" in verified.stdout
    # the died run's manifest removed: the gap is named, from the chain and from the ledger
    (folder / "manifest.json").unlink()
    # (audit would close the folder again as a run without a ledger row: it is not 'running' any more, so it
    # names the gap instead of rewriting history)
    gap = cli(runner_home, "audit", "verify", "--env", "ci")
    assert gap.returncode == 1
    assert f"chain: predecessor {folder.name} is missing" in gap.stdout
    assert f"run {run_id} (died) is in the ledger but its manifest is missing from the chain" in gap.stdout


def test_audit_closes_a_killed_run_and_verify_names_it_until_then(db, runner_home):
    run_id, folder = kill_runner_mid_constrain(db, runner_home)
    with db.connect(autocommit=True) as holder:  # a live run holds RUN_LOCK: audit leaves its rows alone
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (database.LOCK_CLASS, database.RUN_LOCK))
        busy = cli(runner_home, "audit", "verify", "--env", "ci")
        assert busy.returncode == 1, busy.stdout + busy.stderr
        assert f"{folder.name}: no manifest" in busy.stdout
        assert db.scalar("SELECT status FROM tenancy_runbook.runs WHERE run_id = %s", (run_id,)) == "running"
    listed = cli(runner_home, "audit", "list", "--env", "ci")
    assert f"run {run_id} died" in listed.stdout and f"{folder.name}  died" in listed.stdout, listed.stdout
    assert db.scalar("SELECT status FROM tenancy_runbook.runs WHERE run_id = %s", (run_id,)) == "died"
    assert cli(runner_home, "audit", "verify", run_id, "--env", "ci").returncode == 0


def pause_in_seed(db, home: Path, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """`runbook run` (papermill, real kernels) paused before seed's first statement; returns it and its run id."""
    marker = tmp_path / "paused"
    (tmp_path / "tmp").mkdir()  # the runner's TMPDIR: jupyter_client's default place for connection files
    proc = start_runner(home, "run", "--env", "ci", "--phases", "inspect,seed", in_process=False,
                        env={"RUNBOOK_FAULT": "ddl.before_step=*@pause", "RUNBOOK_FAULT_MARKER": str(marker),
                             "TMPDIR": str(tmp_path / "tmp")})
    wait_until(lambda: marker.exists() or proc.poll() is not None, "the run never reached seed", 240)
    assert proc.poll() is None, proc.communicate()
    (folder,) = run_folders(home)
    return proc, folder.name.rsplit("-", 1)[-1]


def kernel_files(run_id: str) -> list[Path]:
    return sorted((ROOT / ".runbook" / "kernels" / run_id).glob("kernel-*.json"))


def default_runtime_files() -> set[Path]:
    from jupyter_core.paths import jupyter_runtime_dir
    env = dict(os.environ)
    env.pop("JUPYTER_RUNTIME_DIR", None)
    folder = Path(subprocess.run([sys.executable, "-c", "from jupyter_core.paths import jupyter_runtime_dir as d; "
                                  "print(d())"], env=env, capture_output=True, text=True).stdout.strip()
                  or jupyter_runtime_dir())
    return set(folder.glob("kernel-*.json"))


def test_ctrl_c_ends_with_one_line_and_leaves_no_kernel_file(db, runner_home, tmp_path):
    before = default_runtime_files()
    proc, run_id = pause_in_seed(db, runner_home, tmp_path)
    assert kernel_files(run_id), "the kernel's connection file is not in the run's own runtime folder"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "zmq" not in (out + err).lower(), out + err
    lines = [line for line in (out + err).splitlines() if "interrupted" in line or "cancel" in line]
    assert len(lines) == 2, out + err  # what was cancelled, then the run's own last line (its archive)
    assert lines[0].strip().startswith("seed interrupted (Ctrl-C): cancelled "), lines
    assert "()" not in out + err
    assert lines[1].startswith(f"run {run_id} interrupted; archive: ")
    assert err.strip() == "", err
    assert not (ROOT / ".runbook" / "kernels" / run_id).exists()
    assert default_runtime_files() <= before
    assert list((tmp_path / "tmp").glob("*.json")) == []


def test_a_killed_runner_leaves_no_kernel_file_once_the_next_command_ran(db, runner_home, tmp_path):
    before = default_runtime_files()
    proc, run_id = pause_in_seed(db, runner_home, tmp_path)
    assert kernel_files(run_id)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # the orphaned kernel notices its parent is gone and exits (ipykernel's parent poller), freeing PHASE_LOCK
    wait_until(lambda: not backends_of(db, run_id), "the orphaned kernel's session never ended", 60)
    listed = cli(runner_home, "audit", "list", "--env", "ci")
    assert f"run {run_id} died" in listed.stdout, listed.stdout + listed.stderr
    assert not (ROOT / ".runbook" / "kernels" / run_id).exists()
    assert default_runtime_files() <= before
    assert list((tmp_path / "tmp").glob("*.json")) == []
