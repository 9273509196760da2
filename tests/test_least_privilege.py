"""The whole runbook as the minimal migration role the README documents, and a preflight that names every
privilege that role lacks before anything changes.

The role is made by the README's own snippet (run with psql, as an operator would), so the documentation and
the test cannot drift apart. Roles belong to the whole server: each test makes its own, with its own
application and legacy roles, and drops them at the end."""

from __future__ import annotations

import re
import subprocess
import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import ROOT, TEMPLATE_ROWS, TEMPLATE_SCALE, Db, drop_database, staging_dsn
from runbook_helpers import demo, params as params_mod
from runbook_helpers.db import server as server_mod
from runbook_helpers.db.ddl import ACCESS_EXCLUSIVE_META, Step
from runbook_helpers.db.server import EmbeddedServer
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import inspect, rollback
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.run.session import PHASES
from test_lock_ladder import wait_for_worker
from test_lock_ladder import fast_autovacuum  # noqa: F401 (a fixture)

DSN_ENV = "RUNBOOK_LEAST_PRIVILEGE_TEST_DSN"
SNIPPET_MARK = "<!-- migration-role.sql: the test runs this block as it is -->"


def migration_role_sql() -> str:
    """The README's snippet, the sql block right after its marker."""
    readme = (ROOT / "README.md").read_text()
    after = readme.split(SNIPPET_MARK, 1)[1]
    found = re.match(r"\s*```sql\n(.*?)\n```", after, re.S)
    assert found, "README.md: the migration role's sql block must follow its marker"
    return found.group(1)


