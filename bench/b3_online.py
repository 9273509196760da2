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

The runbook side runs in several variants on identical copies: with the latency budget controller
(backfill.throttle.budget_p99_ms) at 50 ms, the default and the one judged, and at other budgets for the
curve, and at its fastest setting (every throttle off: no budget, no stall pacing, no lock-waiter or replica
pauses). Every side runs BENCH_B3_ROUNDS times (3), the order alternating; each row is the median over the
rounds with the spread. Each backfill row carries its throughput (rows/s) and its ratio to the naive single
UPDATE's throughput in the same round, next to the writer's p99 and max: the throughput-against-p99 table,
drawn as a chart below it.

Reproduce: .venv/bin/python -m bench b3   (BENCH_B3_RATE=200 transactions/s, BENCH_B2_ROWS=5000000,
BENCH_B3_ROUNDS=3, BENCH_B3_BUDGETS=25,50,100; BENCH_B3_ONLY=budget|fastest|naive|budget25,... runs some sides)
"""

from __future__ import annotations

import os
import statistics
import time

import psycopg

from runbook_helpers.workload import LegacyWorkload

from . import b2_batched, common

TARGET_P99_MS = 50.0
TARGET_MAX_MS = 200.0
TARGET_THROUGHPUT = 0.5  # of one UPDATE's rows/s, under the same writer
JUDGED_BUDGET = 50       # the default budget; its variant is judged against the targets
CONNECTIONS = 4


class Writer:
    """The legacy workload on CONNECTIONS connections, `rate` transactions/s in all."""

    def __init__(self, database: str, rate: int):
        url = common.url(database).replace("postgresql://postgres@", "postgresql://legacy_app@")
        self.workloads = [LegacyWorkload(url, seed=i, rate=rate / CONNECTIONS) for i in range(CONNECTIONS)]
        self.waits = common.WaitSampler(database, "legacy_app")
        self.pace: list[tuple[float, float]] = []  # the canary's p99 per batch (a budget side's backfill)

    def start(self) -> None:
        self.waits.start()
        for w in self.workloads:
            w.start()

    def stop(self) -> None:
        for w in self.workloads:
            w.stop()
        self.waits.stop()

    @property
    def aborted(self) -> list[str]:
        return [f"{s.kind}: {s.error}" for w in self.workloads for s in w.errors()]

    def transactions(self) -> list[tuple[float, float, bool]]:
        """(start epoch seconds, latency ms, failed) for every transaction."""
        return [(s.started, s.ms, s.error is not None) for w in self.workloads for s in w.samples]

    def slowest_kinds(self, start: float, end: float, top: int = 4) -> str:
        """The statement kinds with the highest p99 in [start, end]: which of the application's statements wait."""
        by_kind: dict[str, list[float]] = {}
        for w in self.workloads:
            for s in w.samples:
                if start <= s.started <= end and s.error is None:
                    by_kind.setdefault(s.kind, []).append(s.ms)
        ranked = sorted(by_kind.items(), key=lambda kv: -common.percentile(kv[1], 99))[:top]
        return ", ".join(f"{k} p99 {common.percentile(v, 99):,.0f} ms (n={len(v)})" for k, v in ranked)


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
        if name == "backfill":
            writer.pace = canary_series(db)
    writer.stop()
    return phases, writer


PACE_SQL = """
SELECT extract(epoch FROM recorded_at) - (max(elapsed_s) OVER () - elapsed_s), canary_p99_ms
FROM {schema}.backfill_pace WHERE canary_p99_ms IS NOT NULL ORDER BY elapsed_s
"""


def canary_series(db: str) -> list[tuple[float, float]]:
    """(epoch seconds, canary p99 ms) per batch of the backfill just run: the controller's signal, from the
    ledger (recorded as the batches end, so each batch's time is the recording's less the time still to go)."""
    schema = common.base_params().ledger_schema
    with psycopg.connect(common.url(db), autocommit=True) as conn:
        return [(float(t), float(p)) for t, p in conn.execute(PACE_SQL.format(schema=schema))]


