"""Failpoints: named places where a fault-injection test can make the runbook die or stall.

RUNBOOK_FAULT="<point>[=<detail glob>][#<nth>][@<action>]" triggers at the nth time (default the first)
the process passes <point> with a detail matching the glob. Actions:
  kill          SIGKILL this process at once (the default): a power cut, an OOM kill, kill -9
  kill-after:S  SIGKILL it S seconds later, while the statement that follows is running on the server
  hang          write $RUNBOOK_FAULT_MARKER (if set) and sleep, so the test can act (restart the server)
  pause         write $RUNBOOK_FAULT_MARKER and wait until the test deletes it, then carry on (so the test can
                set up a blocker for the statement that follows, and kill the process while it waits)
  sql           run $RUNBOOK_FAULT_SQL on the connection the point passes (backfill.mid_batch: inside the
                batch's own transaction), e.g. to corrupt a row as a runbook bug would
Unset, a failpoint costs one dictionary lookup. Points: backfill.before_batch, backfill.mid_batch (inside
the batch's transaction, after its UPDATE), backfill.after_batch, backfill.after_table,
ddl.before_step and ddl.after_step (detail: the step's action), inspect.after_tenant_values (detail: the
table whose tenant_id values of before were just recorded), and step.done: after every step a phase commits,
whatever its kind (a statement of the Executor, one batch of the backfill; detail: "phase: table: action" for a
statement, "backfill: table: batch" for a batch), so "step.done#7@kill" kills a run right after its 7th step.

Between steps (watch_steps): a function called at every step.done, in the process that runs the phase, before
the next step begins. The step harness (tests/step_harness.py) checks the application's contract there, and
raises there to stop a phase right after a given step; anything that must hold between any two steps of any
phase can be asserted through it, and a new step is covered the day it is added.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_hits: dict[str, int] = {}
_watchers: list[Callable[[str], None]] = []
_watch_lock = threading.Lock()


@contextmanager
def watch_steps(watcher: Callable[[str], None]) -> Iterator[None]:
    """Call `watcher(detail)` after every step any phase commits in this process, while the block runs. Calls are
    serialized (a backfill's parallel workers finish batches at the same time); what the watcher raises stops
    the phase there, as a kill right after that step would (its finally blocks still run)."""
    _watchers.append(watcher)
    try:
        yield
    finally:
        _watchers.remove(watcher)


def step_done(detail: str) -> None:
    """One step of a phase has committed (see the module's docstring): the watchers, then the failpoint."""
    if _watchers:
        with _watch_lock:
            for watcher in list(_watchers):
                watcher(detail)
    point("step.done", detail)


def point(name: str, detail: str = "", conn=None) -> None:
    spec = os.environ.get("RUNBOOK_FAULT")
    if not spec:
        return
    target, _, action = spec.partition("@")
    target, _, nth = target.partition("#")
    target, _, pattern = target.partition("=")
    if target != name or (pattern and not fnmatch.fnmatchcase(detail, pattern)):
        return
    _hits[spec] = _hits.get(spec, 0) + 1
    if _hits[spec] != int(nth or 1):
        return
    action = action or "kill"
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("kill-after:"):
        delay = float(action.split(":", 1)[1])
        threading.Timer(delay, os.kill, args=(os.getpid(), signal.SIGKILL)).start()
    elif action == "sql":
        statement = os.environ["RUNBOOK_FAULT_SQL"]
        (conn.exec_driver_sql if hasattr(conn, "exec_driver_sql") else conn.execute)(statement)
    elif action in ("hang", "pause"):
        marker = os.environ.get("RUNBOOK_FAULT_MARKER")
        if marker:
            Path(marker).write_text(f"{name} {detail}\n")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if action == "pause" and marker and not Path(marker).exists():
                return
            time.sleep(0.05)
