"""B3 online

What the legacy application feels while the backfill and then constrain run.

The writer is the demo application's own workload (runbook_helpers/workload.py, as the tests run it):
four connections as its role, legacy_app, each on a fixed schedule (BENCH_B3_RATE transactions/s in all),
running its statements in turn — reads by id, by org and list views on every table, inserts of workflows
and their children without tenant_id, updates, upserts, moves to another org, cascading deletes — against
the 5M-row workflows table with NULL tenant_id. Each latency counts from its scheduled start, so a stall
also counts for the transactions it delayed; each is assigned to the phase it started in. Runbook: its
backfill phase, then its constrain phase. Naive, on an identical copy: SET DEFAULT (so the inserts keep
working), one UPDATE of every row, SET NOT NULL and ADD FOREIGN KEY directly.

The runbook side runs in two variants on identical copies: with the latency budget controller at 50 ms
(backfill.throttle.budget_p99_ms, the default), and at its fastest setting (every throttle off: no budget,
no stall pacing, no lock-waiter or replica pauses). Each phase row carries the backfill's throughput
(rows/s) next to the writer's p99 and max, for the throughput-against-p99 table.

Reproduce: .venv/bin/python -m bench b3   (BENCH_B3_RATE=200 transactions/s, BENCH_B2_ROWS=5000000;
BENCH_B3_ONLY=budget|fastest|naive runs one side, e.g. BENCH_B3_ONLY=budget,naive)
"""

from __future__ import annotations

import os
import time

import psycopg

from runbook_helpers.workload import LegacyWorkload

from . import b2_batched, common

TARGET_P99_MS = 50.0
TARGET_MAX_MS = 200.0
CONNECTIONS = 4


class Writer:
    """The legacy workload on CONNECTIONS connections, `rate` transactions/s in all."""

    def __init__(self, database: str, rate: int):
        url = common.url(database).replace("postgresql://postgres@", "postgresql://legacy_app@")
        self.workloads = [LegacyWorkload(url, seed=i, rate=rate / CONNECTIONS) for i in range(CONNECTIONS)]

    def start(self) -> None:
        for w in self.workloads:
            w.start()

    def stop(self) -> None:
        for w in self.workloads:
            w.stop()

    @property
    def aborted(self) -> list[str]:
        return [f"{s.kind}: {s.error}" for w in self.workloads for s in w.errors()]

    def transactions(self) -> list[tuple[float, float, bool]]:
        """(start epoch seconds, latency ms, failed) for every transaction."""
        return [(s.started, s.ms, s.error is not None) for w in self.workloads for s in w.samples]


def phase_stats(transactions, start: float, end: float) -> dict:
    window = [t for t in transactions if start <= t[0] <= end]
    latencies = [t[1] for t in window if not t[2]]
    return {"transactions": len(window), "errors": sum(1 for t in window if t[2]),
            "p50_ms": common.percentile(latencies, 50), "p99_ms": common.percentile(latencies, 99),
            "max_ms": max(latencies) if latencies else 0.0}


# the runbook's variants: backfill params over base.yaml's (BENCH_B3_BACKFILL adds to both)
VARIANTS = {
    "budget": {"throttle": {"budget_p99_ms": 50}},
    "fastest": {"throttle": {"budget_p99_ms": None, "app_stall_ms": None, "max_lock_waiters": None,
                             "max_replica_lag_s": None}, "pause_ms": 0},
}


def runbook_side(db: str, rate: int, variant: dict) -> tuple[list, Writer]:
    import json
    backfill = {**variant, **json.loads(os.environ.get("BENCH_B3_BACKFILL", "{}"))}
    overrides = common.only("workflows", **backfill)
    common.run("inspect", db, overrides)
    common.run("seed", db, overrides)
    writer = Writer(db, rate)
    writer.start()
    time.sleep(4)  # a quiet period first: the writer's own baseline
    phases = [("quiet", time.time() - 3.5, time.time(), None)]
    for name in ("backfill", "constrain"):
        t0 = time.time()
        out = common.run(name, db, overrides)
        rows = int(out["report"].summary["rows updated"].sum()) if name == "backfill" else None
        phases.append((name, t0, time.time(), rows))
    writer.stop()
    return phases, writer


def naive_side(db: str, rate: int) -> tuple[list, Writer]:
    with psycopg.connect(common.url(db), autocommit=True) as conn:
        tenant = conn.execute("SELECT id FROM tenants WHERE uuid = %s",
                              (str(common.base_params().system_tenant.uuid),)).fetchone()[0]
        writer = Writer(db, rate)
        writer.start()
        time.sleep(4)
        phases = [("quiet", time.time() - 3.5, time.time(), None)]
        conn.execute(f"ALTER TABLE workflows ALTER COLUMN tenant_id SET DEFAULT {int(tenant)}")
        for name, statement in (
                ("single UPDATE", f"UPDATE workflows SET tenant_id = {int(tenant)} WHERE tenant_id IS NULL"),
                ("SET NOT NULL", "ALTER TABLE workflows ALTER COLUMN tenant_id SET NOT NULL"),
                ("ADD FOREIGN KEY", "ALTER TABLE workflows ADD FOREIGN KEY (tenant_id) REFERENCES tenants(id)")):
            t0 = time.time()
            done = conn.execute(statement).rowcount
            phases.append((name, t0, time.time(), done if name == "single UPDATE" else None))
        writer.stop()
    return phases, writer


def main() -> dict:
    rows = b2_batched.rows()
    rate = int(os.environ.get("BENCH_B3_RATE", "200"))
    tpl = b2_batched.template()
    sized = "" if rows == 5_000_000 else f"BENCH_B2_ROWS={rows} "
    report = common.Report("B3 online", f"{sized}python -m bench b3")
    sides = [(f"runbook {v}", v, lambda db, rate, v=v: runbook_side(db, rate, VARIANTS[v])) for v in VARIANTS]
    sides.append(("naive", "naive", naive_side))
    if os.environ.get("BENCH_B3_ONLY"):
        wanted = os.environ["BENCH_B3_ONLY"].split(",")
        sides = [s for s in sides if s[1] in wanted or (s[1] in VARIANTS and "runbook" in wanted)]
    for approach, key, side in sides:
        db = common.clone(tpl, f"bench_b3_{key}")
        try:
            phases, writer = side(db, rate)
            transactions = writer.transactions()
        finally:
            common.drop(db)
        for name, start, end, rows_done in phases:
            stats = phase_stats(transactions, start, end)
            judged = approach == "runbook budget" and name != "quiet"
            met = (stats["errors"] == 0 and stats["p99_ms"] <= TARGET_P99_MS and stats["max_ms"] <= TARGET_MAX_MS)
            report.add(approach=approach, phase=name, seconds=round(end - start, 1),
                       rows_per_s=round(rows_done / max(end - start, 1e-9)) if rows_done else None, **{
                k: (round(v, 1) if isinstance(v, float) else v) for k, v in stats.items()},
                target=f"0 errors, p99 <= {TARGET_P99_MS:.0f}, max <= {TARGET_MAX_MS:.0f} ms" if judged else "",
                met=met if judged else "")
        if writer.aborted:
            report.notes.append(f"{approach}: the workload saw {len(writer.aborted)} errors, e.g. "
                                f"{writer.aborted[0][:160]}")
    report.notes.append(f"writer: the legacy workload (runbook_helpers/workload.py) as legacy_app on {CONNECTIONS} "
                        f"connections, {rate} transactions/s in all on a fixed schedule; latency counted from each "
                        f"transaction's scheduled start")
    return report.save_and_print()
