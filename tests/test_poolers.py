"""Behind a real pgbouncer (Debian's package): a transaction pooler is refused before anything runs, a
session-mode pooler works, and the runbook's advisory locks are never left in a pooled backend.

pgbouncer listens on a unix socket in its own folder (port 6432 names the socket file) and forwards to the
embedded server's socket. Without pgbouncer these tests skip (fail under root, where .ci/run
installs it), saying how to install it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from runbook_helpers import params as params_mod
from runbook_helpers.db import database
from runbook_helpers.db.server import PORT, SUPERUSER, _server_account
from runbook_helpers.errors import RunbookError
from runbook_helpers.run import runner
from runbook_helpers.run.session import PhaseSession

PGBOUNCER_PORT = 6432
DSN_ENV = "RUNBOOK_POOLER_TEST_DSN"


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if not found:
        why = ("pgbouncer is not installed: install it (Debian: apt-get install pgbouncer; .ci/run does so when "
               "missing) to test the pooler refusal against a real pgbouncer")
        if os.geteuid() == 0:  # CI runs as root and installs it: missing there means the install failed
            pytest.fail(why)
        pytest.skip(why)
    return found


class Bouncer:
    def __init__(self, server, mode: str, ignore_options: bool, reset_query: str | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="pgb-"))  # short: a socket path has ~107 characters
        account = _server_account()
        lines = ["[databases]", f"* = host={server.socket_dir()} port={PORT} user={SUPERUSER}", "[pgbouncer]",
                 "listen_addr =", f"listen_port = {PGBOUNCER_PORT}", f"unix_socket_dir = {self.folder}",
                 "auth_type = trust", f"auth_file = {self.folder / 'users.txt'}", f"pool_mode = {mode}",
                 "default_pool_size = 4", f"logfile = {self.folder / 'pgbouncer.log'}",
                 f"pidfile = {self.folder / 'pgbouncer.pid'}"]
        if ignore_options:
            lines.append("ignore_startup_parameters = options")
        if reset_query is not None:
            lines.append(f"server_reset_query = {reset_query}")
        (self.folder / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        (self.folder / "users.txt").write_text(f'"{SUPERUSER}" ""\n')
        if account is not None:  # pgbouncer will not run as root either
            for path in [self.folder, *self.folder.iterdir()]:
                os.chown(path, account.pw_uid, account.pw_gid)
        args = [pgbouncer_binary(), "-d"] + (["-u", account.pw_name] if account else []) + [
            str(self.folder / "pgbouncer.ini")]
        subprocess.run(args, check=True, capture_output=True, text=True)
        socket = self.folder / f".s.PGSQL.{PGBOUNCER_PORT}"
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert time.monotonic() < deadline, (self.folder / "pgbouncer.log").read_text()
            time.sleep(0.05)

    def dsn(self, database_name: str) -> str:
        return (f"postgresql://{SUPERUSER}@/{quote(database_name, safe='')}"
                f"?host={quote(str(self.folder), safe='/')}&port={PGBOUNCER_PORT}")

    def stop(self) -> None:
        pid = int((self.folder / "pgbouncer.pid").read_text().strip())
        os.kill(pid, 15)
        deadline = time.monotonic() + 10
        while (self.folder / "pgbouncer.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def bouncer(server):
    started: list[Bouncer] = []

    def start(mode: str, ignore_options: bool, reset_query: str | None = None) -> Bouncer:
        b = Bouncer(server, mode, ignore_options, reset_query)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


def pooled_params(db, bouncer, monkeypatch) -> params_mod.Params:
    monkeypatch.setenv(DSN_ENV, bouncer.dsn(db.name))
    return params_mod.override(db.params, {"database": {"embedded": False, "dsn_env": DSN_ENV}})


def ledger_exists(db) -> bool:
    return bool(db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (db.params.ledger_schema,)))


def held_runbook_locks(db) -> int:
    """The runbook's advisory locks on this test's database (runs on other databases hold their own)."""
    return db.scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                     "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                     (database.LOCK_CLASS,))


def refusal(db, bouncer: "Bouncer", monkeypatch) -> str:
    """The message a phase session through this pooler is refused with; the refusal changed nothing."""
    before = db.schema_dump()
    with pytest.raises(RunbookError) as refused:
        PhaseSession("inspect", params=pooled_params(db, bouncer, monkeypatch), log=lambda *_: None)
    assert db.schema_dump() == before and not ledger_exists(db)
    return str(refused.value)


def test_default_pgbouncer_is_refused_at_connect_with_a_clear_message(db, bouncer, monkeypatch):
    message = refusal(db, bouncer("transaction", ignore_options=False), monkeypatch)
    assert "unsupported startup parameter: options" in message
    assert "connection pooler" in message and "pgbouncer" in message
    assert f"Connect directly to PostgreSQL: in ${DSN_ENV} put the PostgreSQL server's own host and port" in message
    assert "not pgbouncer's 6432" in message and "Nothing was changed." in message


def test_transaction_pooler_ignoring_options_is_refused_before_anything_runs(db, bouncer, monkeypatch):
    message = refusal(db, bouncer("transaction", ignore_options=True), monkeypatch)
    assert "reached through a connection pooler in transaction or statement mode" in message
    assert ("two connections open at the same time ran on one backend" in message
            or "backend pid changed" in message or "session setting (SET)" in message), message
    assert "not pgbouncer's 6432" in message and "Nothing was changed." in message
    assert held_runbook_locks(db) == 0


def test_statement_pooler_is_refused(db, bouncer, monkeypatch):
    b = bouncer("statement", ignore_options=True)
    with pytest.raises(RunbookError, match="transaction or statement mode"):
        PhaseSession("inspect", params=pooled_params(db, b, monkeypatch), log=lambda *_: None)
    assert not ledger_exists(db)


def test_session_mode_pooler_works_with_the_settings_applied_by_set(db, bouncer, monkeypatch):
    """Decision: session mode gives each client one server session for its whole connection, so it passes;
    the settings the ignored startup options would have carried are SET, and preflight says what it found."""
    b = bouncer("session", ignore_options=True)
    params = pooled_params(db, b, monkeypatch)
    from runbook_helpers.phases import inspect
    rb = PhaseSession("inspect", params=params, dry_run=True, log=lambda *_: None)
    try:
        with rb.engine.connect() as conn:
            got = conn.exec_driver_sql("SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "
                                       "current_setting('tenancy_runbook.session', true)").one()
        with database.connect_raw(db.params, db.name) as direct:  # the settings as the startup options give them
            expected = direct.execute("SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "
                                      "current_setting('tenancy_runbook.session', true)").fetchone()
        assert tuple(got) == tuple(expected) and got[2] == "runbook" and got[0] != "0"
        rows = inspect.preflight(rb).set_index("check")
        row = rows.loc["one server session per connection (no transaction pooler)"]
        assert row["status"] == "ok"
        assert "the startup options were ignored (a session-mode pooler" in row["detail"]
    finally:
        rb.close()


def test_direct_connection_preflight_row(db):
    from runbook_helpers.phases import inspect
    rb = db.session("inspect", dry_run=True)
    try:
        row = inspect.preflight(rb).set_index("check").loc["one server session per connection (no transaction pooler)"]
    finally:
        rb.close()
    assert row["status"] == "ok" and "(a direct connection or a session-mode pooler)" in row["detail"]


def test_advisory_locks_are_not_left_in_a_pooled_backend_after_an_error(db, bouncer, monkeypatch):
    """A session-mode pooler that does not reset server sessions (server_reset_query empty) keeps the backend,
    and with it every session-level advisory lock, after the client disconnects: later direct runs would be
    refused. The session releases them at close, also when it closes after an error."""
    b = bouncer("session", ignore_options=True, reset_query="")
    params = pooled_params(db, b, monkeypatch)
    with pytest.raises(RuntimeError):
        with PhaseSession("inspect", params=params, dry_run=True, log=lambda *_: None):
            assert held_runbook_locks(db) == 2  # RUN_LOCK and PHASE_LOCK, held by a pgbouncer server session
            raise RuntimeError("a cell failed")
    assert held_runbook_locks(db) == 0
    direct = db.session("inspect", dry_run=True)  # would be refused: "another runbook run is in progress"
    direct.close()


def test_release_runbook_locks_releases_each_lock_as_often_as_it_was_taken(db):
    rb = db.session("inspect", dry_run=True)
    try:
        database.try_advisory_lock(rb.control, database.PHASE_LOCK, "runbook phase")  # taken twice now
        assert rb.release_locks() == [database.RUN_LOCK, database.PHASE_LOCK]
        assert held_runbook_locks(db) == 0
    finally:
        rb.close()


def test_pgbouncer_dsn_reaches_the_server_in_session_mode(db, bouncer):
    b = bouncer("session", ignore_options=False)
    with psycopg.connect(b.dsn(db.name)) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == db.name


def test_a_headless_run_leaves_no_advisory_lock_in_a_pooled_backend(db, bouncer, monkeypatch):
    """The runner's own connection holds RUN_LOCK for the whole run; behind a session pooler that keeps server
    sessions (no reset query) the backend outlives it, so the runner releases its locks at the end of every
    run and checks none is left."""
    b = bouncer("session", ignore_options=True, reset_query="")
    monkeypatch.setenv("RUNBOOK_STAGING_DSN", b.dsn(db.name))
    result = runner.run("staging", "inspect", dry_run=True, log=lambda *_: None)
    assert result.status == "succeeded", [p.get("error") for p in result.phases]
    assert held_runbook_locks(db) == 0
    second = runner.run("staging", "inspect", dry_run=True, log=lambda *_: None)  # not refused as "in progress"
    assert second.status == "succeeded", second.phases
