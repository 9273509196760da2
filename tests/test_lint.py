"""The tenancy lint: clean after the migration (with the accepted findings params name), and each rule
fires on the shape it exists to catch."""

import pytest

from conftest import create_role

from runbook_helpers.tenancy import lint
from runbook_helpers import params as params_mod


@pytest.fixture
def migrated(migrated_db):
    return migrated_db("inspect", "seed", "backfill", "constrain")


def run(db, params=None):
    with db.session("validate", params=params) as rb:
        return lint.run(rb)


def failing(frame):
    return {(r.rule, r.object) for r in frame[frame["status"] == lint.FAIL].itertuples()}


def test_clean_after_the_migration_with_reasons_for_what_is_accepted(migrated):
    frame = run(migrated)
    assert lint.clean(frame), frame[frame["status"] == lint.FAIL].to_dict("records")
    accepted = frame[frame["status"] == lint.ACCEPTED]
    legacy = {f"{t}.tenant_legacy_access" for t in migrated.params.tables}
    assert set(accepted["object"]) == {"workflows.workflows_org_id_name_key", "endpoints.endpoints_method_path_key"} | legacy
    assert accepted["reason"].str.len().min() >= 10
    # the legacy role's contract is accepted with the reason params give, and reaches that role alone
    assert set(accepted[accepted["object"].isin(legacy)]["reason"]) == {migrated.params.rls.legacy_reason}
    pkey = frame.set_index("object").loc["widgets.widgets_pkey"]
    assert pkey["status"] == lint.PASS and "scoped by its parent (widgets_template_id_fkey)" in pkey["finding"]
    rules = set(frame["rule"])
    for rule in ("RLS enabled and forced", "a policy per command", "policy fails closed",
                 "views over tenant tables are security_invoker", "unique keys include tenant_id",
                 "foreign keys between tenant tables include tenant_id", "no role bypasses RLS on tenant tables"):
        assert rule in rules, rule


def test_without_acceptances_the_business_keys_fail(migrated):
    params = params_mod.override(migrated.params, {"rls": {"lint_accept": []}})
    assert failing(run(migrated, params)) == {
        ("unique keys include tenant_id", "workflows.workflows_org_id_name_key"),
        ("unique keys include tenant_id", "endpoints.endpoints_method_path_key")}


def test_before_the_migration_everything_is_still_to_do(db):
    red = failing(run(db))
    assert ("RLS enabled and forced", "workflows") in red
    assert ("a policy per command", "workflows") in red
    assert ("foreign keys between tenant tables include tenant_id", "rules.rules_workflow_id_fkey") in red
    assert ("views over tenant tables are security_invoker", "active_workflows") in red


def test_each_rule_fires_on_its_shape(migrated):
    migrated.execute("ALTER TABLE widgets NO FORCE ROW LEVEL SECURITY")
    migrated.execute("DROP POLICY tenant_isolation_delete ON endpoints")
    migrated.execute("DROP POLICY tenant_isolation_select ON models")
    migrated.execute("CREATE POLICY tenant_isolation_select ON models FOR SELECT USING "
                     "(current_setting('app.current_tenant_id', true) IS NULL OR tenant_id = 1)")
    migrated.execute("DROP POLICY tenant_isolation_insert ON rules")
    migrated.execute("CREATE POLICY tenant_isolation_insert ON rules FOR INSERT WITH CHECK (true)")
    migrated.execute("DROP POLICY tenant_isolation_update ON templates")
    migrated.execute("CREATE POLICY tenant_isolation_update ON templates FOR UPDATE USING "
                     "(tenant_id = current_setting('app.current_tenant_id')::bigint)")
    migrated.execute("CREATE VIEW kb_names AS SELECT id, name FROM knowledge_bases")
    migrated.execute("CREATE FUNCTION count_rules() RETURNS bigint LANGUAGE sql SECURITY DEFINER AS "
                     "'SELECT count(*) FROM public.rules'")
    migrated.execute("CREATE UNIQUE INDEX models_name_key ON models (name)")
    create_role(migrated.server, "lint_bypass", "BYPASSRLS")
    migrated.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON rules TO lint_bypass")
    migrated.execute("DROP POLICY tenant_legacy_access ON knowledge_bases")  # the legacy contract, to PUBLIC
    migrated.execute("CREATE POLICY tenant_legacy_access ON knowledge_bases USING (true) WITH CHECK (true)")
    try:
        red = failing(run(migrated))
    finally:
        migrated.execute("REVOKE ALL ON rules FROM lint_bypass")
    assert red == {
        ("RLS enabled and forced", "widgets"),
        ("a policy per command", "endpoints"),
        ("policy fails closed", "models.tenant_isolation_select"),
        ("policy fails closed", "rules.tenant_isolation_insert"),
        ("policy fails closed", "templates.tenant_isolation_update"),
        ("views over tenant tables are security_invoker", "kb_names"),
        ("SECURITY DEFINER functions pin search_path", "count_rules()"),
        ("SECURITY DEFINER functions reading tenant tables do not bypass RLS", "count_rules()"),  # owned by postgres
        ("unique keys include tenant_id", "models.models_name_key"),
        ("policy fails closed", "knowledge_bases.tenant_legacy_access"),
        ("no role bypasses RLS on tenant tables", "lint_bypass"),
    }


