"""05_validate: every check passes after a migration, and each check turns red when its property breaks."""

import pytest

from conftest import CORE_ONLY
from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import validate


COUNT = "rows the application did not write: count unchanged"
FINGERPRINT = "rows the application did not write: pre-existing columns unchanged (fingerprint)"


def checks_of(db):
    with db.session("validate") as rb:
        return validate.checks(rb)


def failing(frame):
    return {(r.check, r.table) for r in frame[~frame["passed"]].itertuples()}


@pytest.fixture
def migrated(migrated_db):
    return migrated_db("inspect", "seed", "backfill", "constrain")


@pytest.fixture
def core_migrated(migrated_db, ci_params):
    """Without composite keys or RLS: the core checks alone decide (a composite (tenant_id, id) unique key
    would stand in for the tenant_id index)."""
    return migrated_db("inspect", "seed", "backfill", "constrain", params=params_mod.override(ci_params, CORE_ONLY))


def test_all_checks_pass_after_the_migration(migrated):
    out = migrated.run("validate")["validate"]
    assert out["checks"]["passed"].all()
    assert out["isolation"]["passed"].all() and len(out["isolation"]) > 50
    assert (out["lint"]["status"] != "FAIL").all()
    total = len(out["checks"]) + len(out["lint"]) + len(out["isolation"])
    assert out["verdict"] == f"all {total} checks passed"
    per_table = out["checks"][out["checks"]["table"] == "workflows"]["check"].tolist()
    for check in ("tenant_id NOT NULL", "foreign key to tenants validated", "index led by tenant_id valid",
                  "rows without tenant", "rows whose tenant does not exist", COUNT, FINGERPRINT):
        assert check in per_table
    kept = out["checks"][out["checks"]["check"] == "every uniqueness of before is kept"]
    assert "workflows.workflows_pkey" in set(kept["table"]) and kept["passed"].all()


def test_a_changed_value_fails_the_fingerprint_check(migrated):
    migrated.execute_unrecorded("UPDATE rules SET expression = expression || ' ' WHERE id = 3")
    assert failing(checks_of(migrated)) == {(FINGERPRINT, "rules")}


def test_a_lost_row_fails_count_and_fingerprint(migrated):
    migrated.execute_unrecorded("DELETE FROM widgets WHERE template_id = 1 AND position = 0")
    assert failing(checks_of(migrated)) == {(COUNT, "widgets"), (FINGERPRINT, "widgets")}


def test_the_applications_own_writes_pass_and_are_counted(migrated):
    """Written as the application writes (the rollout triggers record it): nothing fails, and each write is
    attributed to the application, with its key in application_write_keys."""
    migrated.execute("UPDATE rules SET expression = expression || ' ' WHERE id = 3")
    migrated.execute("DELETE FROM widgets WHERE template_id = 1 AND position = 0")
    migrated.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'new', 'x')")
    assert failing(checks_of(migrated)) == set()
    with migrated.session("validate") as rb:
        writes = validate.application_writes(rb).set_index("table")
        keys = validate.application_write_keys(rb)
    assert writes.loc["rules", "updated"] == 1 and writes.loc["widgets", "deleted"] == 1
    assert writes.loc["templates", "inserted"] == 1 and writes.loc["models"].iloc[1:].sum() == 0
    assert set(zip(keys["table"], keys["change"])) == {("rules", "updated"), ("widgets", "deleted"),
                                                        ("templates", "inserted")}
    assert list(keys[keys["table"] == "rules"]["key"]) == ['["3"]']


def test_a_change_the_runbook_makes_during_the_backfill_fails_validate(db, monkeypatch):
    """The failpoint corrupts one row inside a batch's own transaction, as a runbook bug would: validate
    finds it although the application wrote meanwhile."""
    db.run("inspect", "seed")
    monkeypatch.setenv("RUNBOOK_FAULT", "backfill.mid_batch=knowledge_bases@sql")
    monkeypatch.setenv("RUNBOOK_FAULT_SQL", "UPDATE knowledge_bases SET name = name || ' (changed)' WHERE id = "
                                            "(SELECT min(id) FROM knowledge_bases WHERE tenant_id IS NOT NULL)")
    db.execute("UPDATE knowledge_bases SET name = 'the application' WHERE id = 2")
    db.run("backfill", "constrain")
    monkeypatch.delenv("RUNBOOK_FAULT")
    db.execute("UPDATE knowledge_bases SET name = 'the application again' WHERE id = 5")
    assert failing(checks_of(db)) == {(FINGERPRINT, "knowledge_bases")}


