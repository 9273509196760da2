"""Distribution readiness tells the whole truth (issue 18): each thing a Citus 13 cluster refused of the runbook's end
state is a finding with what to do, on the demo and on the second schema (tests/schemas/shop.sql), and each goes
quiet once it is fixed in the database (or in params) and readiness runs again."""

import html
from pathlib import Path

import psycopg
from psycopg import sql

from conftest import create_role

from runbook_helpers import params as params_mod
from runbook_helpers.db.ddl import ACCESS_EXCLUSIVE_META, Step
from runbook_helpers.phases import distribute, inspect
from runbook_helpers.distribution import readiness as readiness_mod
from test_distribute import AGREED, MIGRATED, run_plain_postgres_part
from test_second_schema import shop_params

SHOP = (Path(__file__).parent / "schemas" / "shop.sql").read_text()


def readiness(db, params=None):
    with db.session("inspect", dry_run=True, params=params or db.params) as rb:
        return inspect.distribution_readiness(rb).set_index(["check", "object"])


def not_ready(frame) -> set[tuple[str, str]]:
    return set(frame[~frame["ready"]].index)


def test_the_demo_readiness_fires_on_each_shape_and_goes_quiet_once_fixed(migrated_db):
    db = migrated_db(*MIGRATED[:-1])  # validated, the rollout window still open
    with db.session("inspect", dry_run=True) as rb:
        shown = inspect.distribution_readiness(rb)._repr_html_()  # what 01_inspect shows: every text whole, left
    found = readiness(db)
    assert all(html.escape(text) in shown for text in found["what to do"].tolist() + found["finding"].tolist())
    assert "text-align:right" not in shown and "..." not in shown
    row = found.loc[("unique keys include tenant_id", "workflows.workflows_uuid_key")]
    assert not row["ready"] and row["what to do"].startswith("07_distribute makes it (tenant_id, uuid) once "
                                                            "distribution.application_keys_agreed")
    accepted = found.loc[("unique keys include tenant_id", "endpoints.endpoints_method_path_key"), "what to do"]
    assert accepted.startswith("the lint accepts it (rls.lint_accept: endpoint paths are public routes") and \
        "but Citus cannot keep a unique key without tenant_id" in accepted
    pk = found.loc[("primary key includes tenant_id", "workflows")]
    assert not pk["ready"] and "the composite key beside it does not help" in pk["finding"]
    rollout = found.loc[("no triggers on tenant tables", "workflows.tenancy_rollout_assign")]
    assert not rollout["ready"] and rollout["what to do"].startswith("06_finalize removes it")
    trigger = found.loc[("no triggers on tenant tables", "workflows.workflows_set_updated_at")]
    assert not trigger["ready"] and "unless citus.enable_unsafe_triggers" in trigger["finding"]
    outside = found.loc[("foreign keys to tables outside the spec", "workflows.workflows_created_by_fkey")]
    assert not outside["ready"] and outside["what to do"].startswith("name user in distribution.reference_tables")
    assert {t for c, t in found.index if c == "reference tables"} == {"tenants", "users", "user_tenants"}
    order = found.loc[("order of distribution: foreign keys dropped and re-added",
                       "rules.rules_tenant_id_workflow_id_workflows_tenant_id_id_fk")]
    assert "turns every table connected to it by a foreign key into a Citus local table" in order["finding"]
    assert found.loc[("order of distribution", "(plan)"), "finding"].startswith("1. keys to (tenant_id, …)")
    assert found.loc[("statement shapes Citus accepts", "07_distribute's plan"), "ready"]
    # what Citus refused on the real cluster (issue 26), predicted here on plain PostgreSQL before any change
    cascade = found.loc[("foreign keys holding tenant_id have no ON UPDATE action",
                         "rules.rules_tenant_id_workflow_id_workflows_tenant_id_id_fk")]
    assert cascade["ready"] and cascade["what to do"].startswith("nothing: 07_distribute re-adds it without ON UPDATE "
                                                                 "CASCADE (NO ACTION)")
    login = found.loc[("roles that query distributed tables can log in", "app_user")]
    assert not login["ready"] and "NOLOGIN: Citus opens its connections to the workers as the current user" in \
        login["finding"] and login["what to do"].startswith("ALTER ROLE app_user LOGIN on the coordinator")
    assert found.loc[("roles that query distributed tables can log in", "legacy_app"), "ready"]

    # the fixes: the window closed, "user" named a reference table, the trigger taken along, the keys swapped
    db.run("finalize")
    assert not [k for k in not_ready(readiness(db)) if k[0] == "no triggers on tenant tables" and "rollout" in k[1]]
    fixed = params_mod.override(db.params, AGREED)
    found = readiness(db, fixed)
    assert found.loc[("no triggers on tenant tables", "workflows.workflows_set_updated_at"), "ready"]
    assert ("foreign keys to tables outside the spec", "workflows.workflows_created_by_fkey") not in found.index
    assert found.loc[("reference tables", "user"), "ready"]
    assert "Citus makes org_user a Citus local table" in found.loc[
        ("tables outside the spec that reference a reference table", "org_user.org_user_user_id_fkey"), "what to do"]
    local = found.xs("tables that become Citus local tables", level="check")["finding"].to_dict()
    assert local == {"org_user": "org_user references user (org_user_user_id_fkey): create_reference_table('user') "
                                 "takes every table connected to it by foreign keys into Citus's metadata as a Citus "
                                 "local table",
                     "org": "org_user references org (org_user_org_id_fkey): create_reference_table('user') takes "
                            "every table connected to it by foreign keys into Citus's metadata as a Citus local table"}
    db.params = fixed
    run_plain_postgres_part(db)
    after = readiness(db, fixed)
    # what is left is the login of the application role, which only the DBA can give (roles are the server's: the
    # test leaves app_user as 04_constrain made it)
    assert not_ready(after) == {("roles that query distributed tables can log in", "app_user")}, \
        after[~after["ready"]].to_dict("index")
    db.execute("DROP TRIGGER workflows_set_updated_at ON workflows")  # or drop it: the finding is gone
    assert not [k for k in readiness(db).index if k[0] == "no triggers on tenant tables"]


