"""Connections from params: the embedded server or a DSN read from an environment variable.

Every connection carries the runbook's session settings (application_name, lock_timeout,
statement_timeout, idle_in_transaction_session_timeout, and the mark the rollout triggers recognise), so a forgotten SET can never leave a DDL
statement waiting behind a long transaction while the application queues behind it. The DSN itself is
only ever held in memory: the engine's URL is the bare dialect name.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine

from ..errors import RunbookError
from ..params import Params, dsn_from_environment
from . import dsn as dsn_shape
from . import secrets as db_secrets
from .server import EmbeddedServer

MIN_SERVER_VERSION = 130000
RUNBOOK_SESSION_SETTING = "tenancy_runbook.session"  # set on every runbook connection


def server_for(params: Params) -> EmbeddedServer:
    if not params.database.embedded:
        raise RunbookError(f"env {params.env} uses a DSN from ${params.database.dsn_env}; it has no embedded server")
    return EmbeddedServer(params.env)


def conninfo(params: Params, database: str | None = None, start: bool = True) -> str:
    """A libpq connection string for the env; for embedded envs the server is started (or reused)."""
    if params.database.embedded:
        server = server_for(params)
        if start:
            server.start()
        return server.url(database or params.database.name)
    dsn = dsn_from_environment(params)
    dsn_shape.parse(dsn, f"${params.database.dsn_env}")  # a malformed DSN: one line, none of its content
    if database:
        return make_conninfo(dsn, dbname=database)
    return dsn


def secrets_in(dsn: str) -> list[str]:
    """The parts of a connection that must never be written anywhere: the DSN itself, its password, and
    every password libpq would take for it from PGPASSWORD, .pgpass or a service file (db/secrets.py)."""
    return db_secrets.connection_secrets(dsn)


def known_secrets(params: Params) -> list[str]:
    """Every secret of the env's connection, for the archive's scan and for scrubbing error text."""
    return db_secrets.connection_secrets(conninfo(params, start=False))


def scrub(message: str, secrets: list[str]) -> str:
    """The message with every form of every secret (db/secrets.py) and any password= value replaced by ***."""
    data, _ = db_secrets.redact(message.encode("utf-8"), secrets, b"***")
    return re.sub(r"(password=)\S+", r"\1***", data.decode("utf-8", errors="replace"))


def _where(settings: dict[str, str]) -> str:
    """'host db.internal, port 5433' from the connection's settings (libpq's defaults where none is set)."""
    host = settings.get("host") or settings.get("hostaddr") or os.environ.get("PGHOST") or "localhost (default socket)"
    port = settings.get("port") or os.environ.get("PGPORT") or "5432"
    return f"host {host}, port {port}"


def connection_failure(exc: Exception, settings: dict[str, str], secrets: list[str]) -> str:
    """libpq's whole message on one line, scrubbed of every secret: each line (the server's reason, libpq's
    hint, one per host tried) is kept; only psycopg's 'connection failed:' prefix goes."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines()]
    text = " ".join(line for line in lines if line) or repr(exc)
    text = re.sub(r"^connection failed:\s*", "", text)
    return scrub(text, secrets)


def session_settings(params: Params) -> dict[str, str]:
    locks = params.locks
    return {
        "lock_timeout": str(locks.lock_timeout_ms),
        "statement_timeout": str(locks.statement_timeout_ms),
        "idle_in_transaction_session_timeout": str(locks.idle_in_transaction_timeout_ms),
        # the runbook's scans (counts, fingerprints, VALIDATE, index builds) stay on one core each, so they
        # cannot starve the application of CPU; raise these for a faster run in a maintenance window
        "max_parallel_workers_per_gather": str(params.database.parallel_workers),
        "max_parallel_maintenance_workers": str(params.database.parallel_workers),
        # the rollout triggers leave the runbook's own writes alone (tenancy/rollout.py)
        RUNBOOK_SESSION_SETTING: "runbook",
    }


