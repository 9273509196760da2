"""01_inspect: preflight, inventory, baseline (captured once, never overwritten) and the plan."""

import pytest

from conftest import CORE_ONLY, LEGACY_ON
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


# --- tables in neither core_tables nor shared_tables (issue 27, build 5): listed, never ignored silently ---------

def unlisted(db, params=None):
    rb = db.session("inspect", params=params)
    try:
        return inspect.unlisted_tables(rb)
    finally:
        rb.close()


EXTRA_TABLES = """
CREATE TABLE schema_migrations (version text PRIMARY KEY);
INSERT INTO schema_migrations VALUES ('20240101'), ('20240201'), ('20240301');
CREATE TABLE plans (id bigint PRIMARY KEY, name text NOT NULL);
INSERT INTO plans VALUES (1, 'free'), (2, 'team');
ALTER TABLE workflows ADD COLUMN plan_id bigint CONSTRAINT workflows_plan_id_fkey REFERENCES plans (id);
CREATE TABLE workflow_notes (id bigserial PRIMARY KEY, workflow_id bigint NOT NULL
  CONSTRAINT workflow_notes_workflow_id_fkey REFERENCES workflows (id), body text);
INSERT INTO workflow_notes (workflow_id, body) SELECT id, 'note' FROM workflows ORDER BY id LIMIT 4;
CREATE TABLE widget_clicks (template_id bigint, position integer, CONSTRAINT widget_clicks_widget_fkey
  FOREIGN KEY (template_id, position) REFERENCES widgets (template_id, position));
CREATE TABLE "FeatureFlags" ("flagName" text PRIMARY KEY);
INSERT INTO "FeatureFlags" VALUES ('beta');
CREATE TABLE events (at date NOT NULL, kind text) PARTITION BY RANGE (at);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO events SELECT date '2024-12-30' + i, 'click' FROM generate_series(1, 5) i;
CREATE VIEW plan_names AS SELECT name FROM plans;
CREATE TABLE audit_log (at date NOT NULL, what text) PARTITION BY RANGE (at);
CREATE TABLE audit_log_2024 PARTITION OF audit_log FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
"""
LISTED_AUDIT_LOG = {"shared_tables": ["node_types", "audit_log"]}  # a partitioned shared table: its partitions too


def test_tables_in_neither_list_are_listed_with_rows_and_references(db):
    db.execute(EXTRA_TABLES)
    out = run_phase(db.session("inspect", params=params_mod.override(db.params, LISTED_AUDIT_LOG)))
    frame = out["unlisted"].set_index("table")
    # the runbook's own tables (tenants, users, user_tenants), its ledger (created by this run), the spec's tables,
    # the partitions of a listed table, an unlisted table's partitions and views are not listed
    assert sorted(frame.index) == sorted(["FeatureFlags", "events", "org", "org_user", "plans", "schema_migrations",
                                          "user", "widget_clicks", "workflow_notes"])
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline") > 0  # the ledger exists, yet is not listed
    assert frame.loc["schema_migrations", "rows"] == 3 and frame.loc["schema_migrations", "counted"] == "exact"
    assert frame.loc["events", "rows"] == 5  # its partitions' rows
    assert frame.loc["FeatureFlags", "rows"] == 1
    assert frame.loc["user", "rows"] == db.scalar('SELECT count(*) FROM "user"')
    assert frame.loc["plans", "referenced by core tables"] == "workflows.workflows_plan_id_fkey (plan_id -> plans)"
    assert frame.loc["plans", "references core tables"] == ""
    assert "most likely shared" in frame.loc["plans", "what to do"]
    assert "shared_tables" in frame.loc["plans", "what to do"]
    assert frame.loc["workflow_notes", "references core tables"] == \
        "workflow_notes.workflow_notes_workflow_id_fkey (workflow_id -> workflows)"
    assert frame.loc["workflow_notes", "referenced by core tables"] == ""
    assert "parent: {table: workflows, column: workflow_id}" in frame.loc["workflow_notes", "what to do"]
    assert frame.loc["widget_clicks", "what to do"] == (  # a composite key: no `parent` to suggest
        "add it to core_tables: it references the tenant table widgets (widget_clicks_widget_fkey), so its rows "
        "belong to that row's tenant")
    assert frame.loc["schema_migrations", "referenced by core tables"] == ""
    assert frame.loc["schema_migrations", "references core tables"] == ""
    assert frame.loc["schema_migrations", "what to do"].startswith(
        "add it to core_tables if its rows belong to a tenant, or to shared_tables if every tenant shares it")
    assert frame.loc["user", "referenced by core tables"] == "workflows.workflows_created_by_fkey (created_by -> user)"
    assert all(frame["size"].str.endswith("B"))


def test_large_unlisted_tables_are_estimated_and_say_so(db):
    db.execute(EXTRA_TABLES + "ANALYZE")
    frame = unlisted(db, params_mod.override(db.params, {"inspect": {"exact_count_below": 100}})).set_index("table")
    assert frame.loc["schema_migrations", "counted"] == "exact"
    assert frame.loc["user", "counted"] == "estimate"
    assert frame.loc["user", "rows"] == db.scalar("SELECT reltuples::bigint FROM pg_class WHERE oid = '\"user\"'::regclass")


def test_the_demo_lists_its_legacy_tables_and_nothing_else(db):
    frame = unlisted(db).set_index("table")
    assert list(frame.index) == ["org", "org_user", "user"]
    for table in frame.index:
        assert frame.loc[table, "rows"] == db.scalar(f'SELECT count(*) FROM "{table}"') > 0
    assert frame.loc["org", "referenced by core tables"] == "" and frame.loc["org_user", "references core tables"] == ""
    assert frame.loc["user", "referenced by core tables"] == "workflows.workflows_created_by_fkey (created_by -> user)"
    assert set(frame["known as"]) == {""}  # the legacy mapping is off in the tests' params
    # with the mapping on (as ci.yaml and local.yaml have it) they are the tenant source: nothing to do
    legacy = unlisted(db, params_mod.override(db.params, LEGACY_ON)).set_index("table")
    assert list(legacy.index) == ["org", "org_user", "user"]
    assert legacy.loc["org", "known as"] == "legacy.source.tenants"
    assert legacy.loc["org_user", "known as"] == "legacy.source.memberships.0"
    assert legacy.loc["user", "known as"] == "legacy.source.users, legacy.source.memberships.1"
    assert all(legacy["what to do"].str.startswith("nothing: params name it"))


def test_a_table_an_extension_owns_is_listed_as_the_extension_s(db):
    db.execute("CREATE TABLE spatial_ref_sys (srid integer PRIMARY KEY); ALTER EXTENSION plpgsql ADD TABLE spatial_ref_sys")
    frame = unlisted(db).set_index("table")
    assert frame.loc["spatial_ref_sys", "known as"] == "extension plpgsql"
    assert frame.loc["spatial_ref_sys", "what to do"].startswith("nothing: extension plpgsql owns it")


def test_when_every_table_is_listed_one_line_says_so(db):
    params = params_mod.override(db.params, {"shared_tables": ["node_types", "org", "org_user", "user"]})
    frame = unlisted(db, params)
    assert frame.to_dict("records") == [
        {"unlisted tables": "every table of schema public is in core_tables or shared_tables"}]
    assert run_phase(db.session("inspect", params=params))["unlisted"].equals(frame)
