"""Row level security as constrain leaves it: fail-closed policies per command, ENABLE + FORCE, a safe
application role, and the legacy role kept to the contract params declare (every tenant, or the System
Tenant's rows)."""

import psycopg
import pytest

from conftest import install_stand_in_citus
from runbook_helpers import params as params_mod
from runbook_helpers.tenancy import rls

SYSTEM = "00000000-0000-4000-8000-000000000001"


@pytest.fixture
def migrated(migrated_db):
    return migrated_db("inspect", "seed", "backfill", "constrain")


def test_every_tenant_table_has_rls_forced_and_a_fail_closed_policy_per_command(migrated):
    with migrated.connect() as conn:
        for table in migrated.params.tables:
            enabled, forced = conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = %s::regclass",
                                           (table,)).fetchone()
            assert enabled and forced, table
            policies = {r[0]: r[1:] for r in conn.execute(
                "SELECT polcmd, pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid) FROM pg_policy "
                "WHERE polrelid = %s::regclass", (table,))}
            assert set(policies) == {"r", "a", "w", "d", "*"}, table
            expr = "(tenant_id = (NULLIF(current_setting('app.current_tenant_id'::text, true), ''::text))::bigint)"
            assert policies["r"] == (expr, None) and policies["d"] == (expr, None)
            assert policies["a"] == (None, expr) and policies["w"] == (expr, expr)
            assert policies["*"] == ("true", "true")  # the legacy role's contract: every tenant
            roles = conn.execute("SELECT polroles::regrole[]::text[] FROM pg_policy WHERE polrelid = %s::regclass "
                                 "AND polname = 'tenant_legacy_access'", (table,)).fetchone()[0]
            assert roles == ["legacy_app"], table
        invoker = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'active_workflows'").fetchone()[0]
        assert "security_invoker=true" in invoker


def test_the_application_role_is_safe(migrated):
    with migrated.connect() as conn:
        row = conn.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'app_user'").fetchone()
        assert row == (False, False)
        for table in migrated.params.tables:
            privileges = conn.execute(
                "SELECT has_table_privilege('app_user', %s, 'SELECT'), has_table_privilege('app_user', %s, 'INSERT'), "
                "has_table_privilege('app_user', %s, 'TRUNCATE'), has_table_privilege('app_user', %s, 'REFERENCES')",
                (table,) * 4).fetchone()
            assert privileges == (True, True, False, False), table
    rb = migrated.session("validate")
    try:
        with rb.engine.connect() as conn:
            assert rls.role_problems(conn, "public", "app_user", migrated.params.tables) == []
            migrated.execute("GRANT TRUNCATE ON rules TO app_user")
            assert rls.role_problems(conn, "public", "app_user", migrated.params.tables) == [
                "app_user may TRUNCATE rules (TRUNCATE ignores row level security)"]
    finally:
        migrated.execute("REVOKE TRUNCATE ON rules FROM app_user")
        rb.close()


def test_the_application_works_once_it_sets_the_tenant(migrated):
    system = migrated.scalar("SELECT id FROM tenants WHERE uuid = %s", (SYSTEM,))
    total = migrated.scalar("SELECT count(*) FROM templates")
    with migrated.connect() as conn:
        conn.execute("SET ROLE app_user")
        assert conn.execute("SELECT count(*) FROM templates").fetchone()[0] == 0  # no tenant: nothing
        conn.rollback()
        conn.execute("SET ROLE app_user")
        rls.set_tenant(conn, system)
        assert conn.execute("SELECT count(*) FROM templates").fetchone()[0] == total
        # an insert that omits tenant_id: the rollout trigger gives the System Tenant, the policy accepts it
        conn.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'legacy', 'x')")
        conn.execute("UPDATE templates SET name = 'legacy!' WHERE name = 'legacy'")
        conn.commit()
    assert migrated.scalar("SELECT tenant_id FROM templates WHERE name = 'legacy!'") == system


def test_set_tenant_binds_the_value(migrated):
    with migrated.connect() as conn:
        rls.set_tenant(conn, 42)
        assert conn.execute("SELECT current_setting('app.current_tenant_id')").fetchone()[0] == "42"
        with pytest.raises(ValueError):
            rls.set_tenant(conn, "1; DROP TABLE rules")
        conn.rollback()
        assert conn.execute("SELECT current_setting('app.current_tenant_id', true)").fetchone()[0] == ""