def session_options(params: Params, existing: str | None = None) -> str:
    opts = [f"-c {name}={value}" for name, value in session_settings(params).items()]
    return " ".join(([existing] if existing else []) + opts)


# --- poolers ----------------------------------------------------------------------------------------
# Behind a transaction or statement pooler (pgbouncer pool_mode = transaction/statement) consecutive
# transactions of one connection run on different server sessions: session settings (lock_timeout,
# statement_timeout), prepared statements and the single-runner advisory locks get lost or left behind in
# a backend the runbook no longer sees. Such a connection is refused before anything runs.
PROBE_SETTING = "tenancy_runbook.pooler_probe"       # a SET whose value must stick to the next transaction
OPTIONS_IGNORED_SETTING = "tenancy_runbook.startup_options"  # 'ignored' when the settings came by SET


def _source(params: Params) -> str:
    return "the embedded server" if params.database.embedded else f"${params.database.dsn_env}"


def pooler_refusal(params: Params, found: str) -> RunbookError:
    source = _source(params)
    return RunbookError(
        f"the {params.env} database named by {source} is reached through a connection pooler in transaction or "
        f"statement mode (such as pgbouncer): {found}. The runbook needs one PostgreSQL session per connection "
        f"(its lock_timeout and statement_timeout, prepared statements and single-runner advisory locks live in "
        f"the session). Connect directly to PostgreSQL: in {source} put the PostgreSQL server's own host and port "
        f"instead of the pooler's (e.g. port 5432, not pgbouncer's 6432). Nothing was changed.")


def _one(conn: psycopg.Connection, query: str, args: tuple = ()) -> tuple:
    """One statement in a transaction of its own."""
    row = conn.execute(query, args).fetchone()
    if not conn.autocommit:
        conn.commit()
    return row


def session_probe(conn: psycopg.Connection) -> tuple[int, str | None]:
    """(backend pid, why this connection is not one server session or None): two transactions must run on one
    backend, and a session SET made in the first must still hold in the second."""
    token = uuid.uuid4().hex
    try:
        first, _ = _one(conn, "SELECT pg_backend_pid(), set_config(%s, %s, false)", (PROBE_SETTING, token))
    except psycopg.errors.ProtocolViolation as exc:  # pgbouncer's statement mode refuses any transaction block
        return 0, f"it answered {str(exc).strip()!r} to a transaction"
    second, seen = _one(conn, "SELECT pg_backend_pid(), current_setting(%s, true)", (PROBE_SETTING,))
    if first != second:
        return first, f"the backend pid changed between two transactions of one connection ({first}, then {second})"
    if seen != token:
        return first, "a session setting (SET) made in one transaction was gone in the next"
    return first, None


def _apply_settings(conn: psycopg.Connection, params: Params) -> bool:
    """Make sure the session settings hold; a pooler that ignores startup options (pgbouncer's
    ignore_startup_parameters = options) gets them by SET instead. True when they had to be SET."""
    (arrived,) = _one(conn, "SELECT current_setting(%s, true)", (RUNBOOK_SESSION_SETTING,))
    if arrived == "runbook":
        return False
    for name, value in {**session_settings(params), OPTIONS_IGNORED_SETTING: "ignored"}.items():
        _one(conn, "SELECT set_config(%s, %s, false)", (name, value))
    return True


def application_name(params: Params, phase: str | None = None, run_id: str | None = None) -> str:
    parts = [params.database.application_name, params.env]
    if phase:
        parts.append(phase)
    if run_id:
        parts.append(run_id)
    return "/".join(parts)[:63]


