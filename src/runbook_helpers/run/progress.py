"""Progress for long work: a live bar for people in a notebook, milestone lines that survive archives.

Whoever starts the kernel (JupyterLab, `runbook run`, `papermill` by hand, nbval) gets the same two things:
- in a Jupyter kernel, one HTML bar, shown once and then updated in place through its display id (JupyterLab
  redraws it; papermill and nbclient replace the stored output, so the output notebook keeps exactly one, its
  last state). Its plain-text form is the milestone line, for frontends that cannot show HTML. Outside a
  Jupyter kernel (a terminal, the CLI, tests in-process) there is no bar.
- milestone lines such as `backfill knowledge_bases: 4,000/8,000 rows (50%), 12,345 rows/s`, on stdout every few
  seconds and at the end.
Nothing goes to stderr: in JupyterLab and in the archived HTML stderr is the pink box that means trouble.
Every batch is also kept as a history row, which the backfill chart draws. A `status` callable (the backfill
throttle's) appends what paces the work to each line and to the bar: the canary's p99 against the budget, the
batch size and pause chosen, the replicas' lag.
"""

from __future__ import annotations

import html
import time
import uuid
from typing import Callable

import pandas as pd

REDRAW_S = 0.5  # the bar's redraws at most this often: each one is a message to the frontend


def in_jupyter_kernel() -> bool:
    """True in a kernel a Jupyter frontend or papermill talks to (ipykernel's shell), whoever started it."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class Bar:
    """One HTML progress bar, updated in place through its display id."""

    def __init__(self):
        from IPython.display import display
        self._display_id = f"progress-{uuid.uuid4().hex}"
        self._handle = None
        self._display = display

    def show(self, label: str, done: int, total: int, text: str, finished: bool = False) -> None:
        share = 1.0 if total <= 0 else min(1.0, done / total)
        colour = "#2ca02c" if finished else "#1f77b4"
        bundle = {
            "text/plain": text,
            "text/html": (
                f'<div style="font-family: monospace; font-size: 12px; margin: 2px 0">'
                f'<progress value="{share * 100:.1f}" max="100" style="width: 18em; accent-color: {colour}; '
                f'vertical-align: middle"></progress> {html.escape(text)}</div>'),
        }
        if self._handle is None:
            self._handle = self._display(bundle, raw=True, display_id=self._display_id)
        else:
            self._handle.update(bundle, raw=True)


class Progress:
    def __init__(self, label: str, total: int, *, every_s: float = 5.0, live: bool | None = None,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic):
        """`live`: show the bar (default: in a Jupyter kernel)."""
        self.label = label
        self.total = max(0, int(total))
        self.done = 0
        self.every_s = every_s
        self.log = log
        self.clock = clock
        self.started = clock()
        self._last_line = self.started
        self._last_draw = float("-inf")
        self.history: list[dict] = []
        self.status: Callable[[], str] | None = None
        self._bar = Bar() if (in_jupyter_kernel() if live is None else live) else None
        self._draw()

    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        tail = self.status() if self.status is not None else ""
        return f"{self.label}: {self.done:,}/{self.total:,} rows{pct}, {self.rate():,.0f} rows/s" + (
            f"; {tail}" if tail else "")

    def _draw(self, text: str | None = None, finished: bool = False) -> None:
        if self._bar is None:
            return
        self._last_draw = self.clock()
        self._bar.show(self.label, self.done, self.total, text or self.line(), finished)

    def advance(self, rows: int, **extra) -> None:
        self.done += rows
        if self.done > self.total:
            self.total = self.done
        now = self.clock()
        self.history.append({"label": self.label, "elapsed_s": now - self.started, "rows_done": self.done, **extra})
        if now - self._last_draw >= REDRAW_S:
            self._draw()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self.log(self.line())

    def close(self) -> None:
        seconds = self.clock() - self.started
        self._draw(f"{self.label}: done, {self.done:,} rows in {seconds:.1f} s", finished=True)
        self.log(self.line() + f" in {seconds:.1f} s")

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)
