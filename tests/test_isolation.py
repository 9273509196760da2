"""The isolation suite: every case passes on the migrated demo, leaves nothing behind, and each case turns
red when the protection it relies on is removed."""

import pytest

from runbook_helpers import params as params_mod
from runbook_helpers.phases import validate

PROBE_SETTING = "app.current_tenant_id"


@pytest.fixture
def migrated(migrated_db):
    db = migrated_db("inspect", "seed", "backfill", "constrain")
    assert db.params.rls.enabled and db.params.distribution.composite_keys, "ci params enable RLS and composite keys"
    return db


def suite(db, params=None):
    with db.session("validate", params=params) as rb:
        return validate.isolation_suite(rb)


def failing(frame):
    return {(r.case, r.table) for r in frame[~frame["passed"]].itertuples()}


def test_every_case_passes_and_covers_the_attacks(migrated):
    results = suite(migrated)
    assert results["passed"].all(), results[~results["passed"]].to_dict("records")
    cases = set(results["case"])
    for expected in ("setting never set in this session", "setting empty", "setting garbage 'abc'",
                     "setting garbage '1 OR 1=1'", "setting '-1'", "setting an id that does not exist",
                     "setting reverted after SET LOCAL", "cross-tenant SELECT by key", "cross-tenant UPDATE by key",
                     "cross-tenant DELETE by key", "INSERT with another tenant's id",
                     "UPDATE moving a row to another tenant", "INSERT … ON CONFLICT DO UPDATE onto another tenant's key",
                     "pooled connection reused after a tenant's transaction", "COPY … TO exports only the tenant's rows",
                     "child row referencing another tenant's parent", "System Tenant rows not writable by a tenant",
                     "table owner isolated too (FORCE)", "negative control: owner without FORCE sees both tenants' rows"):
        assert expected in cases, expected
    per_table = results[results["case"] == "tenant sees exactly its own rows"]["table"].tolist()
    assert per_table == migrated.params.tables


def test_the_suite_leaves_nothing_behind(migrated):
    tables = migrated.params.tables + ["tenants"]
    before = {t: migrated.scalar(f"SELECT count(*) FROM {t}") for t in tables}
    suite(migrated)
    assert {t: migrated.scalar(f"SELECT count(*) FROM {t}") for t in tables} == before
    assert migrated.scalar("SELECT count(*) FROM tenants WHERE name LIKE 'isolation probe%'") == 0


def test_without_force_the_owner_case_goes_red(migrated):
    migrated.execute("ALTER TABLE workflows NO FORCE ROW LEVEL SECURITY")
    assert failing(suite(migrated)) == {("table owner isolated too (FORCE)", "workflows")}


def test_a_fail_open_policy_goes_red(migrated):
    migrated.execute("DROP POLICY tenant_isolation_select ON workflows")
    migrated.execute("CREATE POLICY tenant_isolation_select ON workflows FOR SELECT USING "
                     "(current_setting('app.current_tenant_id', true) IS NULL OR "
                     "tenant_id = NULLIF(current_setting('app.current_tenant_id', true), '')::bigint)")
    red = failing(suite(migrated))
    assert ("setting never set in this session", "workflows") in red


def test_a_missing_with_check_goes_red(migrated):
    migrated.execute("DROP POLICY tenant_isolation_update ON models")
    migrated.execute("CREATE POLICY tenant_isolation_update ON models FOR UPDATE USING "
                     "(tenant_id = NULLIF(current_setting('app.current_tenant_id', true), '')::bigint) WITH CHECK (true)")
    assert failing(suite(migrated)) == {("UPDATE moving a row to another tenant", "models")}


def test_bypassrls_on_the_app_role_goes_red(db):
    # A role is cluster-wide: this test gives BYPASSRLS to an app role of its own, never to the one that the
    # tests running beside it (other databases, same server) use.
    role = "app_user_bypass_probe"
    params = params_mod.override(db.params, {"rls": {"app_role": role}})
    db.run("inspect", "seed", "backfill", "constrain", params=params)
    db.execute(f"ALTER ROLE {role} BYPASSRLS")
    try:
        red = failing(suite(db, params))
    finally:
        db.execute(f"ALTER ROLE {role} NOBYPASSRLS")
    for table in db.params.tables:
        assert ("tenant sees exactly its own rows", table) in red
        assert ("cross-tenant SELECT by key", table) in red
    assert ("setting never set in this session", "workflows") in red


def test_a_foreign_key_without_tenant_id_goes_red(migrated):
    """Only the single-column key the application had is left (its (tenant_id, …) twin dropped)."""
    migrated.execute("ALTER TABLE decision_tables DROP CONSTRAINT "
                     "decision_tables_tenant_id_model_id_models_tenant_id_id_fk")
    assert failing(suite(migrated)) == {("child row referencing another tenant's parent", "decision_tables -> models")}
