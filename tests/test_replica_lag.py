"""The backfill pauses while a streaming standby replays too late (throttle.max_replica_lag_s), with a real
standby: pg_basebackup -R of a primary of its own, and a second server on its own socket (db/standby.py).

The primary is not the suite's server: pg_stat_replication is per server, and a standby made to lag on
purpose would pause every other test's backfill."""

import threading
import time
import uuid

import psycopg
import pytest

from conftest import create_database, drop_database
from runbook_helpers import demo, params as params_mod
from runbook_helpers.db.server import EmbeddedServer
from runbook_helpers.db.standby import Standby
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.run.session import PhaseSession

DSN_ENV = "RUNBOOK_TEST_REPLICA_PRIMARY_DSN"
BOUND_S = 1.0
DELAY_S = 3.0


@pytest.fixture(scope="module")
def primary():
    srv = EmbeddedServer("ci-replica")
    srv.start()
    yield srv
    srv.stop()


def lag_on_primary(url: str) -> float | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT extract(epoch FROM replay_lag)::float8 FROM pg_stat_replication").fetchone()
    return row[0] if row else None


def test_batches_pause_while_the_standby_lags_and_resume_when_it_catches_up(primary, ci_params, monkeypatch):
    name = f"r_{uuid.uuid4().hex[:10]}"
    drop_database(primary, name)
    demo.build(primary.url(), name, system_uuid=str(ci_params.system_tenant.uuid), rows=500, scale=0.02,
               log=lambda *_: None)
    monkeypatch.setenv(DSN_ENV, primary.url(name))
    params = params_mod.override(ci_params, {
        "database": {"embedded": False, "dsn_env": DSN_ENV},
        "backfill": {"batch_size": 500, "target_batch_ms": None, "pause_ms": 20,
                     "throttle": {"max_replica_lag_s": BOUND_S, "pause_ms": 50, "max_pause_s": 60}}})
    lines: list[str] = []

    def session(phase):
        return PhaseSession(phase, params=params, log=lines.append)

    try:
        run_phase(session("inspect"))
        run_phase(session("seed"))
        with psycopg.connect(primary.url(name), autocommit=True) as conn:
            conn.execute("INSERT INTO knowledge_bases (uuid, org_id, name) SELECT gen_random_uuid(), 1, 'kb ' || i "
                         "FROM generate_series(1, 6000) i")
            conn.execute("ANALYZE knowledge_bases")
        with Standby(primary) as standby:
            standby.apply_delay(DELAY_S)
            deadline = time.monotonic() + 20
            with psycopg.connect(primary.url(name), autocommit=True) as conn:
                while (lag_on_primary(primary.url()) or 0) < BOUND_S + 0.5:  # commits now replay 3 s late
                    conn.execute("SELECT txid_current()")
                    assert time.monotonic() < deadline, "the standby never lagged"
                    time.sleep(0.1)
            result: dict = {}
            job = threading.Thread(target=lambda: result.update(run_phase(session("backfill"))))
            started = time.monotonic()
            job.start()
            deadline = time.monotonic() + 20
            while not any("pausing: for replica runbook_standby" in line for line in lines):
                assert job.is_alive() and time.monotonic() < deadline, lines
                time.sleep(0.05)
            time.sleep(2)
            assert job.is_alive()   # still paused: the standby still replays 3 s late
            standby.apply_delay(0)  # it catches up: the batches resume
            job.join(60)
            assert not job.is_alive()
            elapsed = time.monotonic() - started
        report = result["report"]
        row = report.summary.set_index("table").loc["knowledge_bases"]
        assert row["rows updated"] >= 6000 and row["throttled s"] >= 2
        assert row["max replica lag s"] >= BOUND_S  # the report says how late the standby was
        series = report.progress
        assert len(series) >= 12 and series["replica_lag_s"].notna().all()
        # no batch started while the standby was over the bound (sampled every 100 ms: a small tolerance)
        assert series["replica_lag_s"].max() <= BOUND_S + 0.5, series[["elapsed_s", "replica_lag_s"]]
        assert elapsed >= 2
        pausing = [line for line in lines if "pausing: for replica runbook_standby" in line]
        assert pausing[0].startswith("backfill knowledge_bases: pausing: for replica runbook_standby, replay lag ")
        assert any(line.startswith("backfill knowledge_bases: resuming after ") for line in lines)
        with psycopg.connect(primary.url(name)) as conn:
            assert conn.execute("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL").fetchone()[0] == 0
    finally:
        drop_database(primary, name)


def test_the_standby_streams_what_the_primary_commits(primary):
    name = f"s_{uuid.uuid4().hex[:10]}"
    create_database(primary, name, None)
    try:
        with Standby(primary, name="runbook_standby_probe") as standby:
            with psycopg.connect(primary.url(name), autocommit=True) as conn:
                conn.execute("CREATE TABLE t AS SELECT 42 AS x")
            deadline = time.monotonic() + 20
            while True:
                try:
                    with psycopg.connect(standby.url(name)) as conn:
                        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
                        if conn.execute("SELECT to_regclass('t') IS NOT NULL").fetchone()[0]:
                            assert conn.execute("SELECT x FROM t").fetchone()[0] == 42
                            break
                except psycopg.OperationalError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        drop_database(primary, name)