def connect_raw(params: Params, database: str | None = None, phase: str | None = None,
                run_id: str | None = None, autocommit: bool = False) -> psycopg.Connection:
    """A psycopg connection with the session settings; errors name the env, never the DSN."""
    info = conninfo(params, database)
    existing = conninfo_to_dict(info).get("options")
    try:
        conn = psycopg.connect(
            make_conninfo(info, application_name=application_name(params, phase, run_id),
                          options=session_options(params, existing), connect_timeout="10"),
            autocommit=autocommit,
            # no server-side prepared statements: they live in the server session, which a pooler may hand on
            # (a session pooler without a reset query gives the next client a backend whose "_pg3_0" exists)
            prepare_threshold=None,
        )
    except psycopg.OperationalError as exc:
        settings = dsn_shape.parse(info, _source(params))
        reason = connection_failure(exc, settings, db_secrets.connection_secrets(info))
        if "unsupported startup parameter" in reason:  # pgbouncer's answer to the options carrying the settings
            raise pooler_refusal(params, f"it answered {reason.split('FATAL:')[-1].strip()!r} to the startup "
                                         f"options that carry the runbook's session settings") from None
        if "does not exist" in reason and params.database.embedded:
            raise RunbookError(
                f"database {database or params.database.name!r} does not exist on the {params.env} server; "
                f"build the demo database with `runbook demo-db --env {params.env}`"
            ) from None
        source = "the embedded server" if params.database.embedded else f"${params.database.dsn_env}"
        raise RunbookError(f"cannot connect to the {params.env} database named by {source} ({_where(settings)}): "
                           f"{reason}") from None
    try:
        _, pooled = session_probe(conn)
        if pooled:
            raise pooler_refusal(params, pooled)
        _apply_settings(conn, params)
    except BaseException:
        conn.close()
        raise
    if conn.info.server_version >= 140000:
        # a killed runner must not leave a backend finishing a long UPDATE or VALIDATE for nobody: the server
        # checks every second that the client is still there, and cancels the statement if it is not
        conn.execute("SET client_connection_check_interval = 1000")
        if not autocommit:
            conn.commit()
    return conn


def make_engine(params: Params, database: str | None = None, phase: str | None = None,
                run_id: str | None = None) -> Engine:
    """A SQLAlchemy engine whose URL holds no secret: connections come from connect_raw."""
    # fail now, with a clear message; two connections open at once must have two backends (a transaction
    # pooler with one idle server connection passes each connection's own probe, but not this)
    with connect_raw(params, database, phase, run_id) as first, connect_raw(params, database, phase, run_id) as second:
        (one,), (two,) = _one(first, "SELECT pg_backend_pid()"), _one(second, "SELECT pg_backend_pid()")
        if one == two:
            raise pooler_refusal(params, f"two connections open at the same time ran on one backend (pid {one})")
    return create_engine(
        "postgresql+psycopg://",
        creator=lambda: connect_raw(params, database, phase, run_id),
        pool_size=3,
        max_overflow=4,
    )


@dataclass(frozen=True)
class Identity:
    database: str
    system_identifier: str | None
    server_version: str
    server_version_num: int
    user: str


def check_expected_identity(params: Params, ident: "Identity") -> None:
    """Refuse, before anything is read or written, when the DSN points at another database than the env pins."""
    expect = params.database.expect
    if expect is None:
        return
    wrong = []
    if expect.name is not None and ident.database != expect.name:
        wrong.append(f"database name {ident.database!r} (expected {expect.name!r})")
    if expect.system_identifier is not None and ident.system_identifier != str(expect.system_identifier):
        wrong.append(f"server system identifier {ident.system_identifier or 'unreadable'} "
                     f"(expected {expect.system_identifier})")
    if wrong:
        source = f"${params.database.dsn_env}" if params.database.dsn_env else "the embedded server"
        raise RunbookError(
            f"refusing to touch this database: env {params.env} pins its identity, but {source} leads to "
            f"{' and '.join(wrong)}. Point {source} at the right database, or fix database.expect in "
            f"params/{params.env}.yaml. Nothing was changed.")


def identity(conn: Connection) -> Identity:
    row = conn.execute(text(
        "SELECT current_database(), current_setting('server_version'), "
        "current_setting('server_version_num')::int, current_user"
    )).one()
    # pg_control_system() needs a privilege a migration role may lack: then the identifier is unknown
    sysid = conn.execute(text(
        "SELECT CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE') "
        "THEN (SELECT system_identifier::text FROM pg_control_system()) END")).scalar()
    return Identity(row[0], sysid, row[1], row[2], row[3])


