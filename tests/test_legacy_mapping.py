"""The legacy mapping (issue 7): orgs become tenants, users and memberships are migrated, each row goes to its
org's tenant, ambiguities are listed, never guessed, and validate's conservation checks prove nothing was lost.

Expected values are computed here from the legacy tables with plain SQL and Python, not with the runbook's
own mapping expressions, so a wrong rule in the runbook cannot also be the rule the test checks against.
"""

import uuid
from collections import defaultdict

import pytest
from psycopg import sql

from conftest import LEGACY_ON
from runbook_helpers import drizzle, params as params_mod
from runbook_helpers.legacy import checks as legacy_checks, mapping as legacy_mapping
from runbook_helpers.phases import rollback
from test_drizzle import folder_with_0002, recorded_frame
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import inspect, seed, validate
from runbook_helpers.run.session import PHASES

NAMESPACE = uuid.UUID("6f1d3a4e-2b7c-4e0a-9c55-1d2e3f405162")  # params/base.yaml legacy.tenant_uuid_namespace
ORG_USER_ROLES = {"owner": "owner", "admin": "admin", "editor": "member", "viewer": "viewer"}
ROLE_IDS = {1: "owner", 2: "admin", 3: "member", 4: "viewer"}
ORDER = ["viewer", "member", "admin", "owner"]


@pytest.fixture
def mapped(db):
    """The test database with the ci params as they are (legacy mapping, RLS and composite keys on)."""
    db.params = params_mod.override(db.params, LEGACY_ON)
    return db


@pytest.fixture
def mapped_migrated(migrated_db, ci_params):
    """A copy of the test database migrated through every phase with the legacy mapping on (as `mapped`)."""
    return migrated_db(*PHASES, params=params_mod.override(ci_params, LEGACY_ON))


def rows(db, query, args=None):
    with db.connect() as conn:
        return conn.execute(query, args).fetchall()


def legacy_expectations(db):
    """What the mapping must produce, worked out in Python from the legacy rows."""
    orgs = {oid: ouuid for oid, ouuid in rows(db, "SELECT id, uuid FROM org")}
    users = rows(db, 'SELECT id, uuid, email, org_ids, role_ids FROM "user" ORDER BY id')
    first_by_email, duplicates = {}, set()
    for uid, _, email, _, _ in users:
        key = email.strip().lower()
        if key in first_by_email:
            duplicates.add(uid)
        else:
            first_by_email[key] = uid
    roles = defaultdict(set)
    for org_id, user_id, role in rows(db, "SELECT org_id, user_id, role FROM org_user"):
        roles[(user_id, org_id)].add(ORG_USER_ROLES[role])
    array_orphans = set()
    for uid, _, _, org_ids, role_ids in users:
        for k, org_id in enumerate(org_ids):
            if org_id not in orgs:
                array_orphans.add((uid, org_id))
                continue
            if len(role_ids) == len(org_ids):
                named = [role_ids[k]]
            else:
                named = role_ids
            roles[(uid, org_id)].update(ROLE_IDS[r] for r in named)
    conflicts = {pair for pair, named in roles.items() if len(named) > 1}
    resolved = {pair: min(named, key=ORDER.index) for pair, named in roles.items() if pair[0] not in duplicates}
    return orgs, duplicates, conflicts, array_orphans, resolved


def test_tenant_uuid_in_sql_is_python_uuid3(db):
    names = ["a6a3c1b2-0000-4000-8000-000000000001", "x", "Zürich ⚙", ""]
    with db.connect() as conn:
        for name in names:
            query = sql.SQL("SELECT {}").format(legacy_mapping.tenant_uuid(NAMESPACE, sql.Literal(name)))
            assert conn.execute(query).fetchone()[0] == uuid.uuid3(NAMESPACE, name), name


