"""07_distribute on a real Citus cluster (issue 26): the demo with the ci env's spec (legacy mapping, RLS, composite
keys), end to end with nothing done by hand."""

from citus_fixtures import MIGRATED, citus, citus_db, citus_params  # noqa: F401 (fixtures)

from runbook_helpers.phases import distribute


def _counts(db, tables) -> dict[str, int]:
    with db.connect() as conn:
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def test_the_demo_distributes_end_to_end_and_its_foreign_keys_come_back_validated(citus_db):
    db = citus_db(MIGRATED)
    before = _counts(db, db.params.tables)
    with db.session("distribute", dry_run=True) as rb:
        plan = distribute.plan(rb)
    cascades = [a for a in plan["action"] if "without ON UPDATE CASCADE" in a]
    assert cascades, "the plan says which foreign keys come back without ON UPDATE CASCADE"
    db.run("distribute")
    assert _counts(db, db.params.tables) == before
    with db.connect() as conn:
        groups = conn.execute("SELECT count(DISTINCT colocationid), count(*) FROM pg_dist_partition "
                              "WHERE partmethod = 'h'").fetchone()
        fks = conn.execute("SELECT conrelid::regclass::text, conname, convalidated, confupdtype FROM pg_constraint "
                           "WHERE contype = 'f' AND connamespace = 'public'::regnamespace").fetchall()
    assert groups == (1, len(db.params.tables)), groups
    assert fks and all(valid for _, _, valid, _ in fks), [f for f in fks if not f[2]]
    # the runbook's own (tenant_id, …) keys: NO ACTION on update, since a row's tenant can no longer change
    assert {upd for _, name, _, upd in fks if "_tenant_id_" in name and name.endswith("_tenant_id_id_fk")} == {"a"}