def signal_against_application(writer: "Writer", window_s: float = 2.0) -> str:
    """Whether the canary felt what the application felt: per batch, the canary's p99 (its last 2 s) against
    the application's p99 over the same 2 s."""
    pairs = []
    transactions = writer.transactions()
    for t, canary in writer.pace:
        app = [ms for start, ms, failed in transactions if t - window_s <= start <= t and not failed]
        if app:
            pairs.append((canary, common.percentile(app, 99)))
    if not pairs:
        return "no canary samples"
    blind = sum(1 for c, a in pairs if c <= JUDGED_BUDGET < a)
    return (f"over {len(pairs)} batches, the canary's p99 median {statistics.median(c for c, _ in pairs):,.0f} ms "
            f"(max {max(c for c, _ in pairs):,.0f}), the application's p99 over the same 2 s median "
            f"{statistics.median(a for _, a in pairs):,.0f} ms (max {max(a for _, a in pairs):,.0f}); the canary "
            f"within {JUDGED_BUDGET} ms while the application was over it in {blind} ({100 * blind / len(pairs):.0f}%)")


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


def _budgets() -> list[int]:
    return [int(b) for b in os.environ.get("BENCH_B3_BUDGETS", "25,50,100").split(",") if b.strip()]


def sides() -> list[tuple[str, str, object]]:
    """(approach, key, side): the runbook with each budget, at its fastest, and naive; BENCH_B3_ONLY filters."""
    out = []
    for budget in sorted(set(_budgets()) | {JUDGED_BUDGET}):
        variant = {"throttle": {"budget_p99_ms": budget}}
        out.append((f"runbook budget {budget} ms", f"budget{budget}",
                    lambda db, rate, v=variant: runbook_side(db, rate, v)))
    out.append(("runbook fastest", "fastest", lambda db, rate: runbook_side(db, rate, VARIANTS["fastest"])))
    out.append(("naive", "naive", naive_side))
    if os.environ.get("BENCH_B3_ONLY"):
        wanted = os.environ["BENCH_B3_ONLY"].split(",")
        out = [s for s in out if s[1] in wanted or (s[1] == f"budget{JUDGED_BUDGET}" and "budget" in wanted)
               or (s[0].startswith("runbook") and "runbook" in wanted)]
    return out


def _spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else ""


