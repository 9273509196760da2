"""01_inspect: preflight, inventory, baseline (captured once, never overwritten) and the plan."""

import pytest

from conftest import CORE_ONLY
from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import inspect
from runbook_helpers.phases.headless import run_phase


def by_check(frame):
    return {r.check: r for r in frame.itertuples()}


def test_preflight_passes_on_the_demo_database(db):
    rb = db.session("inspect")
    try:
        pre = inspect.preflight(rb)
    finally:
        rb.close()
    assert set(pre["status"]) == {"ok"}, pre[pre["status"] != "ok"].to_dict("records")
    assert inspect.assert_ready(pre) == "preflight passed (0 warnings)"


def test_a_spec_table_that_does_not_exist_fails_preflight_and_changes_nothing(db):
    params = params_mod.override(db.params, {"core_tables": {"no_such_table": {}}})
    before = db.schema_dump()
    rb = db.session("inspect", params=params)
    try:
        pre = inspect.preflight(rb)
        row = by_check(pre)["spec tables exist"]
        assert row.status == "FAIL"
        assert "core table no_such_table" in row.detail
        with pytest.raises(RunbookError, match="(?s)preflight failed.*spec tables exist"):
            inspect.assert_ready(pre)
    finally:
        rb.close()
    with pytest.raises(RunbookError, match="no_such_table"):
        db.run("inspect", params=params)  # the whole notebook sequence
    assert db.schema_dump() == before


def test_any_failed_preflight_stores_nothing(db):
    db.execute("ALTER TABLE models ADD COLUMN tenant_id integer")  # a tenant_id of the wrong type
    params = db.params
    before = db.schema_dump()
    with pytest.raises(RunbookError, match="(?s)preflight failed.*existing tenant_id columns are bigint"):
        db.run("inspect", params=params)
    assert db.schema_dump() == before  # not even the ledger schema


def test_sessions_in_the_way_and_invalid_indexes_are_reported(db):
    with db.connect() as blocker:
        blocker.execute("SELECT 1 FROM models LIMIT 1")  # holds ACCESS SHARE on models until rollback
        with db.connect(autocommit=True) as other:
            with pytest.raises(Exception):
                other.execute("CREATE UNIQUE INDEX CONCURRENTLY models_kind_uniq ON models (kind)")  # leaves INVALID
        rb = db.session("inspect")
        try:
            checks = by_check(inspect.preflight(rb))
        finally:
            rb.close()
        blocker.rollback()
    assert checks["sessions in the way"].status == "warn"
    assert "models:AccessShareLock" in checks["sessions in the way"].detail
    assert checks["no INVALID indexes"].status == "warn"
    assert "models.models_kind_uniq" in checks["no INVALID indexes"].detail


def test_inventory_describes_each_spec_table(db):
    rb = db.session("inspect")
    try:
        inv = inspect.inventory(rb).set_index("table")
    finally:
        rb.close()
    assert list(inv.index) == db.params.tables + ["node_types"]
    assert inv.loc["node_types", "kind"] == "shared"
    assert inv.loc["workflows", "tenant_id"] == "absent"
    kb_total = int(inv.loc["knowledge_bases", "rows"])
    assert inv.loc["knowledge_bases", "tenant_id"] == f"nullable, {kb_total - kb_total // 3:,} NULL"
    assert inv.loc["widgets", "primary key"] == "template_id, position"
    assert inv.loc["workflows", "triggers"] == "workflows_set_updated_at"
    assert inv.loc["workflows", "dependent views"] == "active_workflows"
    assert inv.loc["workflows", "counted"] == "exact"
    assert int(inv.loc["workflows", "rows"]) == db.scalar("SELECT count(*) FROM workflows")
    assert set(inv["rls"]) == {"off"} and set(inv["partitioning"]) == {"no"}


def test_large_tables_are_estimated_and_say_so(db):
    params = params_mod.override(db.params, {"inspect": {"exact_count_below": 100}})
    rb = db.session("inspect", params=params)
    try:
        inv = inspect.inventory(rb).set_index("table")
    finally:
        rb.close()
    assert inv.loc["workflows", "counted"] == "estimate"
    assert inv.loc["knowledge_bases", "tenant_id"] == "nullable (NULLs not counted: large table)"
    assert inv.loc["node_types", "counted"] == "exact"


