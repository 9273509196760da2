"""Real PostgreSQL for every test: the ci env's embedded server, and a fresh database per test.

A small demo database is built once per session as a template; each test gets its own copy
(CREATE DATABASE … TEMPLATE), so tests never see each other's changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from runbook_helpers import demo, params as params_mod
from runbook_helpers.db import roles
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.db.server import EmbeddedServer
from runbook_helpers.run.session import PHASES, PhaseSession

ROOT = Path(__file__).resolve().parents[1]
TEST_ENV = "ci"
# one template per pytest-xdist worker: workers build theirs at the same time on the one server
TEMPLATE = f"runbook_test_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
TEMPLATE_ROWS = 3000     # workflows in the per-test databases
TEMPLATE_SCALE = 0.1     # the other tables at a tenth of the demo size
# The ci params turn on row level security and composite keys (issue 5). Tests of the core steps
# (NOT NULL, FK, tenant_id index) switch them off to see those steps alone; the RLS, distribution and
# isolation tests cover the rest.
CORE_ONLY = {"rls": {"enabled": False}, "distribution": {"composite_keys": False}}
# The ci params also turn on the legacy mapping (issue 7). The tests' default params leave it off, so they
# exercise the System Tenant path every environment without the opt-in takes; tests/test_legacy_mapping.py
# switches it on (LEGACY_ON), and the CLI and nbval runs use ci.yaml as it is.
LEGACY_ON = {"legacy": {"enabled": True}}

# The longest files first: `--dist loadfile` hands whole files to the two workers one at a time as they free up,
# by default the files with the most tests first; test_runner.py (9 long tests) then started near the end and ran
# alone on one worker while the other sat idle. make test passes --no-loadscope-reorder, so this order holds.
LONGEST_FIRST = ["test_runner.py", "test_steps_killed.py", "test_step_harness.py", "test_faults.py", "test_browser.py",
                 "test_least_privilege.py", "test_any_keys.py", "test_application_keeps_working.py", "test_accounting.py", "test_constrain.py",
                 "test_backfill.py", "test_audit.py", "test_partitions_mapped.py", "test_rerun_after_rollback.py",
                 "test_partitions.py", "test_legacy_mapping.py", "test_drizzle_kit_isolation.py", "test_drizzle.py",
                 "test_readiness.py", "test_steps_shop.py", "test_distribute.py", "test_plan_formats.py", "test_plan_locks.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


os.environ.setdefault("RUNBOOK_HOME", str(ROOT))
os.environ.pop("RUNBOOK_RUN_ID", None)
os.environ["RUNBOOK_HEADLESS"] = "1"



def schema_spec(ci_params, tables: list[str], smoke_queries: list[dict], **changes) -> params_mod.Params:
    """The ci params (RLS and composite keys on) with a test schema's spec in place of the demo's: its core tables
    (replaced, not merged), no shared table, no legacy mapping, legacy role, lint acceptance or Drizzle record."""
    data = ci_params.model_dump(by_alias=True)
    data["core_tables"] = {t: {} for t in tables}
    data["shared_tables"] = []
    data["legacy"]["enabled"] = False
    data["rls"]["lint_accept"] = []
    data["rls"]["legacy_role"] = None
    data["drizzle"].update({"folder": None, "record_after_validate": [], "schema_file": None})
    data["validate"]["smoke_queries"] = smoke_queries
    return params_mod.override(params_mod.Params.model_validate(data), changes)

@pytest.fixture(scope="session")
def server() -> EmbeddedServer:
    srv = EmbeddedServer(TEST_ENV)
    srv.start()
    return srv


@pytest.fixture(scope="session")
def ci_params() -> params_mod.Params:
    return params_mod.override(params_mod.load(TEST_ENV), {"legacy": {"enabled": False}})


@pytest.fixture(scope="session")
def template(server, ci_params) -> str:
    demo.build(server.url(), TEMPLATE, system_uuid=str(ci_params.system_tenant.uuid), rows=TEMPLATE_ROWS,
               scale=TEMPLATE_SCALE, log=lambda *_: None)
    return TEMPLATE


@dataclass
class Db:
    """One test's database and shortcuts to drive the runbook against it."""
    server: EmbeddedServer
    name: str
    params: params_mod.Params

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    def connect(self, **kw) -> psycopg.Connection:
        return psycopg.connect(self.url, **kw)

    def scalar(self, query, args=None):
        with self.connect() as conn:
            return conn.execute(query, args).fetchone()[0]

    def execute(self, query, args=None) -> None:
        """As the application would: the rollout triggers see it (and record it, once backfill installed them)."""
        with self.connect(autocommit=True) as conn:
            conn.execute(query, args)

    def execute_unrecorded(self, query, args=None) -> None:
        """As one of the runbook's own sessions, which the rollout triggers skip: a change made this way is one
        the runbook made, and validate must catch it."""
        with psycopg.connect(self.url, autocommit=True, options="-c tenancy_runbook.session=runbook") as conn:
            conn.execute(query, args)

    def session(self, phase: str, *, dry_run: bool = False, params=None, run_id=None) -> PhaseSession:
        return PhaseSession(phase, dry_run=dry_run, run_id=run_id, database_name=self.name,
                            params=params or self.params, log=lambda *_: None)

    def run(self, *phases: str, dry_run: bool = False, params=None) -> dict[str, dict]:
        results = {}
        for phase in phases or PHASES:
            results[phase] = run_phase(self.session(phase, dry_run=dry_run, params=params))
        return results

    def schema_dump(self, exclude_ledger: bool = False) -> str:
        """pg_dump --schema-only of the database (the runbook's ledger schema excluded when asked)."""
        extra = ["--exclude-schema", self.params.ledger_schema] if exclude_ledger else []
        out = subprocess.run([str(self.server.tool("pg_dump")), "--schema-only", "--no-owner", *extra, "-d", self.url],
                             capture_output=True, text=True, check=True)
        return "\n".join(line for line in out.stdout.splitlines() if not line.startswith("\\restrict")
                         and not line.startswith("\\unrestrict"))


