"""B2 batched backfill

5M workflows rows with NULL tenant_id (a partly applied 0001).

The runbook's backfill phase (SET DEFAULT, then keyset batches with checkpoints) against one
`UPDATE workflows SET tenant_id = <id>` on an identical copy, same server, same run; the single UPDATE is
measured before and after the runbook variants and averaged. The demo's updated_at trigger is dropped
in this template, so both sides measure the UPDATE itself.

Reproduce: .venv/bin/python -m bench b2    (BENCH_B2_ROWS=5000000, BENCH_B2_VARIANTS="batch_size=1000,target_batch_ms=none;...;defaults;workers=2")
"""

from __future__ import annotations

import os
import time

import psycopg

from . import common

TARGET = 0.8
STRETCH = 1.0


def rows() -> int:
    return int(os.environ.get("BENCH_B2_ROWS", "5000000"))


def template() -> str:
    n = rows()
    return common.ensure_template(f"bench_tpl_{n}_null", n, prepare=[
        "DROP TRIGGER workflows_set_updated_at ON workflows",
        "ALTER TABLE workflows ADD COLUMN tenant_id bigint",
    ])


def variants() -> list[tuple[str, dict]]:
    raw = os.environ.get("BENCH_B2_VARIANTS", "batch_size=1000,target_batch_ms=none;batch_size=10000,target_batch_ms=none;defaults;workers=2")
    out = []
    for item in raw.split(";"):
        item = item.strip()
        if not item:
            continue
        if item == "defaults":
            out.append(("params defaults", {}))
            continue
        settings = {}
        for pair in item.split(","):
            key, value = pair.split("=")
            settings[key.strip()] = _value(value.strip())
        out.append((item, settings))
    return out


def _value(text: str):
    if text.lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def single_update(db: str) -> float:
    with psycopg.connect(common.url(db), autocommit=True) as conn:
        tenant = conn.execute("SELECT id FROM tenants WHERE uuid = %s",
                              (str(common.base_params().system_tenant.uuid),)).fetchone()[0]
        conn.execute("CHECKPOINT")
        t0 = time.monotonic()
        conn.execute("UPDATE workflows SET tenant_id = %s", (tenant,))
        return time.monotonic() - t0


def runbook_backfill(db: str, backfill: dict) -> tuple[float, dict]:
    overrides = common.only("workflows", **backfill)
    common.run("inspect", db, overrides)
    common.run("seed", db, overrides)
    with psycopg.connect(common.url(db), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    t0 = time.monotonic()
    out = common.run("backfill", db, overrides)
    wall = time.monotonic() - t0
    with psycopg.connect(common.url(db)) as conn:
        left = conn.execute("SELECT count(*) FROM workflows WHERE tenant_id IS NULL").fetchone()[0]
    assert left == 0, f"{left} rows left NULL"
    summary = out["report"].summary.set_index("table").loc["workflows"]
    return wall, {"batches": int(summary["batches"])}


def main() -> dict:
    n = rows()
    tpl = template()
    report = common.Report("B2 batched backfill", "python -m bench b2")
    naive_times = []
    db = common.clone(tpl, "bench_b2_naive")
    try:
        naive_times.append(single_update(db))
    finally:
        common.drop(db)
    results = []
    for label, backfill in variants():
        db = common.clone(tpl, "bench_b2_runbook")
        try:
            wall, extra = runbook_backfill(db, backfill)
        finally:
            common.drop(db)
        results.append((label, wall, extra))
    db = common.clone(tpl, "bench_b2_naive")
    try:
        naive_times.append(single_update(db))
    finally:
        common.drop(db)
    naive = sum(naive_times) / len(naive_times)
    report.add(approach="single UPDATE (naive)", rows=n, seconds=round(naive, 1), rows_per_s=round(n / naive),
               ratio="1.00", target="", met="")
    for label, wall, extra in results:
        ratio = naive / wall
        report.add(approach=f"runbook backfill ({label})", rows=n, seconds=round(wall, 1), rows_per_s=round(n / wall),
                   ratio=f"{ratio:.2f}", target=f">= {TARGET}", met=ratio >= TARGET, batches=extra["batches"])
    report.notes.append(f"single UPDATE measured twice (before and after the runbook variants): "
                        f"{', '.join(f'{t:.1f} s' for t in naive_times)}")
    report.notes.append("runbook time is the whole backfill phase: SET DEFAULT, NULL counts before and after, "
                        "every batch with its checkpoint")
    return report.save_and_print()
