"""`make bench` (= python -m bench [NAME ...]): run the benchmarks and report each with its command."""

import os
import sys

os.environ.setdefault("RUNBOOK_HEADLESS", "1")  # milestone lines, no live bars between the tables

from . import (b1_fast_path, b2_batched, b3_online, b4_memory, b6_mapped, b7_trigger, b8_partitions, b9_replica,
               b10_ddl_waits, b11_distribute, e2e)

BENCHMARKS = {"b1": b1_fast_path.main, "b2": b2_batched.main, "b3": b3_online.main, "b4": b4_memory.main,
              "b6": b6_mapped.main, "b7": b7_trigger.main, "b8": b8_partitions.main, "b9": b9_replica.main,
              "b10": b10_ddl_waits.main, "b11": b11_distribute.main,
              "e2e": e2e.main}


def main(argv: list[str]) -> int:
    if argv == ["report"]:
        from . import report
        report.main()
        return 0
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names:
        BENCHMARKS[name]()
    if not argv:
        from . import report
        report.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