def test_mapped_run_validates_clean_and_every_row_is_where_its_org_says(mapped, tmp_path):
    db = mapped
    orgs, duplicates, conflicts, array_orphans, resolved = legacy_expectations(db)
    updated_at = rows(db, "SELECT id, updated_at FROM workflows ORDER BY id")
    results = db.run()

    checks = results["validate"]["checks"]
    assert checks["passed"].all(), checks[~checks["passed"]].to_string()
    conservation = set(checks["check"])
    for name in ("rows per tenant add up to the table's rows", "each legacy org has its tenant",
                 "rows carry the tenant of their org (recomputed from legacy data)",
                 "each legacy (user, org) pair has exactly one membership, with its mapped role",
                 "memberships of org tenants without a legacy pair",
                 "each legacy user is migrated or listed as a duplicate"):
        assert name in conservation, name
    assert {c for c in conservation if c.startswith("child rows carry their parent's tenant")} == {
        "child rows carry their parent's tenant (workflows via workflow_id)",
        "child rows carry their parent's tenant (models via model_id)",
        "child rows carry their parent's tenant (templates via template_id)"}

    # a tenant per org, its uuid derived from the org's uuid; the System Tenant besides
    tenant_of = {}
    for org_id, org_uuid in orgs.items():
        found = rows(db, "SELECT id, name FROM tenants WHERE uuid = %s", (uuid.uuid3(NAMESPACE, str(org_uuid)),))
        assert len(found) == 1, org_id
        tenant_of[org_id] = found[0][0]
    assert rows(db, "SELECT count(*) FROM tenants")[0][0] == len(orgs) + 1
    system = rows(db, "SELECT id FROM tenants WHERE uuid = '00000000-0000-4000-8000-000000000001'")[0][0]

    # workflows: their org's tenant, the System Tenant where the org is NULL or gone
    for wid, org_id, tenant in rows(db, "SELECT id, org_id, tenant_id FROM workflows"):
        assert tenant == tenant_of.get(org_id, system), (wid, org_id)
    gone = rows(db, "SELECT count(*) FROM workflows WHERE org_id IS NOT NULL AND org_id NOT IN (SELECT id FROM org)")
    assert gone[0][0] > 0  # the demo plants them
    # children follow their parent, even endpoints whose own org_id says otherwise
    assert rows(db, "SELECT count(*) FROM rules r JOIN workflows w ON w.id = r.workflow_id "
                    "WHERE r.tenant_id <> w.tenant_id")[0][0] == 0
    disagree = rows(db, "SELECT e.tenant_id, w.tenant_id, e.org_id, w.org_id FROM endpoints e "
                        "JOIN workflows w ON w.id = e.workflow_id WHERE e.org_id IS DISTINCT FROM w.org_id")
    assert disagree and all(e == w for e, w, _, _ in disagree)
    # the application's updated_at trigger did not fire for the backfill's updates
    assert rows(db, "SELECT id, updated_at FROM workflows ORDER BY id") == updated_at

    # users: one per legacy user but the duplicates, same uuid, normalised email
    legacy_users = rows(db, 'SELECT id, uuid, lower(btrim(email)) FROM "user" ORDER BY id')
    migrated = dict(rows(db, "SELECT uuid, email FROM users"))
    assert len(migrated) == len(legacy_users) - len(duplicates) and duplicates
    for uid, u_uuid, email in legacy_users:
        assert (u_uuid in migrated) == (uid not in duplicates), uid
        if uid not in duplicates:
            assert migrated[u_uuid] == email

    # memberships: exactly the resolved pairs, conflicts at the least privileged role
    user_of = dict(rows(db, 'SELECT u.id, us.id FROM "user" u JOIN users us ON us.uuid = u.uuid'))
    expected = {(user_of[u], tenant_of[o], role) for (u, o), role in resolved.items()}
    assert set(rows(db, "SELECT user_id, tenant_id, role FROM user_tenants")) == expected
    assert conflicts and all(resolved[pair] == "viewer" for pair in conflicts if pair[0] not in duplicates)
    assert array_orphans and not any(pair in resolved for pair in array_orphans)

    # the Drizzle table: 0000 and 0001 at their journal's when, so Drizzle's rule would run a later 0002 only
    migrations = drizzle.journal(drizzle.folder_of(db.params))
    recorded = recorded_frame(db)
    assert [(r.hash, int(r.created_at)) for r in recorded.itertuples()] == [(m.hash, m.when) for m in migrations]
    later = folder_with_0002(tmp_path, drizzle.folder_of(db.params))
    assert drizzle.would_apply(drizzle.journal(later), recorded) == ["0002_workflow_notes"]


