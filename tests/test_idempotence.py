"""Dry runs change nothing; re-running any phase after success changes nothing."""

from runbook_helpers.run.session import PHASES


def app_state(db):
    """The schema (without the runbook's ledger) and every core table's content."""
    dump = db.schema_dump()
    app_schema = "\n".join(l for l in dump.splitlines() if "tenancy_runbook" not in l)
    with db.connect() as conn:
        data = {t: conn.execute(f"SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {t} x").fetchone()[0]
                for t in db.params.tables + ["tenants", "users", "user_tenants", "node_types"]}
    return app_schema, data


def test_a_dry_run_of_every_phase_changes_nothing(db):
    before_dump = db.schema_dump()
    before = app_state(db)
    out = db.run(*PHASES, dry_run=True)
    assert db.schema_dump() == before_dump  # not even the ledger schema is created
    assert app_state(db) == before
    assert "dry run" in out["validate"]["verdict"]
    planned = out["constrain"]["applied"]
    assert len(planned) and set(planned["outcome"]) == {"dry run"}


def test_a_dry_run_after_inspect_changes_nothing_either(db):
    db.run("inspect")
    before = db.schema_dump(), app_state(db)
    db.run("seed", "backfill", "constrain", "validate", dry_run=True)
    assert (db.schema_dump(), app_state(db)) == before
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.statement_journal") == 0


def test_rerunning_every_phase_after_success_changes_nothing(db):
    db.run(*PHASES)
    before = app_state(db)
    journal_before = db.scalar("SELECT count(*) FROM tenancy_runbook.statement_journal")
    again = db.run(*PHASES)
    assert app_state(db) == before
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.statement_journal") == journal_before
    assert again["seed"]["applied"].empty and again["constrain"]["applied"].empty
    assert set(again["backfill"]["report"].summary["outcome"]) == {"nothing to do"}
    assert again["validate"]["checks"]["passed"].all()
