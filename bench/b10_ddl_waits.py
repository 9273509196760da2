"""B10 DDL waits behind autovacuum

The application's worst wait per DDL statement of the backfill and constrain phases while autovacuum keeps
working on the table. The writer is B3's: the legacy workload as legacy_app on 4 connections, on a fixed
schedule. workflows gets reloptions that make autovacuum start on it whenever it has dead tuples and crawl
(`autovacuum_vacuum_cost_delay = 20`, `cost_limit = 10`, `autovacuum_naptime = 1s` for the run), so a
statement usually finds one running. Per statement (from the ledger's statement journal), the worst latency
of the application's transactions that started while it ran. Side by side, alternating, three rounds:
the ladder of issue 15 (autovacuum on the table cancelled before the statement, tries of 50 ms growing to
500 ms) against the ladder before it (2 s tries, autovacuum left for PostgreSQL to cancel after
deadlock_timeout; reproduced here by turning the clearing off).

Reproduce: .venv/bin/python -m bench b10   (BENCH_B10_ROWS=200000, BENCH_B3_RATE=200 transactions/s)
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import contextmanager

import psycopg

from runbook_helpers.db import ddl

from . import b3_online, common

ROUNDS = 3
TARGET_MS = 200.0
# what locks: in base.yaml was before issue 15
OLD_LADDER = {"first_lock_timeout_ms": 2000, "lock_timeout_ms": 2000,
              "retry": {"attempts": 6, "backoff_ms": 500, "backoff_max_ms": 10000}}
# statements judged: those taking a lock autovacuum conflicts with (reads and the batches are B3's subject)
JUDGED_MODES = ddl.AUTOVACUUM_CONFLICTS
CRAWLING_AUTOVACUUM = ("ALTER TABLE workflows SET (autovacuum_vacuum_threshold = 0, "
                       "autovacuum_vacuum_scale_factor = 0, autovacuum_analyze_threshold = 0, "
                       "autovacuum_analyze_scale_factor = 0, autovacuum_vacuum_cost_delay = 20, "
                       "autovacuum_vacuum_cost_limit = 10)")


class AutovacuumWatch(threading.Thread):
    """Samples, every 20 ms, whether an autovacuum worker is on workflows (to say which statements met one)."""

    def __init__(self, database: str):
        super().__init__(daemon=True)
        self.database = database
        self.seen: list[tuple[float, bool]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        with psycopg.connect(common.url(self.database), autocommit=True) as conn:
            while not self.stopped.wait(0.02):
                on = conn.execute("SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' "
                                  "AND datname = current_database() AND query LIKE '%workflows%'").fetchone()[0]
                self.seen.append((time.time(), bool(on)))

    def at(self, moment: float) -> bool:
        before = [on for t, on in self.seen if t <= moment]
        return before[-1] if before else False


@contextmanager
def autovacuum_naptime(seconds: int):
    with common.admin() as conn:
        conn.execute(f"ALTER SYSTEM SET autovacuum_naptime = '{int(seconds)}s'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with common.admin() as conn:
            conn.execute("ALTER SYSTEM RESET autovacuum_naptime")
            conn.execute("SELECT pg_reload_conf()")


@contextmanager
def ladder(variant: str):
    """The old ladder: its params, and no clearing of the table (what Executor did before issue 15)."""
    if variant == "issue 15 ladder":
        yield {}
        return
    clear = ddl.Executor._clear_the_table
    ddl.Executor._clear_the_table = lambda self, step, reported: None
    try:
        yield {"locks": OLD_LADDER}
    finally:
        ddl.Executor._clear_the_table = clear


def one_run(tpl: str, variant: str, rate: int) -> list[dict]:
    db = common.clone(tpl, "bench_b10")
    try:
        with ladder(variant) as overrides, autovacuum_naptime(1):
            overrides = {**common.only("workflows"), **overrides}
            common.run("inspect", db, overrides)
            common.run("seed", db, overrides)
            with psycopg.connect(common.url(db), autocommit=True) as conn:
                conn.execute(CRAWLING_AUTOVACUUM)
                conn.execute("UPDATE workflows SET status = status WHERE id % 50 = 0")  # dead tuples: vacuum starts
            writer, watch = b3_online.Writer(db, rate), AutovacuumWatch(db)
            writer.start()
            watch.start()
            time.sleep(3)
            try:
                for phase in ("backfill", "constrain"):
                    common.run(phase, db, overrides)
            finally:
                writer.stop()
                watch.stopped.set()
                watch.join(5)
            with psycopg.connect(common.url(db)) as conn:
                journal = conn.execute(
                    "SELECT phase, action, lock_mode, attempts, extract(epoch FROM started_at)::float8, "
                    "extract(epoch FROM finished_at)::float8, cleared FROM tenancy_runbook.statement_journal "
                    "WHERE table_name = 'workflows' AND outcome = 'applied' ORDER BY id").fetchall()
        transactions = writer.transactions()
    finally:
        common.drop(db)
    out = []
    for phase, action, lock, attempts, start, end, cleared in journal:
        mode = ddl.strongest_lock_mode(lock)
        if mode not in JUDGED_MODES:
            continue
        window = [ms for t, ms, failed in transactions if start - 0.05 <= t <= end and not failed]
        out.append({"phase": phase, "statement": action, "lock": lock.split(" (")[0], "queueing": mode in ddl.QUEUEING_MODES,
                    "attempts": attempts, "statement_ms": 1000 * (end - start),
                    "app_worst_ms": max(window) if window else 0.0, "app_transactions": len(window),
                    "autovacuum_at_start": watch.at(start),
                    "autovacuum_cancelled": bool(cleared and "cancelled autovacuum" in cleared),
                    "errors": sum(1 for t, _, failed in transactions if start <= t <= end and failed)})
    return out


def main() -> dict:
    rows = int(os.environ.get("BENCH_B10_ROWS", "200000"))
    rate = int(os.environ.get("BENCH_B3_RATE", "200"))
    tpl = common.ensure_template(f"bench_b10_tpl_{rows}", rows, prepare=["ALTER TABLE workflows ADD COLUMN tenant_id bigint"])
    sized = "" if rows == 200_000 else f"BENCH_B10_ROWS={rows} "
    report = common.Report("B10 DDL waits behind autovacuum", f"{sized}python -m bench b10")
    variants = ("issue 15 ladder", "ladder before issue 15")
    runs: dict[str, list[list[dict]]] = {v: [] for v in variants}
    for round_ in range(1, ROUNDS + 1):
        for variant in (variants if round_ % 2 else variants[::-1]):
            runs[variant].append(one_run(tpl, variant, rate))
    for variant in variants:
        per_statement: dict[tuple[str, str], list[dict]] = {}
        for statements in runs[variant]:
            for s in statements:
                per_statement.setdefault((s["phase"], s["statement"]), []).append(s)
        for (phase, statement), seen in per_statement.items():
            worst = [s["app_worst_ms"] for s in seen]
            report.add(ladder=variant, phase=phase, statement=statement, lock=seen[0]["lock"],
                       app_worst_ms_median=round(statistics.median(worst), 1), app_worst_ms_max=round(max(worst), 1),
                       statement_ms_median=round(statistics.median(s["statement_ms"] for s in seen), 1),
                       tries_max=max(s["attempts"] for s in seen),
                       met_autovacuum=f"{sum(s['autovacuum_at_start'] for s in seen)}/{len(seen)}",
                       cancelled=f"{sum(s['autovacuum_cancelled'] for s in seen)}/{len(seen)}")
        for kind, pick in (("queueing statements (ACCESS EXCLUSIVE, SHARE ROW EXCLUSIVE)", lambda s: s["queueing"]),
                           ("every DDL statement", lambda s: True)):
            per_round = [max((s["app_worst_ms"] for s in statements if pick(s)), default=0.0) for statements in runs[variant]]
            judged = variant == variants[0]
            report.add(ladder=variant, phase="all", statement=f"worst over {kind}, per round",
                       app_worst_ms_median=round(statistics.median(per_round), 1), app_worst_ms_max=round(max(per_round), 1),
                       spread=" / ".join(f"{v:,.0f}" for v in per_round),
                       target=f"<= {TARGET_MS:.0f} ms" if judged else "",
                       met=(max(per_round) <= TARGET_MS) if judged else "")
    errors = sum(s["errors"] for v in variants for statements in runs[v] for s in statements)
    report.notes.append(f"{rows:,} workflows rows; writer: the legacy workload on {b3_online.CONNECTIONS} connections, "
                        f"{rate} transactions/s in all, latency from each transaction's scheduled start; "
                        f"{errors} application errors during the statements; {ROUNDS} rounds alternating the order")
    report.notes.append("met_autovacuum: in how many rounds an autovacuum worker was on workflows when the "
                        "statement started (sampled every 20 ms); cancelled: in how many the ladder cancelled it "
                        "(the old ladder never does; PostgreSQL cancels it after deadlock_timeout)")
    return report.save_and_print()