DEFINER = "SECURITY DEFINER functions reading tenant tables do not bypass RLS"
MATVIEW = "materialized views over tenant tables are not readable by the application role"


def test_a_security_definer_function_whose_owner_bypasses_rls_fails_until_accepted(migrated):
    """Owned by a superuser, or by the table owner on a table without FORCE, a SECURITY DEFINER function reads
    every tenant's rows for whoever calls it; owned by a role subject to RLS it passes. Found by name in the body,
    and through pg_depend for a SQL-standard body."""
    migrated.execute("CREATE FUNCTION all_rules() RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = "
                     "public AS 'SELECT count(*) FROM rules'")
    migrated.execute("CREATE FUNCTION all_models() RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = "
                     "public BEGIN ATOMIC SELECT count(*) FROM public.models; END")
    migrated.execute("CREATE FUNCTION owned_rules() RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = "
                     "public AS 'SELECT count(*) FROM rules'")
    owner = migrated.scalar("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'rules'::regclass")
    migrated.execute(f"ALTER FUNCTION owned_rules() OWNER TO {owner}")
    frame = run(migrated).set_index(["rule", "object"])
    assert frame.loc[(DEFINER, "all_rules()"), "status"] == lint.FAIL
    assert "postgres is a superuser" in frame.loc[(DEFINER, "all_rules()"), "finding"]
    assert frame.loc[(DEFINER, "all_models()"), "status"] == lint.FAIL  # BEGIN ATOMIC: pg_depend names models
    assert frame.loc[(DEFINER, "owned_rules()"), "status"] == lint.PASS  # the owner is subject to RLS (FORCE)
    migrated.execute("ALTER TABLE rules NO FORCE ROW LEVEL SECURITY")
    params = params_mod.override(migrated.params, {"rls": {"lint_accept": migrated.params.model_dump()["rls"][
        "lint_accept"] + [{"rule": DEFINER, "object": "all_rules()", "reason": "an admin report, EXECUTE granted to "
                           "the operators' role only"}]}})
    frame = run(migrated, params).set_index(["rule", "object"])
    assert frame.loc[(DEFINER, "owned_rules()"), "status"] == lint.FAIL
    assert f"{owner} owns rules without FORCE" in frame.loc[(DEFINER, "owned_rules()"), "finding"]
    assert frame.loc[(DEFINER, "all_rules()"), "status"] == lint.ACCEPTED
    assert frame.loc[(DEFINER, "all_rules()"), "reason"].startswith("an admin report")


def test_a_materialized_view_has_its_own_rule(migrated):
    """A materialized view cannot be security_invoker, so it is not asked to be; it fails while the application
    role can read it (it holds what its owner saw at refresh time)."""
    migrated.execute("CREATE MATERIALIZED VIEW kb_per_tenant AS SELECT tenant_id, count(*) FROM knowledge_bases "
                     "GROUP BY 1")
    frame = run(migrated)
    assert "kb_per_tenant" not in set(frame[frame["rule"] == "views over tenant tables are security_invoker"]["object"])
    mat = frame[frame["rule"] == MATVIEW].set_index("object")
    assert mat.loc["kb_per_tenant", "status"] == lint.PASS
    assert lint.clean(frame), frame[frame["status"] == lint.FAIL].to_dict("records")
    migrated.execute("GRANT SELECT ON kb_per_tenant TO app_user")
    mat = run(migrated).set_index("rule").loc[MATVIEW]
    assert mat["object"] == "kb_per_tenant" and mat["status"] == lint.FAIL
    assert "revoke SELECT from app_user" in mat["finding"]


def test_with_rls_off_validate_reports_the_lint_as_advice_and_does_not_fail_on_it(db):
    from runbook_helpers.phases import validate

    params = params_mod.override(db.params, {"rls": {"enabled": False}, "distribution": {"composite_keys": False}})
    db.run("inspect", "seed", "backfill", "constrain", params=params)
    with db.session("validate", params=params) as rb:
        frame = validate.lint(rb)
        results = validate.checks(rb)
    assert not (frame["status"] == lint.FAIL).any()
    advice = frame[frame["status"] == lint.ADVISORY]
    assert ("RLS enabled and forced", "workflows") in {(r.rule, r.object) for r in advice.itertuples()}
    assert set(advice["reason"]) == {"rls.enabled is false: reported, not enforced"}
    assert "advisory" in validate.lint_summary(frame).columns
    assert validate.assert_all_passed(results, False, frame).startswith("all ")
