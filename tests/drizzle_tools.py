"""The real Drizzle tools for the tests: drizzle-kit, drizzle-orm and pg, pinned by demo/app's lock file.

They are installed once into a cache folder outside the checkout ($RUNBOOK_NODE_CACHE, else
~/.cache/tenancy-runbook/node/<lock hash>) with `npm ci`, and used offline afterwards. Without node and npm
the tests fail, saying how to install them; they never skip silently.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "demo" / "app"
INSTALL_HINT = ("the Drizzle tests run the real drizzle-kit and drizzle-orm, which need Node.js 20+ with npm: "
                "install them (Debian: apt-get install nodejs npm; or https://nodejs.org) and run make test again")


def _cache() -> Path:
    lock = hashlib.sha256((APP / "package-lock.json").read_bytes()).hexdigest()[:12]
    base = Path(os.environ.get("RUNBOOK_NODE_CACHE") or Path.home() / ".cache" / "tenancy-runbook" / "node")
    return base / lock


def node_modules() -> Path:
    """The pinned packages, installed on first use (one installer at a time across test workers)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: {INSTALL_HINT}")
    folder = _cache()
    done = folder / "node_modules" / ".runbook-installed"
    if done.exists():
        return folder / "node_modules"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            for name in ("package.json", "package-lock.json"):
                shutil.copy(APP / name, folder / name)
            result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=folder,
                                    capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                pytest.fail(f"npm ci of demo/app's pinned packages failed (a registry out of reach?): "
                            f"{result.stderr[-1500:]}\n{INSTALL_HINT}")
            done.write_text("ok\n")
    return folder / "node_modules"


class App:
    """A copy of the demo application (its schema, config and migrations) with the pinned tools."""

    def __init__(self, folder: Path, database_url: str):
        self.folder, self.url = folder, database_url
        for name in ("src", "drizzle"):
            shutil.copytree(APP / name, folder / name)
        for name in ("drizzle.config.ts", "package.json"):
            shutil.copy(APP / name, folder / name)
        (folder / "node_modules").symlink_to(node_modules())

    @property
    def schema(self) -> Path:
        return self.folder / "src" / "schema.ts"

    def journal(self) -> list[str]:
        return [e["tag"] for e in json.loads((self.folder / "drizzle" / "meta" / "_journal.json").read_text())["entries"]]

    def env(self) -> dict[str, str]:
        return dict(os.environ, DATABASE_URL=self.url, FORCE_COLOR="0", NO_COLOR="1")

    def kit(self, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.folder / "node_modules" / ".bin" / "drizzle-kit"), *args], cwd=self.folder,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)

    def generate(self, name: str) -> list[str]:
        """`drizzle-kit generate --name NAME`: the tags it added to the journal (none when nothing changed)."""
        before = self.journal()
        result = self.kit("generate", "--name", name)
        assert result.returncode == 0, result.stdout + result.stderr
        return [t for t in self.journal() if t not in before]

    def migrate(self) -> subprocess.CompletedProcess:
        return self.kit("migrate")

    def push(self) -> list[str]:
        """`drizzle-kit push` (strict and verbose, from drizzle.config.ts) in a pseudo-terminal, never applied:
        data-loss questions get their default answer (keep the rows), the final confirmation is aborted. Returns
        the statements it would have run ([] for "No changes detected")."""
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(self.folder)
            os.execve(str(self.folder / "node_modules" / ".bin" / "drizzle-kit"),
                      ["drizzle-kit", "push"], self.env())
        raw, answered, deadline = b"", 0, time.monotonic() + 180
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.3)
                if not ready:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                raw += chunk
                text = _plain(raw)
                if "abort" in text[-400:]:
                    break  # the final "No, abort / Yes, …": never answered
                questions = text.count("truncate the table") + text.count("Yes, ")
                if questions > answered and "❯" in text[-300:]:
                    time.sleep(0.2)
                    os.write(fd, b"\r")  # the first choice: keep the rows
                    answered = questions
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            os.close(fd)
        text = _plain(raw)
        if "No changes detected" in text:
            return []
        assert "You are about to execute" in text, f"drizzle-kit push said neither: {text[-3000:]}"
        body = text.split("You are about to execute current statements:", 1)[1]
        return [s.strip() for s in re.findall(r"^((?:ALTER|CREATE|DROP|COMMENT|GRANT|REVOKE|TRUNCATE)\b.*?;)\s*$",
                                               body, flags=re.M)]

    def run_ts(self, script: str, extra_env: dict[str, str]) -> dict:
        """A TypeScript file in src/, with the pinned tsx; its last line of output is JSON."""
        result = subprocess.run([str(self.folder / "node_modules" / ".bin" / "tsx"), f"src/{script}"],
                                cwd=self.folder, env={**self.env(), **extra_env}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])


def _plain(raw: bytes) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", raw.decode(errors="replace"))


