"""A kernel never starts another statement once the `runbook run` that started it is gone.

The runner puts its pid in $RUNBOOK_RUNNER_PID for its kernels. A kernel's phase session arms the death signal
(Linux: PR_SET_PDEATHSIG, SIGKILL): the kernel dies with its runner at once, and the server ends whatever
statement it had running (client_connection_check_interval). Where there is no such signal, or the kernel is not
the runner's own child, runner_alive_or_stop() before each step and each batch ends the kernel before it starts
another statement. A SIGKILLed runner otherwise left its kernel finishing the phase alone: one kernel finished
VALIDATE and started CREATE INDEX CONCURRENTLY 0.8 s after its runner was gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

RUNNER_PID = "RUNBOOK_RUNNER_PID"
PR_SET_PDEATHSIG = 1
STOPPED = 75  # the kernel's exit status when it stopped itself (EX_TEMPFAIL: the re-run resumes)
_parent: dict[str, int] = {}  # the runner's pid, when it was this process's parent at arm()


def runner_pid() -> int | None:
    value = os.environ.get(RUNNER_PID, "")
    return int(value) if value.isdigit() else None


def arm() -> None:
    """In a kernel of a run: die with the runner (its parent). Stops at once if it is already gone."""
    pid = runner_pid()
    if pid is None:
        return
    if os.getppid() == pid:
        _parent["pid"] = pid
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            except (OSError, AttributeError):  # no prctl: the checks between steps still stop it
                pass
    runner_alive_or_stop("the phase")  # the runner may have died before the signal was armed


def runner_alive() -> bool:
    pid = runner_pid()
    if pid is None:
        return True
    if _parent.get("pid") == pid:
        return os.getppid() == pid  # re-parented: the runner died (a dead parent may linger as a zombie)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runner_alive_or_stop(what: str) -> None:
    """Before `what` (a step, a batch) starts: end this process if its runner is gone. Nothing is half done:
    every step and batch is atomic, and the re-run resumes."""
    if runner_alive():
        return
    sys.stderr.write(f"runbook: the runner (pid {runner_pid()}) is gone; this kernel stops before {what}\n")
    sys.stderr.flush()
    os._exit(STOPPED)