def test_unvalidated_fk_and_invalid_index_fail(core_migrated):
    migrated = core_migrated
    migrated.execute("ALTER TABLE models DROP CONSTRAINT models_tenant_id_tenants_id_fk")
    migrated.execute("ALTER TABLE models ADD CONSTRAINT models_tenant_id_tenants_id_fk FOREIGN KEY (tenant_id) "
                     "REFERENCES tenants(id) NOT VALID")
    migrated.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'templates_tenant_id_idx'::regclass")
    assert failing(checks_of(migrated)) == {("foreign key to tenants validated", "models"),
                                             ("index led by tenant_id valid", "templates")}


def test_orphans_and_nulls_fail(core_migrated):
    migrated = core_migrated
    migrated.execute("ALTER TABLE endpoints DROP CONSTRAINT endpoints_tenant_id_tenants_id_fk")
    migrated.execute("ALTER TABLE endpoints ALTER COLUMN tenant_id DROP NOT NULL")
    migrated.execute("UPDATE endpoints SET tenant_id = 999999 WHERE id = 1")
    migrated.execute_unrecorded("UPDATE endpoints SET tenant_id = NULL WHERE id = 2")  # behind the rollout trigger
    assert failing(checks_of(migrated)) == {
        ("tenant_id NOT NULL", "endpoints"), ("foreign key to tenants validated", "endpoints"),
        ("rows without tenant", "endpoints"), ("rows whose tenant does not exist", "endpoints")}


def test_a_broken_smoke_query_and_a_touched_shared_table_fail(migrated):
    params = params_mod.override(migrated.params, {"validate": {"smoke_queries": [
        {"name": "typo", "sql": "SELECT nam FROM workflows"}]}})
    migrated.execute("ALTER TABLE node_types ADD COLUMN tenant_id bigint")
    rb = migrated.session("validate", params=params)
    try:
        frame = validate.checks(rb)
    finally:
        rb.close()
    assert failing(frame) == {("smoke query runs", "typo"), ("shared table left alone", "node_types")}
    actual = frame[frame["table"] == "typo"]["actual"].iloc[0]
    assert actual.startswith('error: column "nam" does not exist')


def test_smoke_queries_cannot_change_anything(migrated):
    params = params_mod.override(migrated.params, {"validate": {"smoke_queries": [
        {"name": "sneaky write", "sql": "DELETE FROM workflows"}]}})
    rb = migrated.session("validate", params=params)
    try:
        frame = validate.checks(rb)
    finally:
        rb.close()
    assert "read-only transaction" in frame[frame["table"] == "sneaky write"]["actual"].iloc[0]
    assert migrated.scalar("SELECT count(*) FROM workflows") > 0


def test_a_smoke_query_declared_as_writing_runs_and_is_rolled_back(migrated):
    """A function that creates a temporary table cannot run READ ONLY; declared `writes: true` it runs in a
    read-write transaction that is rolled back, and the result says so."""
    migrated.execute("CREATE FUNCTION workflow_total() RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN "
                     "CREATE TEMP TABLE smoke_tmp ON COMMIT DROP AS SELECT id FROM workflows; "
                     "RETURN (SELECT count(*) FROM smoke_tmp); END $$")
    content = "SELECT count(*), md5(string_agg(name, ',' ORDER BY id)) FROM workflows"
    with migrated.connect() as conn:
        before = conn.execute(content).fetchone()
    params = params_mod.override(migrated.params, {"validate": {"smoke_queries": [
        {"name": "temp table, read only", "sql": "SELECT workflow_total()"},
        {"name": "temp table", "sql": "SELECT workflow_total()", "writes": True},
        {"name": "a write", "sql": "UPDATE workflows SET name = name || ' smoke'", "writes": True}]}})
    rb = migrated.session("validate", params=params)
    try:
        frame = validate.checks(rb).set_index("table")
    finally:
        rb.close()
    assert not frame.loc["temp table, read only", "passed"]
    assert "read-only transaction" in frame.loc["temp table, read only", "actual"]
    for name in ("temp table", "a write"):
        assert frame.loc[name, "passed"], frame.loc[name].to_dict()
        assert frame.loc[name, "actual"] == "runs (its writes rolled back)"
    with migrated.connect() as conn:
        assert conn.execute(content).fetchone() == before


def test_the_verdict_raises_with_every_failed_check(migrated):
    migrated.execute_unrecorded("DELETE FROM decision_tables WHERE id = 5")
    with pytest.raises(RunbookError) as err:
        migrated.run("validate")
    assert "2 of" in str(err.value)
    assert f"{COUNT} [decision_tables]" in str(err.value)
    assert migrated.scalar("SELECT status FROM tenancy_runbook.phase_runs WHERE phase = 'validate'") == "failed"