def test_unique_constraints_without_tenant_id_are_listed_and_assessed(db):
    rb = db.session("inspect")
    try:
        uniques = inspect.unique_constraints(rb)
    finally:
        rb.close()
    names = dict(zip(uniques["name"], uniques["assessment"]))
    assert names["workflows_org_id_name_key"].startswith("business key")
    assert names["endpoints_method_path_key"].startswith("business key")
    assert names["workflows_uuid_key"].startswith("global identifier")
    # composite (template_id, position), but led by the key of its parent template, which has one tenant
    assert names["widgets_pkey"].startswith("scoped by its parent (widgets_template_id_fkey)")


def test_baseline_is_captured_once_and_never_overwritten(db):
    first = run_phase(db.session("inspect"))["baseline"].set_index("table")
    assert set(first["status"]) == {"captured now"}
    assert int(first.loc["workflows", "rows"]) == db.scalar("SELECT count(*) FROM workflows")
    db.execute("DELETE FROM endpoints WHERE id = 1")
    second = run_phase(db.session("inspect"))["baseline"].set_index("table")
    assert all(s.startswith("kept from") for s in second["status"])
    assert second.loc["endpoints", "rows"] == first.loc["endpoints", "rows"]
    assert second.loc["endpoints", "fingerprint"] == first.loc["endpoints", "fingerprint"]
    assert db.scalar("SELECT row_count FROM tenancy_runbook.baseline WHERE table_name = 'endpoints'") == \
        int(first.loc["endpoints", "rows"])


def test_fingerprint_changes_when_one_value_changes_and_not_with_row_order(db):
    from runbook_helpers.db import fingerprint
    rb = db.session("inspect")
    try:
        cols = ["id", "uuid", "name", "category", "body", "created_at", "updated_at"]
        _, before = fingerprint.measure(rb.engine, "public", "templates", cols)
        db.execute("CLUSTER templates USING templates_uuid_key")  # physical order changes, content does not
        _, reordered = fingerprint.measure(rb.engine, "public", "templates", cols)
        db.execute("UPDATE templates SET body = body || '{\"x\": 1}' WHERE id = 7")
        _, changed = fingerprint.measure(rb.engine, "public", "templates", cols)
    finally:
        rb.close()
    assert before == reordered
    assert changed != before


def test_plan_lists_every_statement_with_its_lock(db):
    plan = run_phase(db.session("inspect"))["plan"]
    wf = plan[plan["table"] == "workflows"]
    # the core steps first (3 backfill + 8 constrain), then composite keys and row level security
    core = run_phase(db.session("inspect", dry_run=True, params=params_mod.override(db.params, CORE_ONLY)))["plan"]
    assert list(core[core["table"] == "workflows"]["phase"]) == ["backfill"] * 3 + ["constrain"] * 8
    assert list(wf["action"])[:11] == list(core[core["table"] == "workflows"]["action"])
    assert list(wf["action"])[:3] == ["add tenant_id with the System Tenant for every existing row",
                                      "install the rollout triggers (and drop the DEFAULT)",
                                      "open the record of the application's writes (one read of every row)"]
    # every column before any trigger (a parent's trigger reads its children's tenant_id), then the fills
    backfill = list(plan[plan["phase"] == "backfill"]["action"])
    assert max(i for i, a in enumerate(backfill) if a.startswith("add tenant_id")) < \
        min(i for i, a in enumerate(backfill) if a.startswith("install the rollout triggers"))
    assert "enable row level security" in set(wf["action"])
    assert wf.iloc[0]["statement"].startswith('ALTER TABLE "public"."workflows" ADD COLUMN "tenant_id" bigint DEFAULT ')
    assert "REFERENCES" not in wf.iloc[0]["statement"]
    kb = plan[(plan["table"] == "knowledge_bases") & (plan["phase"] == "backfill")]
    assert list(kb["action"]) == ["install the rollout triggers",
                                  "open the record of the application's writes (one read of every row)",
                                  "fill NULL tenant_id in batches of 2,000 (keyset on (id))",
                                  # issue 15: then a plain VACUUM (ANALYZE) of the rows the batches rewrote
                                  "VACUUM (ANALYZE): clear the dead row versions the batches left, refresh the "
                                  "statistics"]
    # ACCESS EXCLUSIVE only ever for metadata-only statements
    exclusive = plan[plan["lock"].str.startswith("ACCESS EXCLUSIVE")]
    assert (exclusive["lock"].str.contains("metadata only")).all()
    assert not exclusive["statement"].str.contains("VALIDATE|CREATE INDEX").any()
    scans = plan[plan["statement"].str.contains("VALIDATE|CREATE INDEX")]
    assert (scans["lock"].str.startswith("SHARE UPDATE EXCLUSIVE")).all()
    assert plan[plan["statement"].str.contains("CREATE INDEX")]["statement"].str.contains("CONCURRENTLY").all()
