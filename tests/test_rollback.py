"""Rollback: migrate, roll back, and the schema and every row equal the legacy database's; it refuses while
other tenants own rows; after success it does nothing."""

import threading

import psycopg
import pytest

from runbook_helpers import faults
from runbook_helpers import params as params_mod
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


def test_a_row_the_application_updates_while_its_tenant_is_put_back_is_put_back(migrated_db):
    """99_rollback puts back knowledge_bases.tenant_id (the demo's partly applied 0001) in one UPDATE while the
    legacy application writes. A row the application updates at that moment (its UPDATE holding the row when the
    rollback's reaches it) must still get its tenant of before: found by its key, not by the row version the
    rollback's snapshot saw, which the application's update replaced."""
    db = migrated_db("inspect", "seed", "backfill", "constrain", "validate")
    # a lock wait long enough for the application's update to commit while the rollback's UPDATE waits for the row
    # (the live race: the application's statements last milliseconds, within the ladder's first rung)
    db.params = params_mod.override(db.params, {"locks": {"first_lock_timeout_ms": 3000, "lock_timeout_ms": 3000}})
    with db.session("rollback", dry_run=True) as rb:
        actions = [f"{s.table}: {s.action}" for s in rollback.steps(rb)]
    put_back = next(i for i, a in enumerate(actions) if a.startswith("knowledge_bases: put back the tenant_id"))
    before_it = actions[put_back - 1]
    # a row the backfill gave a tenant (it had none before): the rollback takes it away again
    row = db.scalar("SELECT id FROM knowledge_bases kb WHERE NOT EXISTS (SELECT FROM tenancy_runbook.legacy_tenant_values "
                    "v WHERE v.table_name = 'knowledge_bases' AND v.key = json_build_array(kb.id::text)::jsonb) "
                    "ORDER BY id LIMIT 1")
    assert db.scalar("SELECT tenant_id FROM knowledge_bases WHERE id = %s", (row,)) is not None
    holder = psycopg.connect(db.url)
    released = []

    def hold_the_row(detail: str) -> None:
        if detail.endswith(before_it) and not released:
            holder.execute("UPDATE knowledge_bases SET name = name || ' (edited)' WHERE id = %s", (row,))
            timer = threading.Timer(0.5, holder.commit)  # within the lock wait: the rollback's UPDATE goes on
            timer.start()
            released.append(timer)

    try:
        with faults.watch_steps(hold_the_row):
            _, verdict = roll_back(db, force=True)
    finally:
        for timer in released:
            timer.join()
        holder.close()
    assert released, f"no step ended with {before_it!r}"
    assert db.scalar("SELECT name FROM knowledge_bases WHERE id = %s", (row,)).endswith(" (edited)")
    assert db.scalar("SELECT tenant_id FROM knowledge_bases WHERE id = %s", (row,)) is None
    assert verdict.startswith("the database is back to its shape before the migration"), verdict
