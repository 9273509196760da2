"""The Drizzle hand-over: inspect reports each migration as applied, pending or drifted; after validate the
runbook records 0001 with created_at = the journal's `when`, so Drizzle's own rule runs a later 0002 and
never 0001."""

import json
import shutil

import pandas as pd
import pytest

from runbook_helpers import drizzle, params as params_mod
from runbook_helpers.errors import RunbookError


def folder_with_0002(tmp_path, source):
    """A copy of the application's drizzle folder with a later migration 0002 added to the journal."""
    folder = tmp_path / "drizzle"
    shutil.copytree(source, folder)
    journal = json.loads((folder / "meta" / "_journal.json").read_text())
    last = journal["entries"][-1]
    journal["entries"].append(dict(last, idx=last["idx"] + 1, when=last["when"] + 86_400_000, tag="0002_workflow_notes"))
    (folder / "meta" / "_journal.json").write_text(json.dumps(journal, indent=2))
    (folder / "0002_workflow_notes.sql").write_text('ALTER TABLE "workflows" ADD COLUMN "notes" text;')
    return folder


def status_of(db, params=None):
    with db.session("inspect", params=params) as rb:
        return drizzle.status(rb).set_index("tag")


def recorded_frame(db) -> pd.DataFrame:
    """drizzle.__drizzle_migrations as the runbook reads it: id, hash, created_at."""
    with db.session("inspect") as rb, rb.engine.connect() as conn:
        return drizzle.recorded(conn, db.params)


def recorded_rows(db) -> list[tuple[str, int]]:
    return [(r.hash, int(r.created_at)) for r in recorded_frame(db).itertuples()]


def test_before_the_migration_0000_is_applied_and_0001_pending(db):
    status = status_of(db)
    assert status.loc["0000_legacy_and_tenancy_tables", "state"] == "applied"
    assert status.loc["0001_tenant_columns", "state"] == "pending"
    assert status.loc["0001_tenant_columns", "next migrate"] == "runs"  # and it would fail on tables with rows
    assert status.loc["0000_legacy_and_tenancy_tables", "next migrate"] == "skipped"


def test_after_validate_0001_is_recorded_at_its_when_and_drizzle_would_run_only_0002(db, tmp_path):
    out = db.run()  # every phase; validate hands over after its verdict
    handed = out["validate"]["drizzle"]
    assert list(handed["tag"]) == ["0001_tenant_columns"] and list(handed["outcome"]) == ["recorded"]
    migrations = drizzle.journal(drizzle.folder_of(db.params))
    assert recorded_rows(db) == [(m.hash, m.when) for m in migrations]  # created_at = when, exactly
    assert set(status_of(db)["state"]) == {"applied"}

    # Drizzle's own rule, on the application's folder with a later migration added
    later = folder_with_0002(tmp_path, drizzle.folder_of(db.params))
    rows = recorded_frame(db)
    assert drizzle.would_apply(drizzle.journal(later), rows) == ["0002_workflow_notes"]
    params = params_mod.override(db.params, {"drizzle": {"folder": str(later)}})
    status = status_of(db, params)
    assert status.loc["0001_tenant_columns", "next migrate"] == "skipped"
    assert status.loc["0002_workflow_notes", ["state", "next migrate"]].tolist() == ["pending", "runs"]

    # a second validate records nothing more
    again = db.run("validate")["validate"]["drizzle"]
    assert again.empty
    assert len(recorded_rows(db)) == 2


def test_recording_at_the_wrong_time_would_break_the_rule_both_ways(db, tmp_path):
    """Why created_at must be the journal's when: 'now' would make Drizzle skip a later 0002 (whose when is
    older than now); nothing recorded would make it re-run 0001 on tables that already have tenant_id."""
    later = drizzle.journal(folder_with_0002(tmp_path, drizzle.folder_of(db.params)))
    base = recorded_frame(db)
    as_now = pd.concat([base, pd.DataFrame([{"id": 9, "hash": later[1].hash, "created_at": 4_102_444_800_000}])])
    assert drizzle.would_apply(later, as_now) == []
    assert drizzle.would_apply(later, base) == ["0001_tenant_columns", "0002_workflow_notes"]