# --- the single-runner advisory locks ---------------------------------------------------------------
# A run (runbook run, or an engineer stepping through notebooks) holds RUN_LOCK for its whole length;
# each phase notebook also holds PHASE_LOCK, so two kernels never run phases against one database at once.
LOCK_CLASS = 741852963
RUN_LOCK = 1
PHASE_LOCK = 2

HOLDER_SQL = text("""
SELECT a.pid, a.usename AS "user", a.application_name, a.client_addr::text AS client,
       date_trunc('second', now() - a.backend_start) AS connected_for
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid = :cls AND l.objid = :obj AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
""")


def try_advisory_lock(conn: Connection, which: int, what: str) -> None:
    """Take a session-level advisory lock or fail at once, saying who holds it."""
    from ..errors import RunnerBusy

    got = conn.execute(text("SELECT pg_try_advisory_lock(:cls, :obj)"), {"cls": LOCK_CLASS, "obj": which}).scalar()
    if got:
        return
    holders = conn.execute(HOLDER_SQL, {"cls": LOCK_CLASS, "obj": which}).mappings().all()
    who = "; ".join(f"pid {h['pid']} ({h['application_name'] or 'no application_name'}, user {h['user']}, "
                    f"connected for {h['connected_for']})" for h in holders) or "a session that just ended"
    raise RunnerBusy(f"another {what} is in progress on this database, held by {who}; wait for it to finish "
                     f"(or end that session) and try again. Nothing was changed.")


def release_advisory_lock(conn: Connection, which: int) -> None:
    conn.execute(text("SELECT pg_advisory_unlock(:cls, :obj)"), {"cls": LOCK_CLASS, "obj": which})


HELD_SQL = text("""
SELECT l.objid::int FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.classid = :cls AND l.objsubid = 2 AND l.granted
ORDER BY 1
""")


def release_runbook_locks(conn: Connection) -> list[int]:
    """Release every runbook advisory lock this session holds (each as often as it was taken) and check none is
    left; returns the locks that were held. Run at the end of every run and phase session: a backend that
    outlives the connection (a pooler's, or a connection kept open after an error) must not keep refusing
    later runs."""
    held = [r[0] for r in conn.execute(HELD_SQL, {"cls": LOCK_CLASS})]
    for which in held:
        while conn.execute(text("SELECT pg_advisory_unlock(:cls, :obj)"), {"cls": LOCK_CLASS, "obj": which}).scalar():
            pass
    left = [r[0] for r in conn.execute(HELD_SQL, {"cls": LOCK_CLASS})]
    if left:
        raise RunbookError(f"runbook advisory locks {left} are still held by this session after releasing them; "
                           f"end the session (pg_terminate_backend) before the next run")
    return held


def connection_kind(engine: Engine) -> tuple[bool, str]:
    """(one server session per connection?, what was found) for preflight's row."""
    with engine.connect() as a, engine.connect() as b:
        pid, pooled = session_probe(a.connection.driver_connection)
        other = b.execute(text("SELECT pg_backend_pid()")).scalar()
        b.commit()
        ignored = a.execute(text("SELECT current_setting(:s, true)"), {"s": OPTIONS_IGNORED_SETTING}).scalar()
        a.commit()
    if pooled or pid == other:
        return False, pooled or f"two connections open at the same time ran on one backend (pid {pid})"
    found = (f"one server session per connection: backend pid stable across transactions, a SET sticks, two "
             f"connections have two backends ({pid}, {other})")
    if ignored == "ignored":
        return True, (found + "; the startup options were ignored (a session-mode pooler such as pgbouncer with "
                      "ignore_startup_parameters = options): the session settings were applied with SET")
    return True, found + " (a direct connection or a session-mode pooler)"