BEFORE = "rows the application wrote before the record opened: listed by key"


def test_writes_between_the_baseline_and_the_record_are_listed_by_key(db):
    """The application writes after 01_inspect's baseline and before 03_backfill opens the record of its writes:
    validate lists each of those rows by key (inserted, updated, deleted), counts them in a check of their own,
    and passes, since the application wrote them (the runbook changes no core row before the record opens)."""
    db.run("inspect", "seed")
    db.execute("UPDATE rules SET expression = expression || ' ' WHERE id = 3")
    db.execute("DELETE FROM widgets WHERE template_id = 1 AND position = 0")
    db.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), 'before the record', 'x')")
    new_template = db.scalar("SELECT id FROM templates WHERE name = 'before the record'")
    db.run("backfill", "constrain")
    db.execute("UPDATE rules SET expression = expression || ' ' WHERE id = 4")  # recorded by the trigger
    frame = checks_of(db)
    assert failing(frame) == set()
    before = frame[frame["check"] == BEFORE].set_index("table")
    assert set(before.index) == set(db.params.tables)
    assert before.loc["rules", "actual"] == "1 updated, each listed by key", before.loc["rules"].to_dict()
    assert before.loc["widgets", "actual"] == "1 deleted, each listed by key"
    assert before.loc["templates", "actual"] == "1 inserted, each listed by key"
    assert before.loc["models", "actual"] == "none"
    with db.session("validate") as rb:
        writes = validate.application_writes(rb).set_index("table")
        keys = validate.application_write_keys(rb)
    assert writes.loc["rules", "before the record opened"] == "1 updated (by key)"
    assert writes.loc["templates", "before the record opened"] == "+1 rows: 1 inserted (by key)"
    assert writes.loc["rules", "updated"] == 1  # the write after the record opened
    early = keys[keys["window"] == "before the record opened"]
    assert set(zip(early["table"], early["key"], early["change"])) == {
        ("rules", '["3"]', "updated"), ("widgets", '["1", "0"]', "deleted"),
        ("templates", f'["{new_template}"]', "inserted")}
    late = keys[keys["window"] == "recorded"]
    assert set(zip(late["table"], late["key"], late["change"])) == {("rules", '["4"]', "updated")}


def test_writes_before_the_record_that_cannot_be_listed_by_key_fail(db):
    """Without the per-row baseline (a baseline captured before it was kept) a change before the record cannot be
    listed by key: the check says why and fails rather than pass on a count."""
    db.run("inspect", "seed")
    db.execute("UPDATE tenancy_runbook.baseline SET per_row = false WHERE table_name = 'rules'")
    db.execute("DELETE FROM tenancy_runbook.baseline_rows WHERE table_name = 'rules'")
    db.execute("UPDATE rules SET expression = expression || ' ' WHERE id = 3")
    db.run("backfill", "constrain")
    frame = checks_of(db)
    assert failing(frame) == {(BEFORE, "rules")}
    actual = frame[(frame["check"] == BEFORE) & (frame["table"] == "rules")]["actual"].iloc[0]
    assert actual.startswith("content changed, not listed by key: the baseline of rules has no per-row record"), actual


@pytest.mark.parametrize("mapping", [False, True], ids=["system tenant", "legacy mapping"])
def test_the_demos_smoke_queries_name_the_system_tenant_and_find_its_rows(migrated_db, ci_params, mapping):
    """Each smoke query of a tenant table names its tenant (what Citus routes to one shard): tenant 1, the System
    Tenant, with the legacy mapping off or on; each finds rows of it, so a check of a query that found nothing
    cannot pass unnoticed. The view has no tenant_id to name."""
    params = params_mod.override(ci_params, {"legacy": {"enabled": mapping}})
    db = migrated_db("inspect", "seed", "backfill", "constrain", params=params)
    assert db.scalar("SELECT uuid::text FROM tenants WHERE id = 1") == str(params.system_tenant.uuid)
    queries = {q.name: q.sql for q in params.validate_.smoke_queries}
    assert [name for name, text in queries.items() if "tenant_id = 1" not in text] == ["active workflows view"]
    with db.connect() as conn:
        found = {name: len(conn.execute(text).fetchall()) for name, text in queries.items()}
    assert all(found.values()), found
    out = db.run("validate")["validate"]["checks"]
    smoke = out[out["check"] == "smoke query runs"]
    assert len(smoke) == len(queries) and smoke["passed"].all(), smoke.to_dict("records")