class Roles:
    """A migration role and its application roles, made by the README's snippet on the test's database."""

    def __init__(self, db, folder):
        self.db, self.folder = db, folder
        tag = uuid.uuid4().hex[:8]
        self.migrator, self.owner = f"migrator_{tag}", f"owner_{tag}"
        self.app, self.legacy = f"app_{tag}", f"legacy_{tag}"
        self.all = (self.migrator, self.owner, self.app, self.legacy)

    def create(self, legacy_tables: list[str] | None = None) -> None:
        """`legacy_tables`: the snippet's optional legacy_tables (the tenant source's, with legacy.enabled)."""
        p = self.db.params
        # the demo's tables belong to app_owner, whom every test database shares: here a superuser owns them
        # first, and the snippet hands the core tables to this test's own owner role (a BYPASSRLS migration
        # role in app_owner would reach every other test's tables, and their lint would list it)
        self.db.execute("REASSIGN OWNED BY app_owner TO postgres")
        script = self.folder / "migration_role.sql"
        script.write_text(migration_role_sql() + "\n")
        out = subprocess.run(
                [str(self.db.server.tool("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                 "-v", f"migrator={self.migrator}", "-v", f"schema={p.schema_}", "-v", f"owner={self.owner}", "-v", f"app_role={self.app}",
                 "-v", f"legacy_role={self.legacy}", "-v", "core_tables={" + ",".join(p.tables) + "}",
                 *(["-v", "legacy_tables={" + ",".join(legacy_tables) + "}"] if legacy_tables else []),
                 "-f", str(script), "-d", self.db.url], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

    def params(self, monkeypatch, extra: dict | None = None) -> params_mod.Params:
        monkeypatch.setenv(DSN_ENV, staging_dsn(self.db, user=self.migrator))
        over = {"database": {"embedded": False, "dsn_env": DSN_ENV},
                "rls": {"app_role": self.app, "legacy_role": self.legacy, "bypass_roles": ["postgres"]}}
        return params_mod.override(params_mod.override(self.db.params, over), extra or {})

    def drop(self) -> None:
        """The test's database first (what the roles own or were granted there goes with it), then the roles."""
        drop_database(self.db.server, self.db.name)
        with psycopg.connect(self.db.server.url(), autocommit=True) as conn:
            for role in self.all:  # DROP OWNED: the grant on session_replication_role belongs to the server
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def roles(db, tmp_path):
    made = Roles(db, tmp_path)
    yield made
    made.drop()


def test_the_whole_runbook_as_the_minimal_migration_role(db, roles, monkeypatch):
    roles.create()
    owners = db.scalar("SELECT array_agg(DISTINCT pg_get_userbyid(relowner)) FROM pg_class WHERE relname = ANY(%s)",
                       (db.params.tables,))
    assert owners == [roles.owner]  # handed over by the snippet
    params = roles.params(monkeypatch)
    before = db.schema_dump(exclude_ledger=True)
    results = db.run(*PHASES, params=params)
    pre = results["inspect"]["preflight"].set_index("check")
    assert pre.loc["privileges of the migration role", "status"] == "ok"
    assert f"{roles.migrator} holds every privilege" in pre.loc["privileges of the migration role", "detail"]
    assert "passed" in results["validate"]["verdict"]
    # 06_finalize as the role too (forced: no application release to wait for here), then the rollback undoes it
    finalized = run_phase(db.session("finalize", params=params), force=True)
    assert len(finalized["applied"]) and set(finalized["applied"]["outcome"]) == {"applied"}, finalized["applied"]
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tenancy_rollout%%'") == 0
    assert_rolls_back(db, params, before)


def test_the_whole_runbook_as_the_minimal_migration_role_with_the_legacy_mapping(db, roles, monkeypatch):
    """With legacy.enabled 02_seed puts its signup triggers on the tenant source's tables, which the migration role
    does not own: the snippet's legacy_tables hands them to the owner role like the core tables (DROP TRIGGER, in
    06_finalize and rollback, needs the owner's privileges)."""
    roles.create(legacy_tables=["org", "user", "org_user"])
    params = roles.params(monkeypatch, {"legacy": {"enabled": True}})
    before = db.schema_dump(exclude_ledger=True)
    results = db.run(*PHASES, params=params)
    assert "passed" in results["validate"]["verdict"]
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tenancy_legacy_signup%%'") == 4
    run_phase(db.session("finalize", params=params), force=True)
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tenancy_%%'") == 0
    assert_rolls_back(db, params, before)


def test_without_the_tenant_sources_owner_preflight_says_so_and_changes_nothing(db, roles, monkeypatch):
    roles.create()
    params = roles.params(monkeypatch, {"legacy": {"enabled": True}})
    tenants = db.scalar("SELECT count(*) FROM tenants")
    with pytest.raises(RunbookError) as refused:
        db.run("inspect", "seed", params=params)
    assert "privilege: ownership of the tenant source's tables owned by postgres" in str(refused.value)
    assert "cannot alter: \"user\", org, org_user (owner postgres): 02_seed creates its signup triggers on them" \
        in str(refused.value)
    # nothing was changed: no tenant, no trigger
    assert db.scalar("SELECT count(*) FROM tenants") == tenants
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tenancy_%%'") == 0
    db.execute(f'ALTER TABLE org OWNER TO {roles.owner}; ALTER TABLE org_user OWNER TO {roles.owner}; '
               f'ALTER TABLE "user" OWNER TO {roles.owner}')  # what the DBA does, as a superuser
    db.run("inspect", "seed", params=params)
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tenancy_legacy_signup%%'") == 4


def test_a_superuser_rolls_back_what_the_minimal_role_granted(db, roles, monkeypatch):
    """The grants the role made record it as grantor (the view's SELECT, the sequences' USAGE): a superuser's
    REVOKE runs as the owner and would leave them; each is revoked as its grantor instead."""
    roles.create()
    before = db.schema_dump(exclude_ledger=True)
    db.run(*PHASES, params=roles.params(monkeypatch))
    assert_rolls_back(db, db.params, before)  # db.params: as the superuser


def assert_rolls_back(db, params, before: str) -> None:
    """99_rollback with these params (as the minimal role, unless said otherwise): every undo applied (the
    grants to the application and legacy roles revoked, whoever recorded them as grantor) and the schema,
    privileges included, as it was."""
    assert db.schema_dump(exclude_ledger=True) != before
    rb = db.session("rollback", params=params)
    try:
        applied = rollback.apply(rb)
        verdict = rollback.assert_rolled_back(rb)
    finally:
        rb.close()
    assert set(applied["outcome"]) == {"applied"}
    assert verdict == rollback.ROLLED_BACK + rollback.RETIRED
    assert db.schema_dump(exclude_ledger=True) == before


def revoke_the_four(db, roles) -> None:
    """CREATE on the schema (from the owner role too: the migration role inherits its privileges), membership
    in the core tables' owner role, membership in the application role, pg_read_all_stats."""
    m = roles.migrator
    db.execute(f'REVOKE CREATE ON SCHEMA public FROM "{m}"')
    db.execute(f'REVOKE "{roles.owner}" FROM "{m}"')
    db.execute(f'REVOKE "{roles.app}" FROM "{m}"')
    db.execute(f'REVOKE pg_read_all_stats FROM "{m}"')


def test_preflight_names_every_missing_privilege_at_once_and_changes_nothing(db, roles, monkeypatch):
    roles.create()
    revoke_the_four(db, roles)
    params = roles.params(monkeypatch)
    before = db.schema_dump()
    with pytest.raises(RunbookError) as failed:
        db.run("inspect", params=params)
    message = str(failed.value)
    m = roles.migrator
    assert "preflight failed" in message and "nothing was changed" in message
    assert "privilege: USAGE, CREATE on schema public" not in message  # USAGE is PUBLIC's
    assert "privilege: CREATE on schema public: CREATE INDEX (constrain's tenant_id indexes, composite keys) and " \
           "the tables seed creates -> " \
           f"GRANT USAGE, CREATE ON SCHEMA \"public\" TO \"{m}\"" in message
    assert f"privilege: ownership of the core tables owned by {roles.owner}: {m} cannot alter: active_workflows " \
           f"(view), decision_tables, endpoints, knowledge_bases, models, rules, templates, widgets, workflows " \
           f"(owner {roles.owner})" in message
    assert f"GRANT \"{roles.owner}\" TO \"{m}\" WITH INHERIT TRUE, SET TRUE" in message
    assert f"privilege: membership in {roles.app} WITH SET: the isolation suite acts as it (SET ROLE) -> " \
           f"GRANT \"{roles.app}\" TO \"{m}\" WITH INHERIT FALSE, SET TRUE" in message
    assert f"membership in {roles.owner}" not in message  # the ownership row's GRANT gives SET too
    assert message.count("\n  - privilege: ") == 4
    assert "privilege: pg_read_all_stats:" in message and f"-> GRANT pg_read_all_stats TO \"{m}\"" in message
    assert db.schema_dump() == before


def test_a_later_phase_stops_before_its_first_change_when_a_privilege_went_missing(db, roles, monkeypatch):
    roles.create()
    params = roles.params(monkeypatch)
    db.run("inspect", "seed", params=params)
    db.execute(f'REVOKE "{roles.owner}" FROM "{roles.migrator}"')
    before = db.schema_dump()
    with pytest.raises(RunbookError) as failed:
        db.run("backfill", params=params)
    message = str(failed.value)
    assert f"the migration role {roles.migrator} lacks privileges this run needs" in message
    assert f"ownership of the core tables owned by {roles.owner}" in message and "Nothing was changed." in message
    assert db.schema_dump() == before


PG15 = [b for b in server_mod.system_bin_dirs() if server_mod.major_version(b) == 15]


@pytest.mark.slow
@pytest.mark.pg_other
@pytest.mark.skipif(not PG15, reason="PostgreSQL 15 is not installed under /usr/lib/postgresql (Debian: "
                                     "apt-get install postgresql-15)")
def test_the_whole_runbook_as_the_minimal_migration_role_on_postgresql_15(ci_params, tmp_path, monkeypatch):
    """On 15: no WITH SET / INHERIT options, no pg_signal_autovacuum_worker. A server
    of its own (its own env folder), so it never stops the one tests/test_pg_other.py starts."""
    srv = EmbeddedServer("ci_least_privilege", PG15[0])
    srv.start()
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        demo.build(srv.url(), name, system_uuid=str(ci_params.system_tenant.uuid), rows=TEMPLATE_ROWS,
                   scale=TEMPLATE_SCALE, log=lambda *_: None)
        db = Db(srv, name, ci_params)
        roles = Roles(db, tmp_path)
        try:
            roles.create()
            params = roles.params(monkeypatch)
            before = db.schema_dump(exclude_ledger=True)
            results = db.run(*PHASES, params=params)
            pre = results["inspect"]["preflight"].set_index("check")
            assert pre.loc["privileges of the migration role", "status"] == "ok"
            row = pre.loc["may cancel a plain autovacuum in the way"]
            assert row["status"] == "warn" and "before PostgreSQL 18 only a superuser may" in row["detail"]
            assert "passed" in results["validate"]["verdict"]
            assert_rolls_back(db, params, before)
        finally:
            roles.drop()
    finally:
        srv.stop()


@pytest.mark.usefixtures("fast_autovacuum")
def test_a_role_that_may_not_cancel_autovacuum_waits_for_postgresql_to_cancel_it(db, roles, monkeypatch):
    """Without pg_signal_autovacuum_worker, pg_cancel_backend of an autovacuum worker fails with 42501, which
    failed the step; now the ladder says so and waits (a try longer than deadlock_timeout: PostgreSQL cancels
    the autovacuum itself), and preflight warns up front."""
    roles.create()
    db.execute(f'REVOKE pg_signal_autovacuum_worker FROM "{roles.migrator}"')
    params = roles.params(monkeypatch, {"locks": {"first_lock_timeout_ms": 3000, "lock_timeout_ms": 3000,
                                                  "retry": {"attempts": 2, "backoff_ms": 50, "backoff_max_ms": 100}}})
    pre = db.run("inspect", params=params)["inspect"]["preflight"].set_index("check")
    row = pre.loc["may cancel a plain autovacuum in the way"]
    assert row["status"] == "warn" and row["fix"] == f'GRANT pg_signal_autovacuum_worker TO {roles.migrator}'
    with psycopg.connect(staging_dsn(db, user=roles.migrator), autocommit=True) as conn:  # the role owns it
        slow_vacuum_table_on(conn, "av_priv")
    db.execute("DELETE FROM av_priv WHERE id % 2 = 0")
    pid, _ = wait_for_worker(db, "av_priv")
    rb = db.session("seed", params=params)
    try:
        executor = rb.executor()
        result = executor.run(Step("seed", "av_priv", "add a column", sql.SQL("ALTER TABLE av_priv ADD COLUMN probe int"),
                                   ACCESS_EXCLUSIVE_META, "catalog change only"))
    finally:
        rb.close()
    assert result.outcome == "applied"
    assert any(f"autovacuum pid {pid} is on the table and this role may not cancel it" in line
               for line in executor.cleared), executor.cleared


def slow_vacuum_table_on(conn, name: str) -> None:
    conn.execute(sql.SQL(
        "CREATE TABLE {} (id int PRIMARY KEY, pad text) WITH (autovacuum_vacuum_threshold = 0, "
        "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1)"
    ).format(sql.Identifier(name)))
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, repeat('x', 200) FROM generate_series(1, 6000) i").format(
        sql.Identifier(name)))


def test_inspect_lists_a_table_the_migration_role_may_not_read_from_its_estimate(db, roles, monkeypatch):
    """A table in neither list needs no privilege of the migration role: 01_inspect must not fail on it (issue 27)."""
    roles.create()
    db.execute("CREATE TABLE schema_migrations (version text PRIMARY KEY); "
               "INSERT INTO schema_migrations VALUES ('1'), ('2'), ('3'); ANALYZE schema_migrations")
    rb = db.session("inspect", params=roles.params(monkeypatch))
    try:
        frame = inspect.unlisted_tables(rb).set_index("table")
    finally:
        rb.close()
    assert frame.loc["schema_migrations", "counted"] == "estimate (no SELECT privilege)"
    assert frame.loc["schema_migrations", "rows"] == 3
