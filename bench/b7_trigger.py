"""B7 rollout trigger

What the rollout triggers cost the application's writes: the legacy application's single-row INSERT (no
tenant_id) and UPDATE of workflows, one statement per transaction as it commits them, with the rollout
triggers (tenant from the org through the legacy mapping, the record of every write) against the same
statements on an identical copy that only has tenant_id with a DEFAULT (what 0001 alone would leave).
Measured side by side, alternating, three rounds; reported as writes/s and the ratio with its spread.

Reproduce: .venv/bin/python -m bench b7   (BENCH_B7_WRITES=3000 per kind and round)
"""

from __future__ import annotations

import os
import statistics
import time

import psycopg

from . import common

ROUNDS = 3
TARGET = 0.5  # the triggers may at most halve single-row write throughput


def _writes(db: str, count: int) -> dict[str, float]:
    """Inserts/s and updates/s of one connection, as the legacy application's role."""
    url = common.url(db).replace("postgresql://postgres@", "postgresql://legacy_app@")
    out = {}
    with psycopg.connect(url, autocommit=True) as conn:
        orgs = [r[0] for r in conn.execute("SELECT id FROM org ORDER BY id")]
        t0 = time.perf_counter()
        for i in range(count):
            conn.execute("INSERT INTO workflows (uuid, org_id, name, definition) VALUES (gen_random_uuid(), %s, %s, '{}')",
                         (orgs[i % len(orgs)], f"b7 {i} {time.time_ns()}"))
        out["inserts/s"] = count / (time.perf_counter() - t0)
        ids = [r[0] for r in conn.execute("SELECT id FROM workflows ORDER BY id LIMIT %s", (count,))]
        t0 = time.perf_counter()
        for i in ids:
            conn.execute("UPDATE workflows SET status = 'active' WHERE id = %s", (i,))
        out["updates/s"] = len(ids) / (time.perf_counter() - t0)
    return out


def main() -> dict:
    count = int(os.environ.get("BENCH_B7_WRITES", "3000"))
    tpl = common.ensure_template("bench_b7_tpl", 100_000, scale=0.1)
    report = common.Report("B7 rollout trigger", "python -m bench b7")
    overrides = {**common.only("workflows"), "legacy": {"enabled": True}}
    ratios: dict[str, list[float]] = {"inserts/s": [], "updates/s": []}
    for round_ in range(1, ROUNDS + 1):
        measured = {}
        for approach in (("with triggers", "plain DEFAULT") if round_ % 2 else ("plain DEFAULT", "with triggers")):
            db = common.clone(tpl, "bench_b7")
            try:
                for phase in ("inspect", "seed", "backfill"):
                    common.run(phase, db, overrides)
                if approach == "plain DEFAULT":
                    with psycopg.connect(common.url(db), autocommit=True) as conn:
                        system = conn.execute("SELECT id FROM tenants WHERE uuid = %s",
                                              (str(common.base_params().system_tenant.uuid),)).fetchone()[0]
                        conn.execute("DROP TRIGGER tenancy_rollout_assign ON workflows")
                        conn.execute("DROP TRIGGER tenancy_rollout_record ON workflows")
                        conn.execute("DROP TRIGGER IF EXISTS tenancy_rollout_children ON workflows")
                        conn.execute(f"ALTER TABLE workflows ALTER COLUMN tenant_id SET DEFAULT {int(system)}")
                measured[approach] = _writes(db, count)
            finally:
                common.drop(db)
            report.add(round=round_, approach=approach, **{k: round(v) for k, v in measured[approach].items()})
        for kind in ratios:
            ratios[kind].append(measured["with triggers"][kind] / measured["plain DEFAULT"][kind])
    for kind, values in ratios.items():
        median = statistics.median(values)
        report.add(round="ratio", approach=f"{kind}: with triggers / plain DEFAULT",
                   **{"median": round(median, 2), "spread": f"{min(values):.2f}-{max(values):.2f}",
                      "target": f">= {TARGET}", "met": median >= TARGET})
    report.notes.append(f"{count} single-row writes per kind and round, one connection as legacy_app, autocommit; "
                        f"legacy mapping on (the trigger looks the org up); workflows has the demo's updated_at "
                        f"trigger in both")
    return report.save_and_print()
