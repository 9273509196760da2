"""Rollback: migrate, roll back, and the schema and every row equal the legacy database's; it refuses while
other tenants own rows; after success it does nothing."""

import pytest

from runbook_helpers.phases import rollback
from runbook_helpers.errors import RunbookError


def app_schema(db) -> str:
    return db.schema_dump(exclude_ledger=True)  # the ledger stays: it is the record of what was done


def app_rows(db) -> dict:
    with db.connect() as conn:
        return {t: conn.execute(f"SELECT count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) "
                                f"FROM {t} x").fetchone()
                for t in db.params.tables + ["tenants", "users", "user_tenants", "node_types"]}


def roll_back(db, force=False):
    rb = db.session("rollback")
    try:
        applied = rollback.apply(rb, force=force)
        verdict = rollback.assert_rolled_back(rb)
    finally:
        rb.close()
    return applied, verdict


def test_round_trip_restores_schema_and_data_exactly(db):
    legacy_schema, legacy_rows = app_schema(db), app_rows(db)
    db.run("inspect", "seed", "backfill", "constrain", "validate")
    assert app_schema(db) != legacy_schema
    applied, verdict = roll_back(db)
    assert verdict == rollback.ROLLED_BACK + rollback.RETIRED
    assert set(applied["outcome"]) == {"applied"}
    assert app_schema(db) == legacy_schema
    assert app_rows(db) == legacy_rows  # knowledge_bases gets its partly filled tenant_id back, row for row
    again, _ = roll_back(db)
    assert again.empty  # nothing left to undo
    # and the runbook can migrate it again from there
    db.run("inspect", "seed", "backfill", "constrain", "validate")


def test_rollback_refuses_while_other_tenants_own_rows_and_changes_nothing(migrated_db):
    db = migrated_db("inspect", "seed", "backfill", "constrain")
    other = db.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'Acme') RETURNING id")
    db.execute("UPDATE knowledge_bases SET tenant_id = %s WHERE id IN (SELECT id FROM knowledge_bases ORDER BY id LIMIT 3)", (other,))
    before = app_schema(db)
    with pytest.raises(RunbookError) as err:
        roll_back(db)
    assert "rows belong to tenants other than the System Tenant (knowledge_bases: 3, tenants: 1)" in str(err.value)
    assert "Nothing was changed" in str(err.value)
    assert app_schema(db) == before
    applied, verdict = roll_back(db, force=True)
    assert verdict.startswith("the database is back")


def test_a_dry_run_rollback_changes_nothing(migrated_db):
    db = migrated_db("inspect", "seed", "backfill", "constrain")
    before = app_schema(db), app_rows(db)
    rb = db.session("rollback", dry_run=True)
    try:
        planned = rollback.apply(rb)
    finally:
        rb.close()
    assert len(planned) and set(planned["outcome"]) == {"dry run"}
    assert (app_schema(db), app_rows(db)) == before
