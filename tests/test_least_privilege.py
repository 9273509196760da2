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

from conftest import ROOT, drop_database, staging_dsn
from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.run.session import PHASES

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

    def create(self) -> None:
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
    results = db.run(*PHASES, params=params)
    pre = results["inspect"]["preflight"].set_index("check")
    assert pre.loc["privileges of the migration role", "status"] == "ok"
    assert f"{roles.migrator} holds every privilege" in pre.loc["privileges of the migration role", "detail"]
    assert "passed" in results["validate"]["verdict"]


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
