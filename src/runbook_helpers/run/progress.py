"""Progress for long work: a live bar for people in JupyterLab, milestone lines that survive archives.

Headless runs (papermill under `runbook run`) get no bar, only lines such as
`backfill knowledge_bases: 4,000/8,000 rows (50%), 12,345 rows/s`, printed every few seconds and at the end.
Every batch is also kept as a history row, which the backfill chart draws. A `status` callable (the
backfill throttle's) appends what paces the work to each line and to the bar: the canary's p99 against the
budget, the batch size and pause chosen, the replicas' lag.
"""

from __future__ import annotations

import time
from typing import Callable

import pandas as pd
from tqdm import tqdm


class Progress:
    def __init__(self, label: str, total: int, *, every_s: float = 5.0, live: bool = True,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.total = max(0, int(total))
        self.done = 0
        self.every_s = every_s
        self.log = log
        self.clock = clock
        self.started = clock()
        self._last_line = self.started
        self.history: list[dict] = []
        self.status: Callable[[], str] | None = None
        self._bar = tqdm(total=self.total, desc=label, unit="rows", leave=False, disable=not live,
                         mininterval=0.5)

    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        tail = self.status() if self.status is not None else ""
        return f"{self.label}: {self.done:,}/{self.total:,} rows{pct}, {self.rate():,.0f} rows/s" + (
            f"; {tail}" if tail else "")

    def advance(self, rows: int, **extra) -> None:
        self.done += rows
        if self.done > self.total:
            self.total = self.done
            self._bar.total = self.total
        self._bar.update(rows)
        if self.status is not None and not self._bar.disable:
            self._bar.set_postfix_str(self.status(), refresh=False)
        now = self.clock()
        self.history.append({"label": self.label, "elapsed_s": now - self.started, "rows_done": self.done, **extra})
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self.log(self.line())

    def close(self) -> None:
        self._bar.close()
        self.log(self.line() + f" in {self.clock() - self.started:.1f} s")

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)
