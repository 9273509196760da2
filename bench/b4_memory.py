"""B4 memory

Peak RSS of the process running the backfill of a 10M-row table with NULL tenant_id.

The backfill runs in a child process (the same helpers the notebook calls); its RSS is sampled from
/proc every 0.2 s. Keys are never loaded: every batch bound comes from one index-ordered query, so RSS
should stay flat however big the table is.

Reproduce: .venv/bin/python -m bench b4   (BENCH_B4_ROWS=10000000)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from . import common

TARGET_MB = 300

CHILD = """
import json, sys
from bench import common
overrides = json.loads(sys.argv[2])
common.run("inspect", sys.argv[1], overrides)
common.run("seed", sys.argv[1], overrides)
print("BACKFILL", flush=True)
common.run("backfill", sys.argv[1], overrides)
"""


def rss_mb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> dict:
    rows = int(os.environ.get("BENCH_B4_ROWS", "10000000"))
    tpl = common.ensure_template(f"bench_tpl_{rows}_null", rows, prepare=[
        "DROP TRIGGER workflows_set_updated_at ON workflows", "ALTER TABLE workflows ADD COLUMN tenant_id bigint"])
    db = common.clone(tpl, "bench_b4")
    samples = []
    try:
        env = dict(os.environ, RUNBOOK_HEADLESS="1")
        child = subprocess.Popen([sys.executable, "-c", CHILD, db, json.dumps(common.only("workflows"))],
                                 stdout=subprocess.PIPE, text=True, env=env, cwd=common.RESULTS.parent.parent)
        backfill_started = None
        t0 = time.monotonic()
        os.set_blocking(child.stdout.fileno(), False)
        while child.poll() is None:
            line = child.stdout.readline()
            if line.startswith("BACKFILL"):
                backfill_started = time.monotonic() - t0
            value = rss_mb(child.pid)
            if value is not None:
                samples.append((time.monotonic() - t0, value))
            time.sleep(0.2)
        assert child.returncode == 0, f"backfill child failed ({child.returncode})"
    finally:
        common.drop(db)
    during = [v for t, v in samples if backfill_started is not None and t >= backfill_started]
    start = during[0] if during else 0.0
    peak = max(v for _, v in samples)
    report = common.Report("B4 memory", "python -m bench b4")
    report.add(rows=rows, rss_at_backfill_start_mb=round(start, 1), peak_rss_mb=round(peak, 1),
               rss_at_end_mb=round(during[-1], 1) if during else None,
               growth_during_backfill_mb=round(max(during) - start, 1) if during else None,
               backfill_s=round(samples[-1][0] - (backfill_started or 0), 1),
               target=f"< {TARGET_MB} MB, flat", met=peak < TARGET_MB)
    return report.save_and_print()
