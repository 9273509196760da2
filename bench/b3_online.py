"""B3 online

What a concurrent writer feels while the backfill and then constrain run.

pgbench (from the same binaries as the server) runs a fixed-rate writer against the 5M-row workflows
table with NULL tenant_id: 90% single-row UPDATEs of random rows, 10% INSERTs that omit tenant_id, as
the legacy application would. Per-transaction latencies come from pgbench's own log; each is assigned
to the phase it started in. Runbook: its backfill phase, then its constrain phase. Naive, on an
identical copy: SET DEFAULT (so the inserts keep working), one UPDATE of every row, SET NOT NULL and
ADD FOREIGN KEY directly.

Reproduce: .venv/bin/python -m bench b3   (BENCH_B3_RATE=200 transactions/s, BENCH_B2_ROWS=5000000)
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from . import b2_batched, common

TARGET_P99_MS = 50.0
TARGET_MAX_MS = 200.0
UPDATE_SCRIPT = "\\set id random(1, {rows})\nUPDATE workflows SET status = 'active' WHERE id = :id;\n"
INSERT_SCRIPT = "INSERT INTO workflows (uuid, name) VALUES (gen_random_uuid(), 'bench ' || gen_random_uuid());\n"


class Writer(threading.Thread):
    """pgbench in back-to-back 3-second chunks (so every chunk's log is complete when it exits)."""

    def __init__(self, database: str, rows: int, rate: int, folder: Path):
        super().__init__(daemon=True)
        self.database, self.rate, self.folder = database, rate, folder
        (folder / "update.sql").write_text(UPDATE_SCRIPT.format(rows=rows))
        (folder / "insert.sql").write_text(INSERT_SCRIPT)
        self._stop_event = threading.Event()
        self.aborted: list[str] = []
        self.chunks = 0

    def run(self) -> None:
        pgbench = str(common.server().tool("pgbench"))
        while not self._stop_event.is_set():
            prefix = self.folder / f"chunk{self.chunks:04d}"
            result = subprocess.run(
                [pgbench, "-n", "-c", "4", "-j", "2", "-R", str(self.rate), "-T", "3", "-l",
                 f"--log-prefix={prefix}", "-f", f"{self.folder / 'update.sql'}@9",
                 "-f", f"{self.folder / 'insert.sql'}@1", common.url(self.database)],
                capture_output=True, text=True)
            self.chunks += 1
            self.aborted += [l for l in result.stderr.splitlines() if "aborted" in l or "ERROR" in l]

    def stop(self) -> None:
        self._stop_event.set()
        self.join(60)

    def transactions(self) -> list[tuple[float, float, bool]]:
        """(start epoch seconds, latency ms, failed) for every logged transaction."""
        out = []
        for log in self.folder.glob("chunk*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                if len(fields) < 6:
                    continue
                failed = not fields[2].isdigit()
                latency_ms = 0.0 if failed else int(fields[2]) / 1000.0
                end = int(fields[4]) + int(fields[5]) / 1e6
                out.append((end - latency_ms / 1000.0, latency_ms, failed))
        return out


def phase_stats(transactions, start: float, end: float) -> dict:
    window = [t for t in transactions if start <= t[0] <= end]
    latencies = [t[1] for t in window if not t[2]]
    return {"transactions": len(window), "errors": sum(1 for t in window if t[2]),
            "p50_ms": common.percentile(latencies, 50), "p99_ms": common.percentile(latencies, 99),
            "max_ms": max(latencies) if latencies else 0.0}


def runbook_side(db: str, folder: Path, rate: int, rows: int) -> tuple[list, Writer]:
    import json
    overrides = common.only("workflows", **json.loads(os.environ.get("BENCH_B3_BACKFILL", "{}")))
    common.run("inspect", db, overrides)
    common.run("seed", db, overrides)
    writer = Writer(db, rows, rate, folder)
    writer.start()
    time.sleep(4)  # a quiet period first: the writer's own baseline
    phases = [("quiet", time.time() - 3.5, time.time())]
    for name in ("backfill", "constrain"):
        t0 = time.time()
        common.run(name, db, overrides)
        phases.append((name, t0, time.time()))
    writer.stop()
    return phases, writer


def naive_side(db: str, folder: Path, rate: int, rows: int) -> tuple[list, Writer]:
    with psycopg.connect(common.url(db), autocommit=True) as conn:
        tenant = conn.execute("SELECT id FROM tenants WHERE uuid = %s",
                              (str(common.base_params().system_tenant.uuid),)).fetchone()[0]
        writer = Writer(db, rows, rate, folder)
        writer.start()
        time.sleep(4)
        phases = [("quiet", time.time() - 3.5, time.time())]
        conn.execute(f"ALTER TABLE workflows ALTER COLUMN tenant_id SET DEFAULT {int(tenant)}")
        for name, statement in (
                ("single UPDATE", f"UPDATE workflows SET tenant_id = {int(tenant)} WHERE tenant_id IS NULL"),
                ("SET NOT NULL", "ALTER TABLE workflows ALTER COLUMN tenant_id SET NOT NULL"),
                ("ADD FOREIGN KEY", "ALTER TABLE workflows ADD FOREIGN KEY (tenant_id) REFERENCES tenants(id)")):
            t0 = time.time()
            conn.execute(statement)
            phases.append((name, t0, time.time()))
        writer.stop()
    return phases, writer


def main() -> dict:
    rows = b2_batched.rows()
    rate = int(os.environ.get("BENCH_B3_RATE", "200"))
    tpl = b2_batched.template()
    sized = "" if rows == 5_000_000 else f"BENCH_B2_ROWS={rows} "
    report = common.Report("B3 online", f"{sized}python -m bench b3")
    sides = (("runbook", runbook_side), ("naive", naive_side))
    if os.environ.get("BENCH_B3_ONLY"):
        sides = tuple(s for s in sides if s[0] == os.environ["BENCH_B3_ONLY"])
    for approach, side in sides:
        db = common.clone(tpl, f"bench_b3_{approach}")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                phases, writer = side(db, Path(tmp), rate, rows)
                transactions = writer.transactions()
        finally:
            common.drop(db)
        for name, start, end in phases:
            stats = phase_stats(transactions, start, end)
            judged = approach == "runbook" and name != "quiet"
            met = (stats["errors"] == 0 and stats["p99_ms"] <= TARGET_P99_MS and stats["max_ms"] <= TARGET_MAX_MS)
            report.add(approach=approach, phase=name, seconds=round(end - start, 1), **{
                k: (round(v, 1) if isinstance(v, float) else v) for k, v in stats.items()},
                target=f"0 errors, p99 <= {TARGET_P99_MS:.0f}, max <= {TARGET_MAX_MS:.0f} ms" if judged else "",
                met=met if judged else "")
        if writer.aborted:
            report.notes.append(f"{approach}: pgbench reported {len(writer.aborted)} aborted clients/errors, e.g. "
                                f"{writer.aborted[0][:160]}")
    report.notes.append(f"writer: pgbench -c 4 -j 2 -R {rate}, 90% UPDATE of a random row, 10% INSERT without "
                        f"tenant_id; latency counted from each transaction's scheduled start")
    return report.save_and_print()