def test_ambiguities_list_each_planted_kind_exactly(mapped):
    db = mapped
    _, duplicates, conflicts, array_orphans, _ = legacy_expectations(db)
    with db.session("seed", dry_run=True) as rb:
        frame = legacy_checks.ambiguities(rb)

    def keys(kind):
        return set(frame.loc[frame["kind"] == kind, "key"])

    assert keys(legacy_checks.DUPLICATE_EMAIL) == {str(u) for u in duplicates}
    assert keys(legacy_checks.CONFLICTING_ROLES) == {f"user {u} in org {o}" for u, o in conflicts}
    assert keys(legacy_checks.ARRAY_NO_ORG) == {f"user {u}" for u, _ in array_orphans}
    gone = rows(db, "SELECT id::text FROM workflows WHERE org_id IS NOT NULL AND org_id NOT IN (SELECT id FROM org)")
    assert keys(legacy_checks.ORG_GONE) == {r[0] for r in gone}
    # endpoints whose own org differs from the org their workflow ends in (the System Tenant where it is gone)
    elsewhere = rows(db, "SELECT e.id::text FROM endpoints e JOIN workflows w ON w.id = e.workflow_id "
                         "WHERE e.org_id IS NOT NULL AND coalesce((SELECT id FROM org WHERE id = e.org_id), -1) "
                         "<> coalesce((SELECT id FROM org WHERE id = w.org_id), -1)")
    assert keys(legacy_checks.PARENT_ELSEWHERE) == {r[0] for r in elsewhere} and elsewhere
    assert keys(legacy_checks.NO_ROLE) == set()
    summary = legacy_checks.ambiguity_summary(frame)
    assert list(dict.fromkeys(summary["kind"])) == legacy_checks.KINDS
    assert not frame["detail"].str.contains("@").any()  # ids only: no email reaches the archive


def test_seed_again_plans_and_inserts_nothing(mapped):
    db = mapped
    db.run("inspect", "seed")
    counts = rows(db, "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM users), "
                      "(SELECT count(*) FROM user_tenants)")
    with db.session("seed") as rb:
        assert seed.plan(rb).empty
    db.run("seed")
    assert rows(db, "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM users), "
                    "(SELECT count(*) FROM user_tenants)") == counts


def test_a_legacy_role_missing_from_the_map_is_refused_and_nothing_changes(mapped):
    db = mapped
    db.run("inspect")
    db.execute("UPDATE org_user SET role = 'guest' WHERE (org_id, user_id) IN "
               "(SELECT org_id, user_id FROM org_user ORDER BY 1, 2 LIMIT 3)")
    with pytest.raises(RunbookError, match=r"org_user.role 'guest' \(3 rows\).*legacy.roles.*Nothing was changed"):
        db.run("seed")
    assert rows(db, "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM users), "
                    "(SELECT to_regclass('tenancy_runbook.org_tenants') IS NULL)") == [(1, 0, True)]


def test_a_child_of_a_mapped_table_left_unmapped_stops_inspect_before_anything_is_written(mapped):
    db = mapped
    params = params_mod.override(db.params, {"core_tables": {"decision_tables": {"parent": None}}})
    with db.session("inspect", params=params) as rb:
        pre = inspect.preflight(rb).set_index("check")
    assert pre.loc["legacy mapping can run", "status"] == "FAIL"
    assert "core_tables.decision_tables: it references models" in pre.loc["legacy mapping can run", "detail"]
    assert "parent: {table: models, column: model_id}" in pre.loc["legacy mapping can run", "detail"]
    with pytest.raises(RunbookError, match="legacy mapping can run"):
        db.run("inspect", params=params)
    assert rows(db, "SELECT to_regnamespace('tenancy_runbook') IS NULL, (SELECT count(*) FROM tenants)") == [(True, 1)]


def test_a_legacy_role_missing_from_the_map_stops_inspect(mapped):
    db = mapped
    db.execute("UPDATE org_user SET role = 'guest' WHERE (org_id, user_id) IN "
               "(SELECT org_id, user_id FROM org_user ORDER BY 1, 2 LIMIT 2)")
    with pytest.raises(RunbookError, match=r"legacy mapping can run.*org_user.role 'guest' \(2 rows\)"):
        db.run("inspect")
    assert rows(db, "SELECT to_regnamespace('tenancy_runbook') IS NULL")[0][0] is True


def test_rollback_deletes_what_the_mapping_inserted_and_restores_the_legacy_schema(mapped, mapped_migrated):
    legacy_schema = mapped.schema_dump(exclude_ledger=True)  # the template, as mapped_migrated was before
    db = mapped_migrated
    with db.session("rollback") as rb:
        assert rollback.foreign_rows(rb).empty  # the mapped tenants are the runbook's own
        rollback.apply(rb)
        assert rollback.assert_rolled_back(rb).startswith("the database is back")
    assert rows(db, "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM users), "
                    "(SELECT count(*) FROM user_tenants), (SELECT count(*) FROM tenancy_runbook.org_tenants)") == \
        [(1, 0, 0, 0)]
    assert db.schema_dump(exclude_ledger=True) == legacy_schema


def test_rollback_still_refuses_for_rows_of_a_tenant_the_application_created(mapped_migrated):
    db = mapped_migrated
    db.execute("INSERT INTO tenants (name) VALUES ('signed up after the migration')")
    db.execute("UPDATE knowledge_bases SET tenant_id = (SELECT max(id) FROM tenants) WHERE id = 1")
    with db.session("rollback") as rb:
        with pytest.raises(RunbookError, match=r"knowledge_bases: 1, tenants: 1\b.*Nothing was changed"):
            rollback.apply(rb)
    assert rows(db, "SELECT count(*) FROM users")[0][0] > 0


