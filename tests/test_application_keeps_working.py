"""The legacy application keeps working, unchanged, through the whole rollout, with mapping, RLS and
composite keys on: it sees all its data, every row it writes lands in the tenant its own data implies,
its uniqueness and migrations keep working, and validate passes on the live database, listing its writes."""

import time

import psycopg
import pytest

from conftest import LEGACY_ON
from runbook_helpers import params as params_mod
from runbook_helpers.workload import LegacyWorkload

pytestmark = pytest.mark.slow
LEGACY_ROLE = "legacy_app"


def as_role(db, role: str = LEGACY_ROLE) -> str:
    return db.url.replace("postgresql://postgres@", f"postgresql://{role}@")


def tenant_of_org(db, org: int) -> int:
    return db.scalar("SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = %s", (org,))


@pytest.fixture
def legacy(db):
    db.params = params_mod.override(db.params, LEGACY_ON)
    assert db.params.rls.enabled and db.params.distribution.composite_keys and db.params.rls.legacy_role == LEGACY_ROLE
    return db


@pytest.fixture
def migrated(migrated_db, ci_params):
    return migrated_db("inspect", "seed", "backfill", "constrain", "validate",
                       params=params_mod.override(ci_params, LEGACY_ON))


def test_the_legacy_role_logged_in_sees_every_row_and_writes_land_in_their_tenant(migrated):
    db = migrated
    total = db.scalar("SELECT count(*) FROM workflows")
    workflow = db.scalar("SELECT id FROM workflows WHERE org_id = 3 ORDER BY id LIMIT 1")
    tenant = tenant_of_org(db, 3)
    with psycopg.connect(as_role(db), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == LEGACY_ROLE
        assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == total
        rule = conn.execute("INSERT INTO rules (uuid, workflow_id, name, expression) VALUES (gen_random_uuid(), %s, "
                            "'r', 'x') RETURNING id", (workflow,)).fetchone()[0]
        new = conn.execute("INSERT INTO workflows (uuid, name, org_id, definition) VALUES (gen_random_uuid(), 'new of "
                           "3', 3, '{}') RETURNING id").fetchone()[0]
        # ON CONFLICT (id) still has its unique key, and a duplicate id is still refused
        conn.execute("INSERT INTO workflows (id, uuid, name, org_id, definition) VALUES (%s, gen_random_uuid(), "
                     "'renamed', 3, '{}') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name", (new,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO workflows (id, uuid, name, org_id, definition) VALUES (%s, gen_random_uuid(), "
                         "'dup', 4, '{}')", (new,))
    assert db.scalar("SELECT tenant_id FROM rules WHERE id = %s", (rule,)) == tenant
    assert db.scalar("SELECT array[tenant_id::text, name] FROM workflows WHERE id = %s", (new,)) == [str(tenant), "renamed"]
    with db.connect(autocommit=True) as owner:  # the application's next ordinary migration
        owner.execute("SET ROLE app_owner")
        owner.execute("CREATE TABLE workflow_comments (id bigserial PRIMARY KEY, workflow_id bigint NOT NULL "
                      "REFERENCES workflows (id), body text)")
        owner.execute("INSERT INTO workflow_comments (workflow_id, body) VALUES (%s, 'hi')", (new,))
    assert db.scalar("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'workflows'::regclass "
                     "AND contype = 'p'") == "PRIMARY KEY (id)"


def test_sessions_opened_before_row_level_security_keep_working(legacy):
    db = legacy
    db.run("inspect", "seed", "backfill")
    total = db.scalar("SELECT count(*) FROM workflows")
    with psycopg.connect(as_role(db), autocommit=True) as early:
        assert early.execute("SELECT count(*) FROM workflows").fetchone()[0] == total
        db.run("constrain")
        assert db.scalar("SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE oid = 'workflows'::regclass")
        assert early.execute("SELECT count(*) FROM workflows").fetchone()[0] == total
        early.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'early session', 'x')")
    assert db.scalar("SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                     "WHERE r.rolname = %s", (LEGACY_ROLE,)) == 0  # no role setting, in any database


def test_a_writer_that_sets_another_tenant_than_the_parent_is_refused_not_rewritten(migrated):
    db = migrated
    workflow = db.scalar("SELECT id FROM workflows WHERE org_id = 3 ORDER BY id LIMIT 1")
    other = tenant_of_org(db, 4)
    with psycopg.connect(as_role(db), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="differs from the tenant .* of its workflows row"):
            conn.execute("INSERT INTO rules (uuid, workflow_id, name, expression, tenant_id) VALUES "
                         "(gen_random_uuid(), %s, 'r', 'x', %s)", (workflow, other))


def test_moving_a_workflow_to_another_org_moves_its_children(migrated):
    db = migrated
    workflow = db.scalar("SELECT w.id FROM workflows w WHERE w.org_id = 3 AND EXISTS (SELECT 1 FROM rules r "
                         "WHERE r.workflow_id = w.id) AND EXISTS (SELECT 1 FROM endpoints e WHERE e.workflow_id = w.id) "
                         "ORDER BY w.id LIMIT 1")
    with psycopg.connect(as_role(db), autocommit=True) as conn:
        conn.execute("UPDATE workflows SET org_id = 4 WHERE id = %s", (workflow,))
    target = tenant_of_org(db, 4)
    assert db.scalar("SELECT tenant_id FROM workflows WHERE id = %s", (workflow,)) == target
    assert db.scalar("SELECT count(*) FROM rules WHERE workflow_id = %s AND tenant_id <> %s", (workflow, target)) == 0
    assert db.scalar("SELECT count(*) FROM endpoints WHERE workflow_id = %s AND tenant_id <> %s", (workflow, target)) == 0


def test_the_workload_runs_through_every_phase_and_after_finalize_without_an_error(legacy):
    db = legacy
    p = db.params
    workload = LegacyWorkload(as_role(db), namespace=p.legacy.tenant_uuid_namespace, system_tenant=p.system_tenant.uuid)
    workload.start()
    try:
        time.sleep(1.0)
        results = {}
        for phase in ("inspect", "seed", "backfill", "constrain", "validate"):
            workload.phase = phase
            results[phase] = db.run(phase)[phase]
            time.sleep(0.3)
        workload.phase = "re-runs"
        for phase in ("backfill", "constrain"):  # never fail on rows the trigger (or anything of ours) wrote
            rerun = db.run(phase)[phase]
            assert (rerun["report"].summary["rows updated"] == 0).all() if phase == "backfill" else \
                rerun["applied"].empty
        workload.phase = "after validate"
        time.sleep(0.5)
    finally:
        workload.stop()
    tenant_aware = LegacyWorkload(as_role(db), namespace=p.legacy.tenant_uuid_namespace,
                                  system_tenant=p.system_tenant.uuid, tenant_aware=True, seed=8)
    switched = db.scalar("SELECT now()")
    tenant_aware.start()
    try:
        tenant_aware.phase = "tenant-aware release"
        time.sleep(1.0)
        tenant_aware.phase = "finalize"
        from runbook_helpers.phases.headless import run_phase
        results["finalize"] = run_phase(db.session("finalize"), since=switched.isoformat())
        tenant_aware.phase = "after finalize"
        time.sleep(1.0)
    finally:
        tenant_aware.stop()

    errors = workload.errors() + tenant_aware.errors()
    assert errors == [], errors[:5]
    counts = {**workload.counts(), **tenant_aware.counts()}
    phases = {phase for phase, _ in counts}
    assert {"before", "inspect", "seed", "backfill", "constrain", "validate", "after finalize"} <= phases
    kinds = {kind for _, kind in counts}
    assert {"insert workflow", "insert rule", "move workflow to another org", "delete workflow (rules cascade)",
            "upsert workflow by id", "update workflow status", "list workflows", "read rules by id",
            "sign up an org and its first user"} <= kinds
    signups = {phase for phase, kind in counts if kind == "sign up an org and its first user"}
    assert {"before", "inspect", "seed", "backfill", "constrain", "validate"} <= signups, signups

    checks = results["validate"]["checks"]
    assert checks["passed"].all(), checks[~checks["passed"]].to_dict("records")
    writes = results["validate"]["writes"].set_index("table")
    assert writes.loc["workflows", "inserted"] > 0 and writes.loc["workflows", "updated"] > 0
    assert writes.loc["rules", "inserted"] > 0
    # every row the workload wrote is in the tenant its org (or its parent) implies
    with db.connect() as conn:
        wrong = conn.execute(
            "SELECT count(*) FROM workflows w WHERE w.name LIKE 'wl-%%' AND w.tenant_id IS DISTINCT FROM coalesce("
            "(SELECT m.tenant_id FROM tenancy_runbook.org_tenants m WHERE m.org_id = w.org_id), "
            "(SELECT id FROM tenants WHERE uuid = %s))", (p.system_tenant.uuid,)).fetchone()[0]
        assert wrong == 0
        assert conn.execute("SELECT count(*) FROM rules r JOIN workflows w ON w.id = r.workflow_id "
                            "WHERE r.tenant_id <> w.tenant_id").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM workflows WHERE name LIKE 'wl-%%'").fetchone()[0] > 0
    assert results["finalize"]["status"]["rollout trigger"].eq("removed").all()
    # every org it signed up has a tenant of its own, its user a membership there, its rows that tenant
    with db.connect() as conn:
        own = conn.execute(
            "SELECT count(DISTINCT m.tenant_id), count(*) FILTER (WHERE t.uuid IS DISTINCT FROM %s), "
            "count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM user_tenants ut WHERE ut.tenant_id = m.tenant_id "
            "AND ut.role = 'owner')) FROM unnest(%s::bigint[]) AS o(id) LEFT JOIN tenancy_runbook.org_tenants m "
            "ON m.org_id = o.id LEFT JOIN tenants t ON t.id = m.tenant_id", (p.system_tenant.uuid, workload.signed_up)
        ).fetchone()
        assert own == (len(workload.signed_up), len(workload.signed_up), 0), own
        assert conn.execute("SELECT count(*) FROM workflows w JOIN tenancy_runbook.org_tenants m ON m.org_id = w.org_id "
                            "WHERE w.org_id = ANY(%s) AND w.tenant_id <> m.tenant_id", (workload.signed_up,)
                            ).fetchone()[0] == 0


def test_a_constrain_stopped_part_way_names_what_is_in_force_and_the_application_keeps_working(legacy, monkeypatch):
    db = legacy
    db.run("inspect", "seed", "backfill")
    workflow = db.scalar("SELECT workflow_id FROM rules ORDER BY id LIMIT 1")
    rule = db.scalar("SELECT min(id) FROM rules")
    other = db.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'elsewhere') RETURNING id")
    # a rule moved to another tenant behind the rollout trigger: its composite key cannot validate
    db.execute_unrecorded("UPDATE rules SET tenant_id = %s WHERE id = %s", (other, rule))
    from runbook_helpers.errors import RunbookError
    from runbook_helpers.legacy import conflicts
    with pytest.raises(RunbookError) as err:  # constrain's preflight finds it, with nothing changed (issue 14)
        db.run("constrain")
    assert "rules.rules_workflow_id_fkey -> workflows (workflow_id): 1 rows" in str(err.value)
    monkeypatch.setattr(conflicts, "require_resolved", lambda rb, actual=False: None)  # as if moved after it
    with pytest.raises(RunbookError) as err:
        db.run("constrain")
    message = str(err.value)
    assert "validate rules_tenant_id_workflow_id_workflows_tenant_id_id_fk failed" in message
    assert f"1 row violate it, e.g. (id) = ({rule}): tenant_id, workflow_id = ({other}, {workflow})" in message
    assert "In force on the application's writes now: " in message
    # the NOT VALID composite key whose VALIDATE failed is dropped again: new writes do not meet it
    assert "undone so new writes do not meet it" in message
    assert "rules_tenant_id_workflow_id_workflows_tenant_id_id_fk" not in message.split("In force")[1]
    with psycopg.connect(as_role(db), autocommit=True) as conn:  # what is in force does not stop the application
        conn.execute("INSERT INTO rules (uuid, workflow_id, name, expression) VALUES (gen_random_uuid(), %s, 'r', 'x')",
                     (workflow,))
        conn.execute("INSERT INTO workflows (uuid, name, org_id, definition) VALUES (gen_random_uuid(), 'w', 3, '{}')")
    db.execute_unrecorded("UPDATE rules SET tenant_id = (SELECT w.tenant_id FROM workflows w WHERE w.id = "
                          "rules.workflow_id) WHERE id = (SELECT min(id) FROM rules)")
    db.run("constrain", "validate")  # the re-run resumes and passes


def test_the_workload_runs_through_a_rollback_without_an_error(migrated):
    """Rollback hands the database back to the legacy application while it writes: no statement fails, and what it
    wrote meanwhile stays (the step harness checks between every two statements; this runs it continuously)."""
    db = migrated
    p = db.params
    workload = LegacyWorkload(as_role(db), namespace=p.legacy.tenant_uuid_namespace, system_tenant=p.system_tenant.uuid)
    workload.start()
    try:
        time.sleep(0.5)
        workload.phase = "rollback"
        out = db.run("rollback")["rollback"]
        workload.phase = "after rollback"
        time.sleep(0.5)
    finally:
        workload.stop()
    assert workload.errors() == [], workload.errors()[:5]
    assert {"rollback", "after rollback"} <= {phase for phase, _ in workload.counts()}
    assert out["verdict"].startswith("the database is back to its shape before the migration")
    assert db.scalar("SELECT count(*) FROM pg_attribute WHERE attrelid = 'workflows'::regclass AND attname = 'tenant_id' "
                     "AND NOT attisdropped") == 0
    assert db.scalar("SELECT count(*) FROM workflows WHERE name LIKE 'wl-%%'") > 0