def test_a_changed_file_shows_as_drifted_and_blocks_the_hand_over(db, tmp_path):
    folder = tmp_path / "drizzle"
    shutil.copytree(drizzle.folder_of(db.params), folder)
    (folder / "0000_legacy_and_tenancy_tables.sql").write_text((folder / "0000_legacy_and_tenancy_tables.sql").read_text() + "\n-- edited\n")
    params = params_mod.override(db.params, {"drizzle": {"folder": str(folder),
                                                         "record_after_validate": ["0000_legacy_and_tenancy_tables"]}})
    status = status_of(db, params)
    assert status.loc["0000_legacy_and_tenancy_tables", "state"] == "DRIFTED"
    assert "the file changed since" in status.loc["0000_legacy_and_tenancy_tables", "note"]
    with db.session("validate", params=params) as rb:
        with pytest.raises(RunbookError, match="0000_legacy_and_tenancy_tables: a row is recorded at its `when` with another hash"):
            drizzle.hand_over(rb)
    assert len(recorded_rows(db)) == 1


def test_a_tag_the_journal_does_not_have_is_one_clear_message(db):
    params = params_mod.override(db.params, {"drizzle": {"record_after_validate": ["0001_tenant_colums"]}})
    with db.session("validate", params=params) as rb:
        with pytest.raises(RunbookError, match="names 0001_tenant_colums, which the journal .* does not have"):
            drizzle.hand_over(rb)
    assert len(recorded_rows(db)) == 1



def test_rollback_forgets_the_record_so_drizzle_sees_0001_pending_again(db):
    from runbook_helpers.phases import rollback
    before = recorded_rows(db)
    db.run()
    assert len(recorded_rows(db)) == 2
    with db.session("rollback") as rb:
        applied = rollback.apply(rb)
        assert rollback.assert_rolled_back(rb).startswith("the database is back")
    assert "forget Drizzle's record of 0001_tenant_columns" in set(applied["action"])
    assert recorded_rows(db) == before
    assert status_of(db).loc["0001_tenant_columns", "state"] == "pending"


def test_a_migration_recorded_by_command_is_forgotten_by_rollback(db, tmp_path):
    """`runbook drizzle record TAG`: the team generated the end state's migration; the runbook records it,
    and rollback takes back exactly what the runbook recorded."""
    from runbook_helpers.phases import rollback
    later = folder_with_0002(tmp_path, drizzle.folder_of(db.params))
    params = params_mod.override(db.params, {"drizzle": {"folder": str(later)}})
    db.run(params=params)
    with db.session("validate", params=params) as rb:
        with pytest.raises(RunbookError, match="the command names 0002_notes, which the journal .* does not have"):
            drizzle.record_plan(rb, ["0002_notes"])
        done = drizzle.record(rb, drizzle.record_plan(rb, ["0002_workflow_notes"]))
        assert drizzle.record(rb, drizzle.record_plan(rb, ["0002_workflow_notes"])).empty  # once
    assert list(done["outcome"]) == ["recorded"] and len(recorded_rows(db)) == 3
    assert db.scalar("SELECT tag FROM tenancy_runbook.drizzle_records WHERE tag LIKE '0002%%'") == "0002_workflow_notes"
    with db.session("rollback", params=params) as rb:
        applied = rollback.apply(rb)
    assert {"forget Drizzle's record of 0001_tenant_columns", "forget Drizzle's record of 0002_workflow_notes"} <= \
        set(applied["action"])
    assert len(recorded_rows(db)) == 1
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.drizzle_records") == 0


def test_the_schema_hand_over_is_applied_once_and_says_what_it_cannot_express(db):
    from runbook_helpers import drizzle_schema
    db.run("inspect", "seed", "backfill", "constrain")
    with db.session("validate") as rb:
        handover = drizzle_schema.build(rb)
        text = drizzle_schema.markdown(handover)
        changes = drizzle_schema.diff(rb.params, handover)
    source = drizzle_schema.schema_file(db.params).read_text()
    once = drizzle_schema.apply(source, handover)
    assert drizzle_schema.apply(once, handover) == once  # nothing twice
    assert once.count('pgPolicy("tenant_isolation_select"') == len(db.params.tables)
    assert once.count(").enableRLS();") == len(db.params.tables)
    assert 'pgView("active_workflows").with({ securityInvoker: true })' in once
    assert "+  unique(\"workflows_tenant_id_id_unique\").on(t.tenantId, t.id)," in changes
    assert "FORCE ROW LEVEL SECURITY" in text and "schemaFilter" in text
    with pytest.raises(RunbookError, match=r'schema.ts has no pgTable\("widgets"'):
        drizzle_schema.apply(source.replace('pgTable("widgets"', 'pgTable("gadgets"'), handover)