def test_after_constrain_a_remap_moves_parent_and_child_together(mapped_migrated):
    """A workflow and its rule written on the System Tenant behind the rollout trigger (as a replication
    subscriber would) after the migration: a backfill re-run moves the workflow to its org's tenant, and the
    rule follows through the composite key's ON UPDATE CASCADE. That needs the foreign keys to act: the
    backfill skips the application's triggers (session_replication_role = replica, which also silences
    foreign keys) only while no foreign key includes tenant_id."""
    db = mapped_migrated
    system = db.scalar("SELECT id FROM tenants WHERE uuid = '00000000-0000-4000-8000-000000000001'")
    with db.connect(autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        wid = conn.execute("INSERT INTO workflows (uuid, org_id, name, tenant_id) VALUES (gen_random_uuid(), 1, "
                           "'written later', %s) RETURNING id", (system,)).fetchone()[0]
        conn.execute("INSERT INTO rules (uuid, workflow_id, name, expression, tenant_id) VALUES (gen_random_uuid(), "
                     "%s, 'r', 'true', %s)", (wid, system))
    db.run("backfill")
    tenant = db.scalar("SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = 1")
    assert rows(db, "SELECT w.tenant_id, r.tenant_id FROM workflows w JOIN rules r ON r.workflow_id = w.id "
                    "WHERE w.id = %s", (wid,)) == [(tenant, tenant)]


def test_backfill_before_the_mapping_is_seeded_refuses_and_changes_nothing(mapped):
    db = mapped
    db.run("inspect")
    before = db.schema_dump(exclude_ledger=True)
    with pytest.raises(RunbookError, match=r"legacy mapping is not in the ledger yet \(workflows, models, .*run "
                                           r"02_seed first. Nothing was changed"):
        db.run("backfill")
    assert db.schema_dump(exclude_ledger=True) == before


def test_a_legacy_user_whose_email_the_application_already_has_is_listed_not_merged(mapped):
    """A users row of another uuid already holds the normalised email: that legacy user is not migrated (no
    merge), is listed, and validate still proves every legacy user migrated or listed."""
    db = mapped
    email = db.scalar("""SELECT lower(btrim(email)) FROM "user" WHERE id = 5""")
    db.execute("INSERT INTO users (email, name) VALUES (%s, 'signed up in the new application')", (email,))
    checks = db.run()["validate"]["checks"].set_index("check")
    assert checks["passed"].all(), checks[~checks["passed"]].to_string()
    assert checks.loc["each legacy user is migrated or listed as a duplicate", "actual"] == \
        str(db.scalar('SELECT count(*) FROM "user"'))
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.user_map WHERE legacy_user_id = 5") == 0
    assert db.scalar("SELECT name FROM users WHERE email = %s", (email,)) == "signed up in the new application"
    with db.session("seed", dry_run=True) as rb:
        frame = legacy_checks.ambiguities(rb)
    listed = frame[(frame["kind"] == legacy_checks.DUPLICATE_EMAIL) & (frame["key"] == "5")]
    assert list(listed["detail"]) == ["normalised email already used by another users row"]


def test_a_child_moved_off_its_parents_tenant_fails_the_conservation_check(mapped_migrated):
    """The check that children carry their parent's tenant is a join on tenant_id and the key (what Citus joins
    shard to shard): a rule whose workflow sits under another tenant finds no parent there and is counted."""
    db = mapped_migrated
    check = "child rows carry their parent's tenant (workflows via workflow_id)"

    def counted():
        with db.session("validate") as rb:
            frame = validate.checks(rb)
        row = frame[(frame["check"] == check) & (frame["table"] == "rules")].iloc[0]
        return row["actual"], bool(row["passed"])

    assert counted() == ("0", True)
    other = db.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'elsewhere') RETURNING id")
    composite = db.scalar("SELECT conname FROM pg_constraint WHERE conrelid = 'rules'::regclass AND contype = 'f' "
                          "AND confrelid = 'workflows'::regclass AND cardinality(conkey) = 2")
    db.execute(sql.SQL("ALTER TABLE rules DROP CONSTRAINT {}").format(sql.Identifier(composite)))
    db.execute_unrecorded("UPDATE rules SET tenant_id = %s WHERE id = (SELECT min(id) FROM rules)", (other,))
    assert counted() == ("1", False)