def phantoms(statements: list[str], definitions: dict[tuple[str, str], str]) -> list[str]:
    """drizzle-kit 0.31's re-creation of an unchanged key: it reads the columns of composite primary and
    unique keys back in another order than they have (upstream drizzle-orm #6078, #2888, open), and proposes
    to drop and re-add the same key. Such a drop/add pair is a phantom when the key it adds has the columns
    the database's key has, as a set, and the same kind. `definitions`: (table, constraint) -> its definition."""
    out = []
    for add in statements:
        m = re.match(r'ALTER TABLE "(\w+)" ADD CONSTRAINT "(\w+)" (PRIMARY KEY|UNIQUE)\(([^)]*)\);$', add)
        if m is None:
            continue
        table, name, kind, cols = m.groups()
        drop = f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}";'
        have = definitions.get((table, name), "")
        have_cols = re.search(r"\(([^)]*)\)", have)
        if drop in statements and have.startswith(kind) and have_cols and \
                {c.strip(' "') for c in have_cols.group(1).split(",")} == {c.strip(' "') for c in cols.split(",")}:
            out += [drop, add]
    return out


# --- the hand-over, proven with drizzle-kit and drizzle-orm --------------------------------------------

CONFIGURATIONS = {
    "system tenant only": {"legacy": {"enabled": False}, "rls": {"enabled": False},
                           "distribution": {"composite_keys": False}},
    "legacy mapping": {"legacy": {"enabled": True}, "rls": {"enabled": False},
                       "distribution": {"composite_keys": False}},
    "composite keys on": {"legacy": {"enabled": True}, "rls": {"enabled": False},
                          "distribution": {"composite_keys": True}},
    # row level security needs the composite keys beside it: without them a tenant can point a child row at
    # another tenant's parent (referential checks bypass RLS), and validate's lint and isolation suite fail
    "rls on": {"legacy": {"enabled": True}, "rls": {"enabled": True}, "distribution": {"composite_keys": True}},
}
LATER_COLUMN = '  archivedAt: timestamp("archived_at", { withTimezone: true, mode: "string" }),\n'


def key_definitions(db) -> dict[tuple[str, str], str]:
    with db.connect() as conn:
        return {(t, n): d for t, n, d in conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace AND contype IN ('p', 'u')")}


def hand_over_cycle(db, folder: Path, config: str) -> dict:
    """The runbook in one configuration, then the application team's side with the real tools: push with
    0001's schema (what drizzle-kit wanted before the hand-over), the hand-over applied to schema.ts,
    generate and record, generate again, push, migrate, a later change, and drizzle-orm as the application
    role and as the legacy role. Returns what each step saw."""
    from runbook_helpers import drizzle, drizzle_schema, params as params_mod

    out: dict = {}
    p = params_mod.override(db.params, {**CONFIGURATIONS[config], "drizzle": {"folder": str(folder / "drizzle")}})
    app = App(folder, db.url)
    db.run("inspect", "seed", "backfill", "constrain", "validate", params=p)
    definitions = key_definitions(db)
    wanted = app.push()
    out["before"] = [s for s in wanted if s not in phantoms(wanted, definitions)]
    with db.session("validate", params=p) as rb:
        handover = drizzle_schema.build(rb)
    app.schema.write_text(drizzle_schema.apply(app.schema.read_text(), handover))
    out["end state migration"] = app.generate("tenancy_end_state")
    with db.session("validate", params=p) as rb:
        out["recorded"] = drizzle.record(rb, drizzle.record_plan(rb, out["end state migration"]))
    out["generate again"] = app.generate("nothing")
    wanted = app.push()
    out["phantoms"] = phantoms(wanted, definitions)
    out["after"] = [s for s in wanted if s not in out["phantoms"]]
    rows = db.scalar("SELECT count(*) FROM drizzle.__drizzle_migrations")
    migrated = app.migrate()
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    out["migrate ran"] = db.scalar("SELECT count(*) FROM drizzle.__drizzle_migrations") - rows
    source = app.schema.read_text()
    at = source.index("}, (t) => [", source.index('pgTable("workflows"'))
    app.schema.write_text(source[:at] + LATER_COLUMN + source[at:])
    out["later migration"] = app.generate("archived_at")
    out["later sql"] = [(folder / "drizzle" / f"{t}.sql").read_text() for t in out["later migration"]]
    migrated = app.migrate()
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    out["later migrate ran"] = db.scalar("SELECT count(*) FROM drizzle.__drizzle_migrations") - rows
    out["archived_at exists"] = db.scalar("SELECT count(*) FROM pg_attribute WHERE attrelid = 'workflows'::regclass "
                                          "AND attname = 'archived_at'") == 1
    org = 3
    tenant = db.scalar("SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = %s", (org,)) \
        if p.legacy.enabled else db.scalar("SELECT id FROM tenants WHERE uuid = %s", (str(p.system_tenant.uuid),))
    out["tenant"] = tenant
    out["tenant rows"] = db.scalar("SELECT count(*) FROM workflows WHERE tenant_id = %s", (tenant,))
    out["total rows"] = db.scalar("SELECT count(*) FROM workflows")
    if p.rls.enabled:
        out["as application role"] = app.run_ts("tenant-check.ts", {"APP_ROLE": p.rls.app_role,
                                                                    "TENANT_ID": str(tenant), "ORG_ID": str(org)})
    out["rows before the legacy role"] = db.scalar("SELECT count(*) FROM workflows")
    out["as legacy role"] = app.run_ts("tenant-check.ts", {"APP_ROLE": "legacy_app", "ORG_ID": str(org)})
    return out
