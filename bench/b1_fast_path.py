"""B1 fast path

tenant_id for a workflows table whose rows all go to the System Tenant, at 1M and 10M rows.

Runbook: backfill (ADD COLUMN … DEFAULT, metadata only) + constrain (CHECK NOT VALID → VALIDATE → SET NOT
NULL, FK NOT VALID → VALIDATE, CREATE INDEX CONCURRENTLY, ANALYZE). Naive, on an identical copy:
ADD COLUMN … NOT NULL DEFAULT … REFERENCES tenants(id), then CREATE INDEX. The longest ACCESS EXCLUSIVE
hold is measured from a second connection running `SELECT 1 FROM workflows LIMIT 1` every 5 ms.

Reproduce: .venv/bin/python -m bench b1    (sizes: BENCH_B1_ROWS=1000000,10000000)
"""

from __future__ import annotations

import os
import time

import psycopg

from . import common

TARGET_AE_MS = 50.0
TARGET_RATIO = 1.5
METADATA = ("ACCESS EXCLUSIVE", "SHARE ROW EXCLUSIVE")


def sizes() -> list[int]:
    raw = os.environ.get("BENCH_B1_ROWS", "1000000,10000000")
    return [int(x) for x in raw.split(",") if x.strip()]


def runbook_side(db: str) -> dict:
    overrides = common.only("workflows")
    common.run("inspect", db, overrides)
    common.run("seed", db, overrides)
    probe = common.Probe(db, "SELECT 1 FROM workflows LIMIT 1")
    probe.start()
    t0 = time.monotonic()
    backfill = common.run("backfill", db, overrides)
    constrain = common.run("constrain", db, overrides)
    wall = time.monotonic() - t0
    probe.stop()
    steps = backfill["report"].steps
    applied = constrain["applied"]
    plan = constrain["plan"].reset_index(drop=True)
    locks = dict(zip(plan["action"], plan["lock"]))
    metadata_s = float(steps["seconds"].sum())  # backfill's only statement: ADD COLUMN … DEFAULT
    scans_s = 0.0
    for row in applied.itertuples():
        if locks.get(row.action, "").startswith(METADATA):
            metadata_s += row.seconds
        else:
            scans_s += row.seconds
    return {"wall_s": wall, "metadata_s": metadata_s, "scans_s": scans_s, "max_ae_ms": probe.max_ms(),
            "probe_errors": probe.errors}


def naive_side(db: str) -> dict:
    with psycopg.connect(common.url(db), autocommit=True) as conn:
        tenant = conn.execute("SELECT id FROM tenants WHERE uuid = %s",
                              (str(common.base_params().system_tenant.uuid),)).fetchone()[0]
        probe = common.Probe(db, "SELECT 1 FROM workflows LIMIT 1")
        probe.start()
        t0 = time.monotonic()
        conn.execute(f"ALTER TABLE workflows ADD COLUMN tenant_id bigint NOT NULL DEFAULT {int(tenant)} "
                     f"REFERENCES tenants(id)")
        metadata = time.monotonic() - t0
        t1 = time.monotonic()
        conn.execute("CREATE INDEX workflows_tenant_id_idx ON workflows (tenant_id)")
        conn.execute("ANALYZE workflows")
        scans = time.monotonic() - t1
        wall = time.monotonic() - t0
        probe.stop()
    return {"wall_s": wall, "metadata_s": metadata, "scans_s": scans, "max_ae_ms": probe.max_ms(),
            "probe_errors": probe.errors}


def main() -> dict:
    report = common.Report("B1 fast path", "python -m bench b1")
    metadata_by_size = {}
    for rows in sizes():
        template = common.ensure_template(f"bench_tpl_{rows}", rows)
        for approach, side in (("runbook", runbook_side), ("naive", naive_side)):
            db = common.clone(template, f"bench_b1_{approach}")
            try:
                result = side(db)
            finally:
                common.drop(db)
            report.add(rows=rows, approach=approach, wall_s=round(result["wall_s"], 2),
                       metadata_s=round(result["metadata_s"], 3), scans_s=round(result["scans_s"], 2),
                       max_access_exclusive_ms=round(result["max_ae_ms"], 1),
                       target=f"< {TARGET_AE_MS:.0f} ms" if approach == "runbook" else "",
                       met=(result["max_ae_ms"] < TARGET_AE_MS) if approach == "runbook" else "")
            if approach == "runbook":
                metadata_by_size[rows] = result["metadata_s"]
    if len(metadata_by_size) >= 2:
        small, large = min(metadata_by_size), max(metadata_by_size)
        ratio = metadata_by_size[large] / max(metadata_by_size[small], 1e-9)
        report.add(rows=f"{large:,} / {small:,}", approach="runbook metadata steps ratio",
                   metadata_s=round(ratio, 2), target=f"<= {TARGET_RATIO}", met=ratio <= TARGET_RATIO)
    report.notes.append("max_access_exclusive_ms: longest a `SELECT 1 FROM workflows LIMIT 1` probe (every 5 ms, "
                        "second connection) was blocked; scans_s: VALIDATE, index build, ANALYZE (reads and writes "
                        "continue for the runbook; the naive index build blocks writes)")
    return report.save_and_print()