@pytest.mark.parametrize("attempt", ["1; DROP TABLE rules", "1' OR '1'='1", "42; RESET ROLE", "1 OR 1=1", 3.5, True,
                                     2 ** 63, "", [1]])
def test_set_tenant_refuses_what_is_not_an_integer_before_sending_anything(migrated, attempt):
    """SET LOCAL cannot take a bound parameter: set_tenant checks the id is a bigint before it quotes it."""
    with migrated.connect() as conn:
        rls.set_tenant(conn, 7)
        with pytest.raises(ValueError, match="tenant id"):
            rls.set_tenant(conn, attempt)
        assert conn.execute("SELECT current_setting('app.current_tenant_id'), current_user, "
                            "to_regclass('rules') IS NOT NULL").fetchone() == ("7", "postgres", True)


def test_the_setting_statement_quotes_any_text_as_one_literal(migrated):
    """The suite sends garbage on purpose ('abc', '1 OR 1=1'): whatever the text, it arrives as the setting's value,
    never as SQL (psycopg.sql.Literal, not spliced text)."""
    hostile = "1'; DROP TABLE rules; SELECT '"
    with migrated.connect() as conn:
        for statement in rls.tenant_setting_statements("app.current_tenant_id", hostile, citus=False):
            assert statement.as_string(conn).startswith('SET LOCAL "app"."current_tenant_id" = ')
            conn.execute(statement)
        assert conn.execute("SELECT current_setting('app.current_tenant_id')").fetchone()[0] == hostile
        conn.rollback()
    assert migrated.scalar("SELECT to_regclass('rules') IS NOT NULL")


def test_the_citus_form_runs_on_plain_postgresql_and_isolation_holds(migrated):
    """What set_tenant sends where the catalog shows Citus: SET LOCAL citus.propagate_set_commands = 'local', then
    SET LOCAL of the tenant. On plain PostgreSQL citus.* is an unknown placeholder: it is accepted as a custom
    setting for the transaction, and the tenant's SET LOCAL isolates as set_config did."""
    system = migrated.scalar("SELECT id FROM tenants WHERE uuid = %s", (SYSTEM,))
    other = migrated.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'citus form') RETURNING id")
    migrated.execute("UPDATE templates SET tenant_id = %s WHERE id <= 3", (other,))
    total = migrated.scalar("SELECT count(*) FROM templates")
    with migrated.connect() as conn:
        conn.execute("SET LOCAL ROLE app_user")
        for statement in rls.tenant_setting_statements("app.current_tenant_id", str(other), citus=True):
            conn.execute(statement)
        assert conn.execute("SELECT current_setting('citus.propagate_set_commands'), "
                            "current_setting('app.current_tenant_id')").fetchone() == ("local", str(other))
        assert conn.execute("SELECT count(*), min(tenant_id), max(tenant_id) FROM templates").fetchone() == (
            3, other, other)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # another tenant's row: refused by the policy
            conn.execute("INSERT INTO templates (uuid, name, category, tenant_id) "
                         "VALUES (gen_random_uuid(), 'x', 'x', %s)", (system,))
        conn.rollback()
        conn.execute("SET LOCAL ROLE app_user")
        for statement in rls.tenant_setting_statements("app.current_tenant_id", str(system), citus=True):
            conn.execute(statement)
        assert conn.execute("SELECT count(*) FROM templates").fetchone()[0] == total - 3
        conn.commit()
        # SET LOCAL ends with its transaction: a reused connection sees nothing, and Citus' setting is gone too
        conn.execute("SET LOCAL ROLE app_user")
        assert conn.execute("SELECT count(*), current_setting('citus.propagate_set_commands', true) "
                            "FROM templates").fetchone() == (0, "")
        assert rls.has_citus(conn) is False