def tradeoff_chart(points: list[tuple[str, float, float]], path) -> None:
    """Backfill throughput against the application's p99, one point per variant and round."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label in dict.fromkeys(p[0] for p in points):
        xs = [p[1] for p in points if p[0] == label]
        ys = [p[2] for p in points if p[0] == label]
        ax.scatter(xs, ys, label=label, s=36)
    ax.axvline(TARGET_P99_MS, color="grey", linestyle="--", linewidth=1)
    ax.text(TARGET_P99_MS, ax.get_ylim()[1] * 0.97, " p99 target", color="grey", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("application p99 during the backfill (ms, log scale)")
    ax.set_ylabel("backfill rows/s")
    ax.set_ylim(bottom=0)
    ax.set_title("B3: backfill throughput against the application's p99")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> dict:
    rows = b2_batched.rows()
    rate = int(os.environ.get("BENCH_B3_RATE", "200"))
    rounds = int(os.environ.get("BENCH_B3_ROUNDS", "3"))
    tpl = b2_batched.template()
    sized = "" if rows == 5_000_000 else f"BENCH_B2_ROWS={rows} "
    sized += "".join(f"{k}={os.environ[k]} " for k in ("BENCH_B3_BUDGETS", "BENCH_B3_ROUNDS", "BENCH_B3_ONLY")
                     if os.environ.get(k))
    report = common.Report("B3 online", f"{sized}python -m bench b3", size=f"{rows:,} rows")
    chosen = sides()
    measured: dict[tuple[str, str], list[dict]] = {}
    aborted: dict[str, list[str]] = {}
    evidence: list[str] = []
    for round_ in range(1, rounds + 1):
        order = chosen if round_ % 2 else chosen[::-1]  # alternate, so drift over the run hits every side alike
        for approach, key, side in order:
            db = common.clone(tpl, f"bench_b3_{key}")
            try:
                phases, writer = side(db, rate)
                transactions = writer.transactions()
            finally:
                common.drop(db)
            for name, start, end, rows_done in phases:
                if name in ("backfill", "single UPDATE", "quiet") and round_ == 1:
                    evidence.append(f"{approach}, {name} (round 1): the application's active sessions waited on "
                                    f"{writer.waits.shares(start, end)}; slowest statements: "
                                    f"{writer.slowest_kinds(start, end)}")
                if name == "backfill" and writer.pace:
                    evidence.append(f"{approach}, backfill (round {round_}): the budget's signal: "
                                    f"{signal_against_application(writer)}")
                stats = phase_stats(transactions, start, end)
                stats.update(round=round_, seconds=end - start,
                             rows_per_s=rows_done / max(end - start, 1e-9) if rows_done else None)
                measured.setdefault((approach, name), []).append(stats)
            aborted.setdefault(approach, []).extend(writer.aborted)
    naive_rate = {s["round"]: s["rows_per_s"] for s in measured.get(("naive", "single UPDATE"), [])}
    judged_approach = f"runbook budget {JUDGED_BUDGET} ms"
    points = []
    for (approach, name), seen in measured.items():
        p99 = [s["p99_ms"] for s in seen]
        mx = [s["max_ms"] for s in seen]
        rps = [s["rows_per_s"] for s in seen if s["rows_per_s"]]
        ratios = [s["rows_per_s"] / naive_rate[s["round"]] for s in seen
                  if s["rows_per_s"] and naive_rate.get(s["round"]) and approach != "naive"]
        judged = approach == judged_approach and name in ("backfill", "constrain")
        met = all(s["errors"] == 0 and s["p99_ms"] <= TARGET_P99_MS and s["max_ms"] <= TARGET_MAX_MS for s in seen)
        if judged and name == "backfill" and ratios:
            met = met and statistics.median(ratios) >= TARGET_THROUGHPUT
        report.add(approach=approach, phase=name, rounds=len(seen),
                   seconds=round(statistics.median(s["seconds"] for s in seen), 1),
                   transactions=sum(s["transactions"] for s in seen), errors=sum(s["errors"] for s in seen),
                   p99_ms=round(statistics.median(p99), 1), p99_spread=_spread(p99),
                   max_ms=round(statistics.median(mx), 1), max_spread=_spread(mx),
                   rows_per_s=round(statistics.median(rps)) if rps else None, rows_per_s_spread=_spread(rps) if rps else "",
                   x_one_update=round(statistics.median(ratios), 2) if ratios else None,
                   target=(f"0 errors, p99 <= {TARGET_P99_MS:.0f}, max <= {TARGET_MAX_MS:.0f} ms"
                           + (f", >= {TARGET_THROUGHPUT}x one UPDATE" if name == "backfill" else "")) if judged else "",
                   met=met if judged else "")
        if name == "backfill" or (approach == "naive" and name == "single UPDATE"):
            label = "naive (one UPDATE)" if approach == "naive" else approach
            points += [(label, s["p99_ms"], s["rows_per_s"]) for s in seen if s["rows_per_s"]]
    if points:
        chart = common.RESULTS.parent.parent / "docs" / f"b3_tradeoff_{rows}.png"
        tradeoff_chart(points, chart)
        report.notes.append(f"the trade-off, one point per variant and round: ![B3 trade-off]({chart.name})")
    report.notes += evidence
    for approach, errors in aborted.items():
        if errors:
            report.notes.append(f"{approach}: the workload saw {len(errors)} errors, e.g. {errors[0][:160]}")
    report.notes.append(f"writer: the legacy workload (runbook_helpers/workload.py) as legacy_app on {CONNECTIONS} "
                        f"connections, {rate} transactions/s in all on a fixed schedule; latency counted from each "
                        f"transaction's scheduled start; {rows:,} rows; {rounds} rounds, the order of the sides "
                        f"alternating; medians, spread min-max over the rounds; x_one_update: the backfill's rows/s "
                        f"over the naive single UPDATE's in the same round")
    return report.save_and_print()
