"""Signups during the rollout window (issue 27, item 2): an org the legacy application creates while the window is
open gets its tenant at once, its users their memberships, and every row written under it lands on that tenant; a
re-run of seed and backfill repairs rows an earlier version left on the System Tenant."""

import uuid

import psycopg

from conftest import LEGACY_ON
from runbook_helpers import params as params_mod
from runbook_helpers.legacy import signups
from test_any_keys import spec_params
from test_application_keeps_working import as_role

SAAS_SIGNUP = [
    ('INSERT INTO "Organization" (id, name, slug, "updatedAt") VALUES (%(org)s, \'New org\', %(org)s, now())', ()),
    ('INSERT INTO "User" (id, email, "updatedAt") VALUES (%(user)s, %(user)s || \'@example.com\', now())', ()),
    ('INSERT INTO "Membership" (id, "userId", "organizationId", role) VALUES (%(m)s, %(user)s, %(org)s, \'ADMIN\')', ()),
    ('INSERT INTO "Project" (id, "organizationId", name, "updatedAt") VALUES (%(p)s, %(org)s, \'P\', now())', ()),
    ('INSERT INTO "Environment" (id, "projectId", name) VALUES (%(e)s, %(p)s, \'production\')', ()),
    ('INSERT INTO "Flag" (id, "environmentId", key, value, "updatedAt") VALUES (%(f)s, %(e)s, \'k\', \'true\', now())', ()),
    ('INSERT INTO "FlagRule" (id, "flagId", position, condition) VALUES (%(r)s, %(f)s, 0, \'{}\')', ()),
]
SAAS_ROWS = {"Organization": "org", "Membership": "m", "Project": "p", "Environment": "e", "Flag": "f", "FlagRule": "r"}


def saas_signup(db, role: str) -> dict[str, str]:
    """A new organization, its first user, their membership and a row on each level under it, in one transaction of
    the legacy application (its role, no tenant_id anywhere)."""
    keys = {k: "c" + uuid.uuid4().hex[:24] for k in ("org", "user", "m", "p", "e", "f", "r")}
    with psycopg.connect(as_role(db, role)) as conn:
        for statement, _ in SAAS_SIGNUP:
            conn.execute(statement, keys)
    return keys


def test_an_organization_signed_up_during_the_window_gets_its_tenant_and_validate_passes(server, tmp_path):
    from conftest import Db, create_database, drop_database
    name = f"t_signup_{uuid.uuid4().hex[:10]}"
    create_database(server, name, None)
    try:
        db = Db(server, name, spec_params(tmp_path, "saas_text"))
        db.execute((__import__("pathlib").Path(__file__).parent / "schemas" / "saas_text.sql").read_text())
        db.run("inspect", "seed", "backfill")
        keys = saas_signup(db, "saas_legacy")
        tenant = db.scalar("SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = %s", (keys["org"],))
        assert tenant is not None and tenant != db.scalar("SELECT id FROM tenants WHERE uuid = %s",
                                                          (db.params.system_tenant.uuid,))
        assert db.scalar("SELECT uuid FROM tenants WHERE id = %s", (tenant,)) == uuid.uuid3(
            db.params.legacy.tenant_uuid_namespace, f"Organization:{keys['org']}")  # the uuid seed would give it
        for table, key in SAAS_ROWS.items():
            assert db.scalar(f'SELECT tenant_id FROM "{table}" WHERE id = %s', (keys[key],)) == tenant, table
        assert db.scalar("SELECT ut.role FROM user_tenants ut JOIN tenancy_runbook.user_map m ON m.user_id = ut.user_id "
                         "WHERE m.legacy_user_id = %s AND ut.tenant_id = %s", (keys["user"], tenant)) == "admin"
        checks = db.run("constrain", "validate")["validate"]["checks"]
        mine = checks[checks["check"].isin(["each legacy org has its tenant",
                                            "rows carry the tenant of their org (recomputed from legacy data)"])]
        assert len(mine) > 5 and mine["passed"].all(), mine[~mine["passed"]].to_dict("records")
    finally:
        drop_database(server, name)


def test_a_rerun_of_seed_and_backfill_moves_rows_an_earlier_version_left_on_the_system_tenant(migrated_db, ci_params):
    db = migrated_db("inspect", "seed", "backfill", "constrain", "validate", params=params_mod.override(ci_params, LEGACY_ON))
    system = db.scalar("SELECT id FROM tenants WHERE uuid = %s", (db.params.system_tenant.uuid,))
    with db.session("seed") as rb:  # an earlier version: no signup triggers
        with rb.engine.connect() as conn:
            removal = signups.remove_steps(conn, db.params, "test", "the version before them")
        assert removal and rb.executor().run_all(removal)
    with psycopg.connect(as_role(db, "legacy_app")) as conn:
        org = conn.execute("INSERT INTO org (uuid, name, slug) VALUES (gen_random_uuid(), 'late', 'late') "
                           "RETURNING id").fetchone()[0]
        workflow = conn.execute("INSERT INTO workflows (uuid, org_id, name, definition) VALUES (gen_random_uuid(), %s, "
                                "'late', '{}') RETURNING id", (org,)).fetchone()[0]
        conn.execute("INSERT INTO rules (uuid, workflow_id, name, expression) VALUES (gen_random_uuid(), %s, 'late', "
                     "'x')", (workflow,))
    assert db.scalar("SELECT tenant_id FROM workflows WHERE id = %s", (workflow,)) == system  # planted
    db.run("seed", "backfill")
    tenant = db.scalar("SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = %s", (org,))
    assert tenant not in (None, system)
    assert db.scalar("SELECT tenant_id FROM workflows WHERE id = %s", (workflow,)) == tenant
    assert db.scalar("SELECT tenant_id FROM rules WHERE workflow_id = %s", (workflow,)) == tenant
    with db.session("seed") as rb, rb.engine.connect() as conn:
        assert all(signups.installed(conn, db.params, t.name) for t in signups.tables(db.params))  # back in place
    checks = db.run("validate")["validate"]["checks"]
    assert checks["passed"].all(), checks[~checks["passed"]].to_dict("records")