def test_a_statement_shape_citus_refuses_is_found(migrated_db):
    db = migrated_db(*MIGRATED)
    bad = Step("distribute", "workflows", "swap in one statement", sql.SQL(
        "ALTER TABLE workflows DROP CONSTRAINT workflows_uuid_key, ADD CONSTRAINT workflows_uuid_key UNIQUE USING "
        "INDEX workflows_uuid_key_with_tenant_id"), ACCESS_EXCLUSIVE_META, "")
    with db.session("inspect", dry_run=True) as rb:
        good = distribute.analyse(rb).steps
        found = readiness_mod.readiness(rb, planned=good + [bad]).set_index(["check", "object"])
        quiet = readiness_mod.readiness(rb, planned=good).set_index(["check", "object"])
    row = found.loc[("statement shapes Citus accepts", "workflows: swap in one statement")]
    assert not row["ready"] and row["what to do"].startswith("ADD CONSTRAINT with other subcommands in one ALTER TABLE")
    assert not [k for k in not_ready(quiet) if k[0] == "statement shapes Citus accepts"]


def test_the_shop_readiness_fires_on_its_shapes_and_goes_quiet_once_fixed(migrated_db, tmp_path):
    db = migrated_db("inspect", "seed", "backfill", "constrain", "validate", "finalize", params=shop_params(tmp_path),
                     schema=SHOP)
    found = readiness(db)
    staff = found.loc[("unique keys include tenant_id", "staff.staff_email_key"), "what to do"]
    assert staff.startswith("the lint accepts it (rls.lint_accept: staff sign in by email across stores")
    assert "the acceptance does not carry over to a distributed table" in staff
    assert not found.loc[("unique keys include tenant_id", "rental.rental_rental_date_inventory_id_customer_id_key"),
                         "ready"]
    payment = found.loc[("primary key includes tenant_id", "payment"), "what to do"]
    assert payment.startswith("payment is partitioned: PostgreSQL builds no index CONCURRENTLY")
    across = found.loc[("foreign keys between tenant tables include tenant_id", "rental.rental_customer_id_fkey")]
    assert not across["ready"] and across["what to do"].startswith("Citus cannot keep a foreign key across tenants")
    assert "rental.rental_customer_id_fkey is an accepted cross-tenant reference" in found.loc[
        ("primary key includes tenant_id", "customer"), "what to do"]
    trigger = found.loc[("no triggers on tenant tables", "customer.customer_last_update")]
    assert not trigger["ready"]
    assert found.loc[("shared tables as reference tables", "film"), "ready"]
    assert ("order of distribution: foreign keys dropped and re-added", "inventory.inventory_film_id_fkey") in found.index
    with db.session("distribute", dry_run=True) as rb:
        stops = distribute.blockers(rb)
    assert {"customer.customer_last_update", "payment", "customer", "staff"} <= set(stops["object"])

    # the fixes: the trigger dropped, the cross-tenant references dropped (Citus cannot keep them)
    db.execute("DROP TRIGGER customer_last_update ON customer")
    for fk in ("rental.rental_customer_id_fkey", "rental.rental_staff_id_fkey", "payment.payment_customer_id_fkey"):
        table, name = fk.split(".")
        db.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    after = readiness(db)
    assert not [k for k in after.index if k[0] == "no triggers on tenant tables"]
    assert not [k for k in not_ready(after) if k[0] == "foreign keys between tenant tables include tenant_id"
                and k[1] in ("rental.rental_customer_id_fkey", "rental.rental_staff_id_fkey")]
    assert after.loc[("primary key includes tenant_id", "customer"), "what to do"].startswith(
        "07_distribute makes it (tenant_id, customer_id)")
    with db.session("distribute", dry_run=True) as rb:
        stops = distribute.blockers(rb)
    assert set(stops["object"]) == {"payment", "(params)"}  # the partitioned table's keys are by hand, and the agreement


def test_a_legacy_role_that_reads_tenant_tables_must_be_able_to_log_in(migrated_db, server):
    """Citus reaches the workers as the current user: the legacy role, which reads every tenant table, is held to
    LOGIN like the application role (a role that reads no tenant table is not listed)."""
    db = migrated_db(*MIGRATED)
    role = f"legacy_nologin_{db.name}"
    create_role(server, role, "NOLOGIN")
    try:
        db.execute(f'GRANT SELECT ON workflows TO "{role}"')
        found = readiness(db, params_mod.override(db.params, {"rls": {"legacy_role": role}}))
        row = found.loc[("roles that query distributed tables can log in", role)]
        assert not row["ready"] and row["finding"].startswith("the legacy role (rls.legacy_role): NOLOGIN: Citus opens")
        assert row["what to do"].startswith(f"ALTER ROLE {role} LOGIN on the coordinator")
        db.execute(f'REVOKE SELECT ON workflows FROM "{role}"')
        found = readiness(db, params_mod.override(db.params, {"rls": {"legacy_role": role}}))
        assert ("roles that query distributed tables can log in", role) not in found.index
    finally:
        db.execute(f'DROP OWNED BY "{role}"')
        with psycopg.connect(server.url(), autocommit=True) as admin:
            admin.execute(f'DROP ROLE "{role}"')
