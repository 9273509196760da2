"""Signups during the rollout window (issue 27, item 2): a re-run of seed and backfill repairs rows an earlier version
left on the System Tenant. (An org signed up during the window on the text and uuid schemas: tests/test_any_keys.py;
through every phase beside the demo's workload: tests/test_application_keeps_working.py.)"""

import psycopg

from conftest import LEGACY_ON
from runbook_helpers import params as params_mod
from runbook_helpers.legacy import signups
from test_application_keeps_working import as_role


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
