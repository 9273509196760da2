"""07_distribute on a real Citus cluster with foreign keys to unique keys other than the primary key (issue 27,
item 4; the schema of tests/test_composite_unique_keys.py): the referenced keys become (tenant_id, …) under their
own names, 04's UNIQUE (tenant_id, …) beside them goes as redundant, the (tenant_id, …) twins come back validated
between the colocated shards and still refuse a child pointing at another tenant's parent."""

import psycopg
import pytest
from citus_fixtures import MIGRATED, citus, citus_db, citus_params, on_cluster  # noqa: F401 (fixtures)

from runbook_helpers import params as params_mod
from runbook_helpers.distribution import readiness
from runbook_helpers.errors import RunbookError
from test_composite_unique_keys import SCHEMA, TABLES, TWINS, key_params, twin_of
from test_distribute_citus import SAME_COLUMNS, _counts, citus_tables

# Citus refuses ON DELETE SET NULL on a foreign key that holds the distribution column ("SET NULL or SET DEFAULT is
# not supported in ON DELETE operation when distribution key is included in the foreign key constraint", with a
# column list too), whichever key it references: runs.step_uuid is NO ACTION here
ON_CITUS = SCHEMA.replace(" ON DELETE SET NULL", "")


def test_keys_to_other_unique_keys_distribute_with_their_twins(citus_db, citus):
    params = on_cluster(citus, key_params(params_mod.load("ci")), {"distribution": {"application_keys_agreed": True}})
    db = citus_db(MIGRATED, params=params, schema=ON_CITUS)
    before = _counts(db, TABLES)
    db.run("distribute")
    assert _counts(db, TABLES) == before
    assert {t for t, (kind, _) in citus_tables(db).items() if kind == "distributed"} == set(TABLES)
    with db.connect() as conn:
        fks = dict(conn.execute("SELECT conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid) || "
                                "CASE WHEN convalidated THEN '' ELSE ' (not validated)' END FROM pg_constraint "
                                "WHERE contype = 'f' AND connamespace = 'public'::regnamespace").fetchall())
        assert conn.execute(SAME_COLUMNS, (TABLES,)).fetchall() == []  # 04's twins beside the swapped keys went
        assert conn.execute("SELECT count(DISTINCT colocationid) FROM pg_dist_partition WHERE partmethod = 'h'"
                            ).fetchone()[0] == 1
    for fk, definition in TWINS.items():
        assert fk not in fks
        assert fks[twin_of(fk)] == definition.replace(" ON UPDATE CASCADE", "").replace(" ON DELETE SET NULL (step_uuid)",
                                                                                         ""), fk
    other = db.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'other') RETURNING id")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("INSERT INTO runs (uuid, flow_id, step_id, tenant_id) VALUES (gen_random_uuid(), %s, %s, %s)",
                   (*db.scalar("SELECT ARRAY[flow_id, id] FROM steps LIMIT 1"), other))


def test_a_foreign_key_that_sets_null_on_delete_is_refused_before_any_change_and_the_fix_lets_it_through(
        citus_db, citus):
    """runs.step_uuid ON DELETE SET NULL: its (tenant_id, step_uuid) twin is one Citus refuses between distributed
    tables. 07 failed on it after every table was distributed; it now refuses first, changing nothing, and goes
    through once the application's key no longer sets NULL (and 04 re-made the twin)."""
    params = on_cluster(citus, key_params(params_mod.load("ci")), {"distribution": {"application_keys_agreed": True}})
    db = citus_db(MIGRATED, params=params, schema=SCHEMA)
    with pytest.raises(RunbookError) as refused:
        db.run("distribute")
    assert "Citus refuses ON DELETE SET NULL or SET DEFAULT on a foreign key that holds the distribution column" \
        in str(refused.value) and "Nothing was changed" in str(refused.value)
    assert twin_of("runs.runs_step_uuid_fkey").split(".")[1] in str(refused.value)
    assert citus_tables(db) == {}
    with db.session("inspect") as rb:
        ready = readiness.readiness(rb)
    row = ready[ready["check"] == "foreign keys holding tenant_id set no columns ON DELETE"]
    assert len(row) == 1 and not row["ready"].iloc[0]
    # the DBA's fix: the application's key without SET NULL, 04_constrain's twin made again from it
    db.execute("ALTER TABLE runs DROP CONSTRAINT runs_step_uuid_fkey, ADD CONSTRAINT runs_step_uuid_fkey "
               "FOREIGN KEY (step_uuid) REFERENCES steps (uuid)")
    db.execute(f"ALTER TABLE runs DROP CONSTRAINT \"{twin_of('runs.runs_step_uuid_fkey').split('.')[1]}\"")
    db.run("constrain")
    db.run("distribute")
    assert {t for t, (kind, _) in citus_tables(db).items() if kind == "distributed"} == set(TABLES)
