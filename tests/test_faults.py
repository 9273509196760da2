"""Faults: the runner killed (SIGKILL) at many points, the server restarted under it, a statement
interrupted on the server. Each time the re-run completes, nothing is lost, nothing is left half-built,
and no backend keeps working for a dead client."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

import step_harness as harness
import warm_worker
from conftest import ROOT, TEMPLATE_ROWS, TEMPLATE_SCALE, Db, create_database, drop_database
from runbook_helpers import demo
from runbook_helpers.db.server import EmbeddedServer
from runbook_helpers import params as params_mod

pytestmark = pytest.mark.slow

WORKER = """
import json
import sys
from runbook_helpers import params as params_mod
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.run.session import PhaseSession
p = params_mod.override(params_mod.load("ci"), {"backfill": {"batch_size": 300, "target_batch_ms": None}})
if len(sys.argv) > 3:
    p = params_mod.override(p, json.loads(sys.argv[3]))
for phase in sys.argv[2].split(","):
    run_phase(PhaseSession(phase, params=p, database_name=sys.argv[1], run_id="faultrun",
                           log=lambda *_: None))
print("completed")
"""
FORWARD = "inspect,seed,backfill,constrain"

# Real SIGKILLs of the runner process right after a step. The steps are not listed here: they are what an
# uninterrupted run of the phase commits, recorded in-process (tests/step_harness.py), so a new step is reachable
# the day it is added; tests/test_steps_killed.py stops each phase after one step of each kind in-process, and here a
# real kill is sent at a sample of them (RUNBOOK_STEPS=all, make test-matrix: one of each kind here too).
SIGKILL_SAMPLE = [("backfill", "first"), ("backfill", "a batch"), ("backfill", "last"), ("constrain", "first"),
                  ("constrain", "middle"), ("constrain", "last")]
if os.environ.get("RUNBOOK_STEPS") == "all":  # a share of the kinds per test, each test well within its timeout
    SIGKILL_SAMPLE = [(phase, f"kinds {i}/{n}") for phase, n in (("backfill", 2), ("constrain", 6)) for i in range(n)]
# what the worker runs with (WORKER): the phases before a kill point's phase are run once per worker into a template
# with the same params (tests/conftest.py's migrated_db), so each test starts where its killed run's phase begins
WORKER_PARAMS = params_mod.override(params_mod.load("ci"), {"backfill": {"batch_size": 300, "target_batch_ms": None}})
BEFORE = {"backfill": ("inspect", "seed"), "constrain": ("inspect", "seed", "backfill")}


def run_worker(db, phases: str, fault: str | None = None, marker: Path | None = None, wait: bool = True,
               overrides: dict | None = None):
    env = dict(os.environ, RUNBOOK_HEADLESS="1")
    env.pop("RUNBOOK_FAULT", None)
    if fault:
        env["RUNBOOK_FAULT"] = fault
    if marker:
        env["RUNBOOK_FAULT_MARKER"] = str(marker)
    # a process of its own, forked from a warm one (tests/warm_worker.py) rather than paying its imports each time
    proc = warm_worker.popen(WORKER, [db.name, phases] + ([json.dumps(overrides)] if overrides else []), env=env,
                             cwd=ROOT)
    if wait:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    return proc


def assert_complete_and_intact(db):
    """Validate passes (counts and fingerprints equal the baseline, constraints valid, isolation holds), every
    row has a tenant, and nothing duplicate or INVALID is left. Returns the rows checked."""
    out = db.run("validate")["validate"]
    assert out["checks"]["passed"].all()
    checked = 0
    with db.connect() as conn:
        for table in db.params.tables:
            rows, nulls = conn.execute(f"SELECT count(*), count(*) - count(tenant_id) FROM {table}").fetchone()
            assert nulls == 0, table
            checked += rows
        assert conn.execute("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n "
                            "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND NOT i.indisvalid").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_constraint WHERE NOT convalidated AND connamespace = "
                            "'public'::regnamespace").fetchone()[0] == 0
        duplicates = conn.execute(
            "SELECT conrelid::regclass, array_agg(conname) FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
            "AND contype IN ('f', 'c', 'u') GROUP BY conrelid, contype, pg_get_constraintdef(oid) "
            "HAVING count(*) > 1").fetchall()
        assert duplicates == []
        indexes = conn.execute(
            "SELECT indrelid::regclass, array_agg(indexrelid::regclass) FROM pg_index i JOIN pg_class c ON "
            "c.oid = i.indrelid WHERE c.relnamespace = 'public'::regnamespace GROUP BY indrelid, indkey::text, "
            "indisunique, indpred IS NULL HAVING count(*) > 1").fetchall()
        assert indexes == []
    return checked


_steps: dict[str, list[str]] = {}  # per worker: the steps an uninterrupted run of each phase commits


def kill_specs(migrated_db, phase: str, which: str) -> list[str]:
    """RUNBOOK_FAULT specs that SIGKILL the runner right after the chosen steps of `phase`: the step's label and
    its occurrence (a batch's label repeats), as the failpoint step.done sees them."""
    if phase not in _steps:
        harness.warm_up(migrated_db(*BEFORE[phase], params=WORKER_PARAMS), phase)
        _steps[phase] = harness.recorded_steps(migrated_db(*BEFORE[phase], params=WORKER_PARAMS), phase)
    steps = _steps[phase]
    assert steps, f"{phase} committed no step"
    kind, _, share_of = which.partition(" ") if which.startswith("kinds ") else (which, "", "0/1")
    share, _, shares = share_of.partition("/")
    positions = {"first": lambda: [1], "middle": lambda: [len(steps) // 2], "last": lambda: [len(steps)],
                 "a batch": lambda: [[i for i, s in enumerate(steps, 1) if s.endswith(": batch")][1]],  # the 2nd
                 "kinds": lambda: harness.one_per_kind(steps)[int(share):: int(shares)]}[kind]()
    return [f"step.done={glob.escape(steps[n - 1])}#{steps[:n].count(steps[n - 1])}" for n in positions]


@pytest.mark.parametrize("phase,which", SIGKILL_SAMPLE, ids=[f"{p}-{w}" for p, w in SIGKILL_SAMPLE])
def test_killed_right_after_a_step_then_rerun_completes(migrated_db, ci_params, phase, which):
    # the killed run still runs every phase (FORWARD): those before `phase` find nothing left to do and commit no
    # step, so the kill lands on the phase's own step
    for fault in kill_specs(migrated_db, phase, which):
        db = replace(migrated_db(*BEFORE[phase], params=WORKER_PARAMS), params=ci_params)
        code, out, err = run_worker(db, FORWARD, f"{fault}@kill")
        assert code == -signal.SIGKILL, f"the step was never reached ({fault}): {code} {out} {err[-2000:]}"
        code, out, err = run_worker(db, FORWARD)
        assert code == 0, err[-3000:]
        assert assert_complete_and_intact(db) > 0


def test_killed_while_inspect_records_the_tenant_ids_of_before_then_rerun_records_them_all(db):
    """Rollback puts back the tenant_id a table had before the migration from inspect's record of it: a run killed
    while recording must not leave the table marked as recorded with only part of its values."""
    with db.connect() as conn:
        before = conn.execute("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NOT NULL").fetchone()[0]
    assert before > 0  # the demo's partly applied migration 0001
    code, out, err = run_worker(db, "inspect", "inspect.after_tenant_values=knowledge_bases@kill")
    assert code == -signal.SIGKILL, f"the fault point was never reached: {code} {out} {err[-2000:]}"
    code, out, err = run_worker(db, "inspect")
    assert code == 0, err[-3000:]
    with db.connect() as conn:
        recorded = conn.execute("SELECT count(*) FROM tenancy_runbook.legacy_tenant_values "
                                "WHERE table_name = 'knowledge_bases'").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM tenancy_runbook.legacy_tables").fetchone()[0]
    assert recorded == before
    assert tables == len(db.params.tables)


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def backends_of_run(db) -> list:
    with db.connect(autocommit=True) as conn:
        return conn.execute("SELECT pid, state, left(query, 60) FROM pg_stat_activity WHERE application_name LIKE "
                            "'%%/faultrun' AND datname = %s", (db.name,)).fetchall()


@pytest.mark.parametrize("step,lock", [
    ("validate the NOT NULL check", "SHARE"),           # VALIDATE waits behind a SHARE lock
    ("build the tenant_id index", None),                 # CREATE INDEX CONCURRENTLY waits for an open writer
])
def test_killed_while_a_statement_runs_on_the_server(db, tmp_path, step, lock):
    marker = tmp_path / "paused"
    # the statement must still be waiting on the server when the runner dies: one long try, not the short ladder
    proc = run_worker(db, FORWARD, f"ddl.before_step={step}@pause", marker, wait=False,
                      overrides={"locks": {"first_lock_timeout_ms": 60000, "lock_timeout_ms": 60000}})
    wait_for(marker)
    blocker = db.connect()
    if lock:
        blocker.execute(f"LOCK TABLE workflows IN {lock} MODE")
    else:
        blocker.execute("UPDATE workflows SET name = name WHERE id = 1")
    marker.unlink()  # the runner carries on into the statement, which now waits on the blocker
    deadline = time.monotonic() + 30
    while not any(step_sql in (b[2] or "") for b in backends_of_run(db) for step_sql in ("VALIDATE", "CREATE INDEX")):
        assert time.monotonic() < deadline, "the statement never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    # the server notices the dead client (client_connection_check_interval) and stops the statement
    deadline = time.monotonic() + 10
    while backends_of_run(db):
        assert time.monotonic() < deadline, f"orphaned backend still running: {backends_of_run(db)}"
        time.sleep(0.2)
    blocker.rollback()
    blocker.close()
    code, out, err = run_worker(db, FORWARD)
    assert code == 0, err[-3000:]
    assert_complete_and_intact(db)


RESTART_ENV = "ci_restart"  # a server of its own (.runbook/ci_restart/), so the other tests never see it restart


@pytest.fixture(scope="module")
def restart_server(ci_params):
    srv = EmbeddedServer(RESTART_ENV)
    srv.start()
    drop_database(srv, "restart_template")
    demo.build(srv.url(), "restart_template", system_uuid=str(ci_params.system_tenant.uuid), rows=TEMPLATE_ROWS,
               scale=TEMPLATE_SCALE, log=lambda *_: None)
    yield srv
    srv.stop()


@pytest.fixture
def restart_db(restart_server, ci_params):
    name = f"t_{uuid.uuid4().hex[:12]}"
    create_database(restart_server, name, "restart_template")
    yield Db(restart_server, name, params_mod.override(ci_params, {"env": RESTART_ENV}))
    drop_database(restart_server, name)


@pytest.mark.parametrize("fault", ["backfill.after_batch=knowledge_bases#2", "ddl.after_step=set tenant_id NOT NULL#3"])
def test_server_restarted_mid_phase_then_rerun_completes(restart_db, restart_server, tmp_path, fault):
    db, server, on_it = restart_db, restart_server, {"env": RESTART_ENV}
    # The test database was cloned from the template (CREATE DATABASE ... STRATEGY WAL_LOG) a moment ago: until
    # the next checkpoint its sequences hand out values without WAL-logging them, and crash recovery restores
    # the copied page, so tenants_id_seq would go back under the tenants seed inserted. A real database has
    # been checkpointed since it was created; so is this one before the crash.
    db.execute("CHECKPOINT")
    marker = tmp_path / "paused"
    proc = run_worker(db, FORWARD, f"{fault}@hang", marker, wait=False, overrides=on_it)
    wait_for(marker)
    server.stop(mode="immediate")
    proc.kill()
    proc.wait(30)
    server.start()
    code, out, err = run_worker(db, FORWARD, overrides=on_it)
    assert code == 0, err[-3000:]
    assert_complete_and_intact(db)


def _restart_home(home: Path, database: str) -> Path:
    """`home` with an env ci_restart: the ci params on the restart server's `database`, batches of 300 rows."""
    (home / ".runbook").symlink_to(ROOT / ".runbook")
    (home / "params" / f"{RESTART_ENV}.yaml").write_text(
        f"extends: ci.yaml\ndatabase:\n  embedded: true\n  name: {database}\nbackfill:\n  batch_size: 300\n")
    return home


@pytest.mark.parametrize("pause", ["backfill.mid_batch=knowledge_bases#2", "backfill.before_batch=knowledge_bases#2"],
                         ids=["inside a batch", "between two batches"])
def test_server_stopped_mid_backfill_ends_the_run_with_its_line_and_a_manifest(restart_db, restart_server, home,
                                                                              tmp_path, pause):
    """The server stops (immediate shutdown) inside a batch of `runbook run` (its UPDATE done), or between two: the run
    fails as a phase fails (exit 1, the batch's one line), never as an internal error or a driver's raw exception, and
    its manifest says where it stopped."""
    from conftest import runbook_cli
    db, server = restart_db, restart_server
    db.execute("CHECKPOINT")  # see test_server_restarted_mid_phase_then_rerun_completes
    home = _restart_home(home, db.name)
    marker = tmp_path / "paused"
    runbook = Path(sys.executable).with_name("runbook")
    proc = subprocess.Popen([str(runbook), "run", "--env", RESTART_ENV, "--phases", "inspect,seed,backfill"],
                            env=dict(os.environ, RUNBOOK_HOME=str(home), RUNBOOK_FAULT_MARKER=str(marker),
                                     RUNBOOK_FAULT=f"{pause}@pause"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker, 300)
        server.stop(mode="immediate")
        marker.unlink()  # the kernel carries on into its next batch, on a server that is gone
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.start()
    assert proc.returncode == 1, out + err
    assert "internal error" not in err and "Traceback" not in err, err
    assert "knowledge_bases: backfill batch failed: " in out and "every committed checkpoint is intact" in out, out
    assert "the server went away" in out, out
    folder = next((home / "runs" / RESTART_ENV).iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["stopped_at"]["phase"] == "backfill" and manifest["stopped_at"]["status"] == "failed"
    assert "knowledge_bases: backfill batch failed" in manifest["stopped_at"]["error"]
    assert manifest["server_went_away"]
    assert [p["name"] for p in manifest["phases"]] == ["inspect", "seed", "backfill"]


def _journal(db) -> list:
    with db.connect() as conn:
        return conn.execute("SELECT id, table_name, action FROM tenancy_runbook.statement_journal ORDER BY id").fetchall()


def _kernels_of(pid: int) -> list[int]:
    """The pids of the ipykernel processes whose parent is `pid`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (proc / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and b"ipykernel" in cmd:
                found.append(int(proc.name))
    return found


def _gone(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_runner_killed_between_two_steps_its_kernel_starts_no_other_statement(migrated_db, home, tmp_path):
    """SIGKILL of `runbook run` while its kernel is between two constrain steps: the kernel is gone within
    seconds, and neither the journal nor the server sees the next step."""
    from conftest import ci_home
    db = migrated_db("inspect", "seed", "backfill")
    home = ci_home(home, db.name)
    marker = tmp_path / "paused"
    runbook = Path(sys.executable).with_name("runbook")
    proc = subprocess.Popen([str(runbook), "run", "--env", "ci", "--phases", "constrain"],
                            env=dict(os.environ, RUNBOOK_HOME=str(home), RUNBOOK_FAULT_MARKER=str(marker),
                                     RUNBOOK_FAULT="ddl.after_step=validate the NOT NULL check#2@pause"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker, 300)
        kernels = _kernels_of(proc.pid)
        assert len(kernels) == 1, kernels
        journal = _journal(db)
        proc.kill()
        proc.wait(30)
        marker.unlink()  # were the kernel still there, it would now start the next step
        deadline = time.monotonic() + 5
        while not _gone(kernels[0]):
            assert time.monotonic() < deadline, "the kernel outlived its runner"
            time.sleep(0.05)
        time.sleep(2)
        assert _journal(db) == journal
        with db.connect(autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name LIKE "
                                "'tenancy-runbook/ci/constrain/%%'", (db.name,)).fetchone()[0] == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_phase_whose_runner_is_gone_stops_before_its_next_step(migrated_db, tmp_path):
    """The check between steps (where no death signal reaches the kernel, e.g. it is not the runner's own child):
    the runner named in RUNBOOK_RUNNER_PID dies while the phase is between two steps; the phase process ends
    before the next step is journalled."""
    db = migrated_db("inspect", "seed", "backfill")
    runner = subprocess.Popen(["sleep", "600"])
    marker = tmp_path / "paused"
    env = dict(os.environ, RUNBOOK_HEADLESS="1", RUNBOOK_FAULT="ddl.after_step=validate the NOT NULL check#2@pause",
               RUNBOOK_FAULT_MARKER=str(marker), RUNBOOK_RUNNER_PID=str(runner.pid))
    proc = warm_worker.popen(WORKER, [db.name, "constrain"], env=env, cwd=ROOT)
    try:
        wait_for(marker)
        journal = _journal(db)
        assert journal[-1][2] == "validate the NOT NULL check"
        runner.kill()
        runner.wait(30)  # reaped: the pid names no process now
        marker.unlink()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 75, out + err
        assert f"the runner (pid {runner.pid}) is gone; this kernel stops before" in err
        assert _journal(db) == journal
    finally:
        runner.kill()
        if proc.poll() is None:
            proc.kill()
