"""The embedded server's lifecycle: start, reuse, recover from a crash's stale postmaster.pid, stop."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from conftest import runbook_cli
from runbook_helpers import paths
from runbook_helpers.db.server import EmbeddedServer

ENV = "lifecycle-test"


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def crash(server: EmbeddedServer) -> int:
    """SIGKILL the postmaster, as a power cut or OOM kill would, and wait for its children to go."""
    pid = server.status().pid
    kids = children_of(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{k}").exists() for k in kids + [pid]):
        time.sleep(0.1)
    assert server.pid_file.exists(), "a crash leaves postmaster.pid behind"
    return pid


@pytest.fixture
def lifecycle_server():
    srv = EmbeddedServer(ENV)
    yield srv
    srv.stop(mode="immediate")
    shutil.rmtree(paths.state_dir(ENV), ignore_errors=True)


def can_query(srv: EmbeddedServer) -> int:
    with psycopg.connect(srv.url()) as conn:
        return conn.execute("SELECT 1").fetchone()[0]


def test_start_reuse_stop(lifecycle_server):
    srv = lifecycle_server
    assert not srv.status().running
    status, note = srv.start()
    assert status.running and note == "initialised and started"
    assert srv.data_dir == paths.state_dir(ENV) / f"pg{srv.major}"
    assert can_query(srv) == 1
    again, note = srv.start()
    assert note == "reused" and again.pid == status.pid
    assert srv.stop() == "stopped"
    assert not srv.status().running
    assert srv.stop() == "not running"
    status, note = srv.start()
    assert note == "started" and can_query(srv) == 1


def test_stale_pid_file_after_a_crash_is_recovered(lifecycle_server):
    srv = lifecycle_server
    srv.start()
    dead = crash(srv)
    assert not srv.status().running
    status, note = srv.start()
    assert status.running and status.pid != dead
    assert f"removed stale postmaster.pid of pid {dead}" in note
    assert can_query(srv) == 1


def test_pid_file_naming_a_recycled_pid_is_recovered(lifecycle_server):
    srv = lifecycle_server
    srv.start()
    crash(srv)
    squatter = subprocess.Popen(["sleep", "60"])  # the crashed postmaster's pid now belongs to another program
    try:
        lines = srv.pid_file.read_text().splitlines()
        lines[0] = str(squatter.pid)
        srv.pid_file.write_text("\n".join(lines) + "\n")
        status, note = srv.start()
        assert status.running and f"stale postmaster.pid of pid {squatter.pid}" in note
        assert squatter.poll() is None, "the unrelated process must be left alone"
        assert can_query(srv) == 1
    finally:
        squatter.kill()


def test_server_listens_on_no_tcp_port(lifecycle_server):
    srv = lifecycle_server
    srv.start()
    with psycopg.connect(srv.url()) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == ""


def test_cli_status_and_url(server):
    status = runbook_cli("db", "status", "--env", "ci")
    assert status.returncode == 0, status.stderr
    assert "running (pid" in status.stdout
    url = runbook_cli("db", "url", "--env", "ci")
    assert url.returncode == 0, url.stderr
    last = url.stdout.strip().splitlines()[-1]
    assert last.startswith("postgresql://postgres@/tenancy_demo?host=")
    with psycopg.connect(last.replace("/tenancy_demo?", "/postgres?")) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == "postgres"


def test_cli_db_on_a_real_env_says_it_has_no_embedded_server():
    result = runbook_cli("db", "start", "--env", "staging")
    assert result.returncode == 2
    assert "uses a DSN from $RUNBOOK_STAGING_DSN; it has no embedded server" in result.stderr
