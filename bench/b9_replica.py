"""B9 replica lag

A real streaming standby while the runbook backfills BENCH_B9_ROWS (1M) workflows rows with NULL tenant_id:
the benchmark's own primary (an embedded server of its own, so the base backup copies only this benchmark's
databases), a standby from `pg_basebackup -R` running beside it on its own socket (db/standby.py), both on
the same machine. Identical copies (CREATE DATABASE … TEMPLATE, FILE_COPY) in one run, one per variant:
the replica throttle on (backfill.throttle.max_replica_lag_s = 5, every other setting as base.yaml), off
(max_replica_lag_s null), and every throttle off (no budget, no stall pacing, no pauses: the fastest
setting). A sampler on the primary reads the standby's replay lag every 100 ms as the throttle does (0 when
the standby has replayed all WAL, pg_stat_replication.replay_lag otherwise) and the bytes it is behind.
Reported per variant: max and p99 replay lag, the most WAL outstanding, backfill seconds and rows/s, seconds
the throttle paused. Target: max replay lag <= 5 s with the throttle on.

Reproduce: .venv/bin/python -m bench b9   (BENCH_B9_ROWS=1000000; BENCH_B9_ONLY=on,off,fastest picks variants)
"""

from __future__ import annotations

import os
import threading
import time

import psycopg
from psycopg import sql

from runbook_helpers import demo
from runbook_helpers.db.server import EmbeddedServer
from runbook_helpers.db.standby import Standby

from . import common

PRIMARY_ENV = "bench-replica"
DSN_ENV = "BENCH_B9_PRIMARY_DSN"
TARGET_LAG_S = 5.0
VARIANTS = {
    "on": {},
    "off": {"throttle": {"max_replica_lag_s": None}},
    "fastest": {"throttle": {"budget_p99_ms": None, "app_stall_ms": None, "max_lock_waiters": None,
                             "max_replica_lag_s": None}, "pause_ms": 0},
}


def rows() -> int:
    return int(os.environ.get("BENCH_B9_ROWS", "1000000"))


def primary() -> EmbeddedServer:
    srv = EmbeddedServer(PRIMARY_ENV)
    srv.start()
    return srv


def template(srv: EmbeddedServer, n: int) -> str:
    name, marker = f"bench_b9_tpl_{n}", f"bench b9 v1 rows={n}"
    with psycopg.connect(srv.url(), autocommit=True) as conn:
        found = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                             (name,)).fetchone()
    if found and found[0] == marker:
        return name
    print(f"building template {name} ({n:,} workflows) on the {PRIMARY_ENV} server ...")
    demo.build(srv.url(), name, system_uuid=str(common.base_params().system_tenant.uuid), rows=n, scale=0.01,
               log=lambda *_: None)
    with psycopg.connect(srv.url(name), autocommit=True) as conn:
        conn.execute("DROP TRIGGER workflows_set_updated_at ON workflows")
        conn.execute("ALTER TABLE workflows ADD COLUMN tenant_id bigint")
        conn.execute("VACUUM (ANALYZE, FREEZE)")
    with psycopg.connect(srv.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(marker)))
    return name


class LagSampler(threading.Thread):
    """The standby's replay lag every 100 ms, from the primary: 0 when all WAL is replayed, else replay_lag."""

    def __init__(self, url: str, standby: str):
        super().__init__(daemon=True)
        self.url, self.standby = url, standby
        self.lags: list[float] = []
        self.max_behind = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._done.wait(0.1):
                row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8, "
                                   "extract(epoch FROM replay_lag)::float8 FROM pg_stat_replication "
                                   "WHERE application_name = %s", (self.standby,)).fetchone()
                if row is None:
                    continue
                behind, lag = row
                self.max_behind = max(self.max_behind, behind or 0.0)
                self.lags.append(0.0 if not behind or behind <= 0 else (lag or 0.0))

    def stop(self) -> "LagSampler":
        self._done.set()
        self.join(10)
        return self


def caught_up(url: str, standby: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute("SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 1) > 0 FROM "
                           "pg_stat_replication WHERE application_name = %s", (standby,)).fetchone()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby {standby} did not catch up in {timeout_s:.0f} s")
            time.sleep(0.2)


def main() -> dict:
    n = rows()
    srv = primary()
    tpl = template(srv, n)
    os.environ[DSN_ENV] = srv.url()
    sized = "" if n == 1_000_000 else f"BENCH_B9_ROWS={n} "
    report = common.Report("B9 replica lag", f"{sized}python -m bench b9")
    wanted = os.environ.get("BENCH_B9_ONLY", ",".join(VARIANTS)).split(",")
    with Standby(srv, name="bench_standby") as standby:
        for variant in [v for v in VARIANTS if v in wanted]:
            db = f"bench_b9_{variant}"
            with psycopg.connect(srv.url(), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(db), sql.Identifier(tpl)))
            try:
                overrides = {**common.only("workflows", **VARIANTS[variant]),
                             "database": {"embedded": False, "dsn_env": DSN_ENV}}
                common.run("inspect", db, overrides)
                common.run("seed", db, overrides)
                caught_up(srv.url(), standby.name)
                sampler = LagSampler(srv.url(), standby.name)
                sampler.start()
                t0 = time.monotonic()
                out = common.run("backfill", db, overrides)
                seconds = time.monotonic() - t0
                caught_up(srv.url(), standby.name)
                sampler.stop()
            finally:
                with psycopg.connect(srv.url(), autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
            summary = out["report"].summary.set_index("table").loc["workflows"]
            judged = variant == "on"
            worst = max(sampler.lags) if sampler.lags else 0.0
            report.add(variant=f"replica throttle {variant}" if variant != "fastest" else "every throttle off",
                       rows=int(summary["rows updated"]), seconds=round(seconds, 1),
                       rows_per_s=round(summary["rows updated"] / max(seconds, 1e-9)),
                       paused_s=float(summary["throttled s"]),
                       max_lag_s=round(worst, 2), p99_lag_s=round(common.percentile(sampler.lags, 99), 2),
                       max_behind_mb=round(sampler.max_behind / 2**20, 1),
                       target=f"max lag <= {TARGET_LAG_S:.0f} s" if judged else "",
                       met=(worst <= TARGET_LAG_S) if judged else "")
    report.notes.append("primary and standby on the same machine and disks (the standby replays with its own "
                        "startup process); the lag is sampled on the primary every 100 ms, from when the backfill "
                        "starts until the standby has replayed it all")
    return report.save_and_print()
