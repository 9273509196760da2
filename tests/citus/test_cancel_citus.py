"""Cancelling a backend on a Citus server: Citus adds pg_cancel_backend(bigint) (a global pid) beside PostgreSQL's
pg_cancel_backend(integer), so a pid that psycopg sends as smallint (below 32768) matches both: 42725 'function
pg_cancel_backend(smallint) is not unique'. The DDL ladder's cancel of an autovacuum worker in 07_distribute met it."""

import threading

import psycopg
from sqlalchemy import create_engine

from citus_fixtures import MIGRATED, citus, citus_db, citus_params  # noqa: F401 (fixtures)

from runbook_helpers.db import lock_holders


def test_the_ladder_cancels_a_backend_on_citus_whatever_its_pid(citus_db):
    db = citus_db(MIGRATED)
    engine = create_engine(db.url.replace("postgresql://", "postgresql+psycopg://"))
    seen: list[str] = []
    with psycopg.connect(db.url, autocommit=True) as sleeper:
        pid = sleeper.info.backend_pid

        def sleep():
            try:
                sleeper.execute("SELECT pg_sleep(30)")
            except psycopg.Error as exc:
                seen.append(exc.sqlstate)
        thread = threading.Thread(target=sleep)
        thread.start()
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT count(*) FROM pg_extension WHERE extname = 'citus'").scalar() == 1
                # pid 1 is no backend (PostgreSQL warns and answers false); sent as smallint like any pid < 32768
                assert lock_holders.cancel_backend(conn, 1) is False
                deadline = 50
                while not conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND "
                                               "wait_event = 'PgSleep'", (pid,)).scalar() and deadline:
                    deadline -= 1
                    threading.Event().wait(0.1)
                assert lock_holders.cancel_backend(conn, pid) is True
        finally:
            thread.join(30)
            engine.dispose()
    assert seen == ["57014"]  # the statement was cancelled (query_canceled), not the session
