"""The runner as a real process of its own, without paying its imports at every start.

The fault tests SIGKILL a runner process, so it has to be a process of its own; started with `python -c` it
spends seconds importing pandas, SQLAlchemy and the runbook before its first statement, twice per test.
Here multiprocessing's forkserver imports them once per test worker, and every run is a fresh fork of that
warm process: its own pid, environment, working directory, stdout and stderr, killed and waited for like a
subprocess (a SIGKILLed run's returncode is -9, as subprocess.Popen reports it).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["warm_worker", "runbook_helpers.params", "runbook_helpers.phases.headless", "runbook_helpers.run.session"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def _run(code: str, argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the fork: the environment, folder and output files a `python -c code *argv` would have, then code."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = ["-c", *argv]
    exec(compile(code, "<worker>", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    sys.stderr.flush()


class WarmProcess:
    """What the tests use of subprocess.Popen (text mode): pid, poll, send_signal, kill, wait, communicate,
    returncode."""

    def __init__(self, code: str, argv: list[str], env: dict[str, str], cwd: Path | str):
        self._folder = tempfile.TemporaryDirectory(prefix="warm_worker_")
        self._out = os.path.join(self._folder.name, "stdout")
        self._err = os.path.join(self._folder.name, "stderr")
        Path(self._out).touch()
        Path(self._err).touch()
        self._process = _context.Process(target=_run, args=(code, list(argv), dict(env), str(cwd), self._out,
                                                            self._err), daemon=False)
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._process.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("warm worker", timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return Path(self._out).read_text(errors="replace"), Path(self._err).read_text(errors="replace")


def popen(code: str, argv: list[str], env: dict[str, str], cwd: Path | str) -> WarmProcess:
    """Like subprocess.Popen([sys.executable, "-c", code, *argv], env=env, cwd=cwd, text=True, stdout=PIPE,
    stderr=PIPE), forked from the warm process."""
    return WarmProcess(code, argv, env, cwd)