def create_role(server: EmbeddedServer, name: str, options: str = "") -> None:
    """The role, unless it exists, made as demo.build makes its roles: on the server's maintenance database under
    db/roles.ROLES_LOCK, so the test workers never create one role at once (roles are cluster-wide)."""
    with psycopg.connect(server.url()) as admin:
        roles.serialize(admin)
        if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None:
            admin.execute(sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(name)))


def create_database(server: EmbeddedServer, name: str, template: str | None) -> None:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = query + sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(query)


def drop_database(server: EmbeddedServer, name: str) -> None:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db(server, template, ci_params) -> Db:
    name = f"t_{uuid.uuid4().hex[:12]}"
    create_database(server, name, template)
    yield Db(server, name, ci_params)
    drop_database(server, name)


_MIGRATED: dict[str, str] = {}  # params, phases and schema -> this worker's migrated template database


@pytest.fixture
def migrated_db(server, template, ci_params):
    """A fresh copy of the test template migrated through `phases` with `params` (default: the tests' ci
    params). The migration runs once per worker and set of params into a template of its own; each test gets
    a CREATE DATABASE … TEMPLATE copy of it, in a fraction of the time the phases take. The copy is the same
    database in every respect the tests read: catalog, rows, ledger, triggers. With `schema` (SQL) the start is
    not the demo template but an empty database that SQL builds, as a test of another schema would."""
    made: list[str] = []

    def make(*phases: str, params=None, schema: str | None = None) -> Db:
        p = params or ci_params
        key = hashlib.sha256((p.model_dump_json() + "|" + ",".join(phases) + "|" + (schema or "")).encode()
                             ).hexdigest()[:10]
        source = _MIGRATED.get(key)
        if source is None:
            source = f"runbook_test_migrated_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{key}"
            drop_database(server, source)
            create_database(server, source, None if schema else template)
            if schema:
                with psycopg.connect(server.url(source), autocommit=True) as conn:
                    conn.execute(schema)
            if phases:  # none: the schema as built (Db.run without phases would run them all)
                Db(server, source, p).run(*phases, params=p)
            _MIGRATED[key] = source
        name = f"t_{uuid.uuid4().hex[:12]}"
        create_database(server, name, source)
        made.append(name)
        return Db(server, name, p)

    yield make
    for name in made:
        drop_database(server, name)


@pytest.fixture
def empty_db(server, ci_params) -> Db:
    name = f"e_{uuid.uuid4().hex[:12]}"
    create_database(server, name, None)
    yield Db(server, name, ci_params)
    drop_database(server, name)


STAND_IN_CITUS_CONTROL = ("comment = 'stands in for Citus: only its name in pg_extension'\n"
                          "default_version = '0'\nrelocatable = true\n")


def install_stand_in_citus(db: Db) -> None:
    """CREATE EXTENSION citus from an empty stand-in: the catalog fact (pg_extension has citus) that the runbook's
    choice of the Citus forms rests on, and nothing of Citus itself. Its control file lives outside the
    installation (extension_control_path names a directory whose extension/ holds it; PostgreSQL 18+), readable by
    the server's own OS user, and is removed once the extension exists. Skips on older servers."""
    home = Path(tempfile.mkdtemp(prefix="stand-in-citus-"))
    try:
        ext = home / "extension"
        ext.mkdir()
        (ext / "citus.control").write_text(STAND_IN_CITUS_CONTROL)
        (ext / "citus--0.sql").write_text("-- nothing: the catalog row is what the runbook reads\n")
        for path in (home, ext, *ext.iterdir()):
            path.chmod(0o755)
        with db.connect(autocommit=True) as admin:
            if admin.info.server_version < 180000:
                pytest.skip("the stand-in citus extension needs extension_control_path (PostgreSQL 18+)")
            admin.execute(sql.SQL("SET extension_control_path = {}").format(sql.Literal(f"$system:{home}")))
            admin.execute("CREATE EXTENSION citus")
    finally:
        shutil.rmtree(home)


def staging_dsn(db, user: str = "postgres", password: str | None = None) -> str:
    """The test database's URL as the staging env's DSN variable would hold it (optionally with a password)."""
    auth = f"{user}:{password}" if password else user
    return db.url.replace("postgresql://postgres@", f"postgresql://{auth}@")


def copy_home(target: Path) -> Path:
    """A copy of the checkout's params, notebooks and demo in `target`, to run the CLI with edited files
    (RUNBOOK_HOME)."""
    for folder in ("params", "notebooks", "demo"):
        shutil.copytree(ROOT / folder, target / folder)
    return target


@pytest.fixture
def home(tmp_path) -> Path:
    return copy_home(tmp_path)


def ci_home(home: Path, database: str) -> Path:
    """`home` whose ci env is `database` on the ci server (the checkout's .runbook/ linked in), so a runner or a
    kernel started with RUNBOOK_HOME=home and RUNBOOK_ENV=ci works on that database only."""
    (home / ".runbook").symlink_to(ROOT / ".runbook")
    ci = home / "params" / "ci.yaml"
    text = ci.read_text()
    assert "database:\n  embedded: true\n" in text
    ci.write_text(text.replace("database:\n  embedded: true\n", f"database:\n  embedded: true\n  name: {database}\n"))
    return home


def runbook_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The installed console script, as an operator would run it."""
    runbook = Path(sys.executable).with_name("runbook")
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([str(runbook), *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)