def test_the_form_follows_the_catalog_fact_alone(migrated):
    """set_tenant picks the Citus form from pg_extension alone: the same database, once an extension named citus is
    in its catalog (an empty stand-in, from a control file outside the installation: extension_control_path,
    PostgreSQL 18+), gets SET LOCAL citus.propagate_set_commands = 'local' first. Detected once per connection."""
    with migrated.connect() as conn:
        rls.set_tenant(conn, 5)
        assert conn.execute("SELECT current_setting('citus.propagate_set_commands', true)").fetchone()[0] is None
        conn.rollback()
        assert rls.has_citus(conn) is False
    install_stand_in_citus(migrated)
    with migrated.connect() as conn:
        assert rls.has_citus(conn) is True
        rls.set_tenant(conn, 5)
        assert conn.execute("SELECT current_setting('citus.propagate_set_commands'), "
                            "current_setting('app.current_tenant_id')").fetchone() == ("local", "5")
        conn.rollback()
        conn.execute("SET LOCAL ROLE app_user")
        rls.set_tenant(conn, migrated.scalar("SELECT id FROM tenants WHERE uuid = %s", (SYSTEM,)))
        assert conn.execute("SELECT count(*) FROM templates").fetchone()[0] == migrated.scalar(
            "SELECT count(*) FROM templates")


def legacy_counts(db, role: str) -> tuple[int, int]:
    """What the legacy role, logged in, sees of knowledge_bases, and the tenant its insert without tenant_id gets."""
    with psycopg.connect(db.url.replace("postgresql://postgres@", f"postgresql://{role}@"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user, current_setting('app.current_tenant_id', true)").fetchone() == (
            role, None)  # no role setting: the contract is a policy
        seen = conn.execute("SELECT count(*) FROM knowledge_bases").fetchone()[0]
        conn.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'old app', 'x')")
    return seen, db.scalar("SELECT tenant_id FROM templates WHERE name = 'old app'")


def test_the_legacy_role_sees_every_tenant_by_its_contract(migrated):
    system = migrated.scalar("SELECT id FROM tenants WHERE uuid = %s", (SYSTEM,))
    other = migrated.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'another') RETURNING id")
    migrated.execute("UPDATE knowledge_bases SET tenant_id = %s WHERE id <= 10", (other,))
    assert legacy_counts(migrated, "legacy_app") == (migrated.scalar("SELECT count(*) FROM knowledge_bases"), system)


def test_a_legacy_role_limited_to_the_system_tenant_sees_only_its_rows(db):
    params = params_mod.override(db.params, {"rls": {"legacy_access": "system_tenant"}})
    db.run("inspect", "seed", "backfill", params=params)
    other = db.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'another') RETURNING id")
    db.execute("UPDATE knowledge_bases SET tenant_id = %s WHERE id <= 10", (other,))
    db.run("constrain", params=params)
    system = db.scalar("SELECT id FROM tenants WHERE uuid = %s", (SYSTEM,))
    total = db.scalar("SELECT count(*) FROM knowledge_bases")
    assert legacy_counts(db, "legacy_app") == (total - 10, system)


def test_the_application_role_reads_a_security_invoker_view_as_its_tenant(migrated):
    """The views constrain makes security_invoker get SELECT for the application role: read with a tenant set,
    a view shows that tenant's rows only; without one, none. Rollback revokes the grant."""
    other = migrated.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'view reader') RETURNING id")
    migrated.execute("INSERT INTO workflows (uuid, org_id, name, status, tenant_id) SELECT gen_random_uuid(), "
                     "NULL, 'view probe ' || i, 'active', %s FROM generate_series(1, 3) i", (other,))
    with migrated.connect() as conn:
        per_tenant = dict(conn.execute(
            "SELECT tenant_id, count(*) FROM workflows WHERE status = 'active' GROUP BY 1").fetchall())
    assert len(per_tenant) > 1 and per_tenant[other] == 3
    with migrated.connect() as conn:
        for tenant, rows in per_tenant.items():
            conn.execute("SET LOCAL ROLE app_user")
            rls.set_tenant(conn, tenant)
            assert conn.execute("SELECT count(*) FROM active_workflows").fetchone()[0] == rows
            assert conn.execute("SELECT count(*) FROM active_workflows a JOIN workflows w USING (id) "
                                "WHERE w.tenant_id <> %s", (tenant,)).fetchone()[0] == 0
            conn.rollback()
        conn.execute("SET LOCAL ROLE app_user")
        assert conn.execute("SELECT count(*) FROM active_workflows").fetchone()[0] == 0
    from runbook_helpers.phases import rollback
    migrated.execute("DELETE FROM workflows WHERE tenant_id = %s", (other,))
    rb = migrated.session("rollback")
    try:
        rollback.apply(rb, force=True)
    finally:
        rb.close()
    assert not migrated.scalar("SELECT has_table_privilege('app_user', 'active_workflows', 'SELECT')")
