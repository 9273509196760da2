"""B5 end to end

`runbook run --env local` on the default demo database, per phase, and how much of it
is kernel start-up (an empty notebook executed by papermill the same way, measured in the same run).

Reproduce: make bench   (or .venv/bin/python -m bench e2e). Rebuilds the local demo database.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import nbformat

from runbook_helpers.run import runner
from runbook_helpers.cli import _demo_db

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 60.0


def kernel_startup_s(samples: int = 3) -> float:
    """Seconds papermill needs to start a kernel, run one trivial cell and shut down."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "empty.ipynb"
        book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
        book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(book, source)
        times = []
        for i in range(samples):
            t0 = time.monotonic()
            runner.execute_notebook(source, Path(tmp) / f"out{i}.ipynb", None)
            times.append(time.monotonic() - t0)
    return sorted(times)[len(times) // 2]


def main() -> dict:
    _demo_db("local", None)
    startup = kernel_startup_s()
    t0 = time.monotonic()
    result = runner.run("local", log=lambda *_: None)
    total = time.monotonic() - t0
    phases = {p["name"]: p["seconds"] for p in result.phases}
    report = {
        "benchmark": "e2e (B5 end to end)",
        "command": "make bench  # python -m bench e2e",
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                    "platform": platform.platform()},
        "status": result.status,
        "total_s": round(total, 2),
        "per_phase_s": phases,
        "kernel_startup_s_each": round(startup, 2),
        "kernel_startup_share": round(startup * len(phases) / total, 3),
        "target_s": TARGET_S,
        "met": result.ok and total <= TARGET_S,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "e2e.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"B5 end to end ({report['command']})")
    print(f"  total {total:.1f} s (target <= {TARGET_S:.0f} s: {'met' if report['met'] else 'NOT met'}), "
          f"kernel start-up {startup:.1f} s per notebook = {100 * report['kernel_startup_share']:.0f}% of the run")
    for name, seconds in phases.items():
        print(f"  {name:<10} {seconds:6.1f} s")
    return report
