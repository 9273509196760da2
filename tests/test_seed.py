"""02_seed: tenancy tables to the house convention, verified not altered, and the System Tenant, once."""

import pytest

from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import seed

SYSTEM = "00000000-0000-4000-8000-000000000001"


def drop_tenancy_tables(db):
    db.execute("ALTER TABLE knowledge_bases DROP COLUMN tenant_id")
    db.execute("DROP TABLE user_tenants, users, tenants")


def test_on_the_demo_database_the_tables_exist_and_match_the_convention(db):
    db.run("inspect")
    out = db.run("seed")["seed"]
    assert out["shape"]["ok"].all(), out["shape"][~out["shape"]["ok"]].to_dict("records")
    assert out["plan"].empty  # 0000 created the tables and the hand-applied attempt inserted the System Tenant
    assert db.scalar("SELECT count(*) FROM tenants WHERE uuid = %s", (SYSTEM,)) == 1


def test_missing_tables_are_created_to_the_convention_and_the_system_tenant_inserted(db):
    drop_tenancy_tables(db)
    db.run("inspect")
    out = db.run("seed")["seed"]
    assert list(out["applied"]["action"]) == ["create tenants", "create users", "create user_tenants",
                                              "insert the System Tenant"]
    assert set(out["applied"]["outcome"]) == {"applied"}
    rb = db.session("seed")
    try:
        shape = seed.shape_report(rb)
    finally:
        rb.close()
    assert shape["ok"].all(), shape[~shape["ok"]].to_dict("records")
    assert db.scalar("SELECT name FROM tenants WHERE uuid = %s", (SYSTEM,)) == "System Tenant"
    with db.connect() as conn:
        fks = {r[0] for r in conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = 'user_tenants'::regclass "
                                          "AND contype = 'f' AND convalidated")}
    assert fks == {"user_tenants_user_id_users_id_fk", "user_tenants_tenant_id_tenants_id_fk"}


def test_seed_creates_what_drizzle_0000_creates(db, empty_db):
    """The runbook's tables and Drizzle's are the same schema, so the hand-over finds what it expects."""
    from runbook_helpers import demo
    drop_tenancy_tables(db)
    db.run("inspect", "seed")
    with empty_db.connect() as conn:
        for statement in demo.drizzle_migrations()[0].statements():
            conn.execute(statement)
        conn.commit()

    def tables_only(dump):
        keep, out = False, []
        for line in dump.splitlines():
            if any(t in line for t in ('public.tenants', 'public.users', 'public.user_tenants')):
                keep = True
            if keep:
                out.append(line)
            if line.strip().endswith(";"):
                keep = False
        return sorted(l for l in out if l.strip())

    ours = [l for l in tables_only(db.schema_dump()) if "knowledge_bases" not in l]
    assert ours == tables_only(empty_db.schema_dump())


def test_rerun_is_a_no_op(db):
    drop_tenancy_tables(db)
    db.run("inspect", "seed")
    before = db.schema_dump()
    again = db.run("seed")["seed"]
    assert again["plan"].empty and again["applied"].empty
    assert db.schema_dump() == before
    assert db.scalar("SELECT count(*) FROM tenants") == 1


def test_an_existing_table_of_another_shape_is_reported_not_altered(db):
    drop_tenancy_tables(db)
    db.execute("CREATE TABLE tenants (id serial PRIMARY KEY, uuid uuid UNIQUE NOT NULL, name text NOT NULL)")
    db.run("inspect")
    rb = db.session("seed")
    try:
        shape = seed.shape_report(rb)
        bad = shape[(shape["table"] == "tenants") & ~shape["ok"]].set_index("check")
        assert bad.loc["column id", "actual"] == "integer NOT NULL"
        assert bad.loc["column created_at", "actual"] == "missing"
        before = db.scalar("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                           "WHERE attrelid = 'tenants'::regclass AND attname = 'id'")
        seed.apply(rb)
    finally:
        rb.close()
    assert before == "integer"
    assert db.scalar("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                     "WHERE attrelid = 'tenants'::regclass AND attname = 'id'") == "integer"
    assert db.scalar("SELECT count(*) FROM tenants WHERE uuid = %s", (SYSTEM,)) == 1


def test_seed_refuses_without_a_baseline(db):
    rb = db.session("seed")
    try:
        with pytest.raises(RunbookError, match="no baseline"):
            rb.require_baseline()
    finally:
        rb.close()
