"""A streaming standby of an embedded server, from the same binaries: for the replica-lag tests and benchmark.

`pg_basebackup -R` copies the primary over its Unix socket (the embedded server's defaults allow it:
wal_level replica, max_wal_senders 10, and initdb's pg_hba.conf trusts local replication connections) into
a temporary folder, and a second postmaster runs there on a socket of its own, streaming from the primary.
`cluster_name` names it in the primary's pg_stat_replication. `apply_delay(s)` sets
recovery_min_apply_delay, so a test can make replay lag on purpose, and remove it again. Under root, as
the primary, it runs as the server's own system user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import psycopg

from ..errors import RunbookError
from .server import PORT, SUPERUSER, EmbeddedServer, _allow_traverse, _run_as_server, _server_account


class Standby:
    def __init__(self, primary: EmbeddedServer, name: str = "runbook_standby"):
        self.primary, self.name, self.bin = primary, name, primary.bin
        self.root: Path | None = None
        self.account = _server_account()

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "standby.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.root}&port={PORT}"

    def _conf(self, delay_s: float = 0) -> None:
        (self.data_dir / "runbook.conf").write_text(
            "listen_addresses = ''\n"
            f"port = {PORT}\n"
            f"unix_socket_directories = '{self.root}'\n"
            "unix_socket_permissions = 0700\n"
            "max_connections = 60\n"
            f"cluster_name = '{self.name}'\n"
            "hot_standby = on\n"
            f"recovery_min_apply_delay = '{int(delay_s * 1000)}ms'\n"
            "log_line_prefix = '%m [%p] %a '\n")
        if self.account is not None:
            os.chown(self.data_dir / "runbook.conf", self.account.pw_uid, self.account.pw_gid)

    def start(self, timeout_s: float = 120) -> "Standby":
        """Base backup, start, and wait until the primary lists it as streaming."""
        self.root = Path(tempfile.mkdtemp(prefix="rb-standby-"))
        if self.account is not None:
            os.chown(self.root, self.account.pw_uid, self.account.pw_gid)
            _allow_traverse(self.root)
        primary_socket = self.primary.socket_dir()
        backup = _run_as_server(
            [str(self.primary.tool("pg_basebackup")), "-D", str(self.data_dir), "-R", "-X", "stream", "-c", "fast",
             "-d", f"host={primary_socket} port={PORT} user={SUPERUSER}"], self.account, timeout=timeout_s)
        if backup.returncode != 0:
            self.remove()
            raise RunbookError(f"pg_basebackup from {primary_socket} failed: {backup.stderr.strip()[-800:]}")
        (self.data_dir / "server.log").unlink(missing_ok=True)  # the primary's log, copied along
        self._conf()
        started = _run_as_server([str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                                  "-w", "-t", str(int(timeout_s)), "start"], self.account, timeout=timeout_s + 30)
        if started.returncode != 0:
            tail = self.log_file.read_text(errors="replace")[-1500:] if self.log_file.exists() else ""
            self.remove()
            raise RunbookError(f"the standby did not start: {started.stderr.strip() or started.stdout.strip()}\n{tail}")
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            while conn.execute("SELECT count(*) FROM pg_stat_replication WHERE application_name = %s AND state = "
                               "'streaming'", (self.name,)).fetchone()[0] == 0:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RunbookError(f"the standby {self.name} never reached streaming; see {self.log_file}")
                time.sleep(0.1)
        return self

    def apply_delay(self, seconds: float) -> None:
        """recovery_min_apply_delay: the standby receives WAL at once but replays each commit this late."""
        self._conf(seconds)
        reload = _run_as_server([str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "reload"], self.account, timeout=60)
        if reload.returncode != 0:
            raise RunbookError(f"pg_ctl reload of the standby failed: {reload.stderr.strip()}")

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            _run_as_server([str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                           self.account, timeout=120)
        self.remove()

    def remove(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "Standby":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
