"""The legacy demo database: its shape, its quirks, its row counts, and the Drizzle state it is in."""

import psycopg
import pytest

from conftest import TEMPLATE_ROWS, TEMPLATE_SCALE
from runbook_helpers import demo
from runbook_helpers.errors import RunbookError


def test_row_counts_follow_the_requested_size(db):
    expected = demo.sizes(TEMPLATE_ROWS, TEMPLATE_SCALE)
    with db.connect() as conn:
        counts = demo.table_counts(conn)
    assert counts["workflows"] == TEMPLATE_ROWS
    for table in ("models", "rules", "decision_tables", "knowledge_bases", "templates", "endpoints", "node_types"):
        assert counts[table] == expected[table], table
    assert counts["widgets"] == expected["templates"] * expected["widgets_per_template"]
    assert counts["tenants"] == 1 and counts["users"] == 0 and counts["user_tenants"] == 0


def test_default_size_is_about_100k_rows():
    sizes = demo.sizes()
    total = sum(v for k, v in sizes.items() if k != "widgets_per_template") + sizes["templates"] * (
        sizes["widgets_per_template"] - 1)
    assert 90_000 <= total <= 110_000


def test_legacy_quirks_are_present(db):
    with db.connect() as conn:
        # "user" needs quoting and carries arrays of org ids and role ids
        types = dict(conn.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                                  "WHERE attrelid = '\"user\"'::regclass AND attnum > 0").fetchall())
        assert types["org_ids"] == "bigint[]" and types["role_ids"] == "bigint[]"
        # widgets has a composite primary key
        pk = conn.execute("SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_constraint c JOIN pg_attribute a "
                          "ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey) "
                          "WHERE c.conrelid = 'widgets'::regclass AND c.contype = 'p'").fetchone()[0]
        assert pk == ["template_id", "position"]
        # foreign keys between core tables
        refs = set(conn.execute("SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint "
                                "WHERE contype = 'f'").fetchall())
        assert ("rules", "workflows") in refs and ("decision_tables", "models") in refs
        # org_id without a foreign key, some pointing at orgs that do not exist
        dangling = conn.execute("SELECT count(*) FROM workflows w WHERE w.org_id IS NOT NULL AND NOT EXISTS "
                                "(SELECT 1 FROM org o WHERE o.id = w.org_id)").fetchone()[0]
        assert dangling > 0
        # a trigger and a dependent view on workflows
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'workflows'::regclass "
                            "AND NOT tgisinternal").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM active_workflows").fetchone()[0] > 0


def test_knowledge_bases_carry_a_partly_filled_tenant_id(db):
    with db.connect() as conn:
        nullable = conn.execute("SELECT NOT attnotnull FROM pg_attribute WHERE attrelid = 'knowledge_bases'::regclass "
                                "AND attname = 'tenant_id'").fetchone()[0]
        filled, empty = conn.execute("SELECT count(tenant_id), count(*) - count(tenant_id) FROM knowledge_bases").fetchone()
        system = conn.execute("SELECT id FROM tenants WHERE uuid = '00000000-0000-4000-8000-000000000001'").fetchone()[0]
        distinct = conn.execute("SELECT array_agg(DISTINCT tenant_id) FROM knowledge_bases "
                                "WHERE tenant_id IS NOT NULL").fetchone()[0]
    assert nullable
    total = demo.sizes(TEMPLATE_ROWS, TEMPLATE_SCALE)["knowledge_bases"]
    assert filled == total // 3 and empty == total - total // 3
    assert distinct == [system]


def test_data_is_deterministic(server, ci_params):
    a, b = "det_a", "det_b"
    try:
        for name in (a, b):
            demo.build(server.url(), name, system_uuid=str(ci_params.system_tenant.uuid), rows=500, scale=0.02,
                       log=lambda *_: None)
        digests = []
        for name in (a, b):
            with psycopg.connect(server.url(name)) as conn:
                digests.append(conn.execute(
                    "SELECT md5(string_agg(w::text, '|' ORDER BY id)) FROM workflows w").fetchone()[0])
        assert digests[0] == digests[1]
    finally:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            for name in (a, b):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_drizzle_records_0000_applied_and_0001_pending(db):
    migrations = demo.drizzle_migrations()
    assert [m.tag for m in migrations] == ["0000_legacy_and_tenancy_tables", "0001_tenant_columns"]
    with db.connect() as conn:
        rows = conn.execute("SELECT hash, created_at FROM drizzle.__drizzle_migrations ORDER BY id").fetchall()
    assert rows == [(migrations[0].hash, migrations[0].when)]
    # Drizzle's rule: apply every journal entry newer than the newest recorded created_at
    newest = max(r[1] for r in rows)
    assert [m.tag for m in migrations if m.when > newest] == ["0001_tenant_columns"]


def test_applying_0001_fails_on_tables_with_rows_and_changes_nothing(db):
    migration = demo.drizzle_migrations()[1]
    before = db.schema_dump()
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.NotNullViolation) as err:
            with conn.transaction():  # drizzle-kit migrate runs a migration in one transaction
                for statement in migration.statements():
                    conn.execute(statement)
    assert 'column "tenant_id" of relation "decision_tables" contains null values' in str(err.value)  # 0001's first table
    assert db.schema_dump() == before


def test_demo_db_and_db_reset_refuse_an_env_that_is_not_embedded(db):
    """staging's DSN points at a database with rows: neither command touches it."""
    from conftest import runbook_cli, staging_dsn

    before = db.scalar("SELECT count(*) FROM workflows")
    for args in (("demo-db", "--env", "staging"), ("db", "reset", "--env", "staging")):
        out = runbook_cli(*args, env={"RUNBOOK_STAGING_DSN": staging_dsn(db)})
        assert out.returncode == 2, out.stderr
        assert "params/staging.yaml: database.embedded is false" in out.stderr
        assert "Nothing was changed" in out.stderr
    assert db.scalar("SELECT count(*) FROM workflows") == before


def test_build_refuses_a_database_it_did_not_create_and_rebuilds_one_it_did(server, ci_params, empty_db):
    system = str(ci_params.system_tenant.uuid)
    with empty_db.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE precious (id int)")
        conn.execute("INSERT INTO precious VALUES (1)")
    with pytest.raises(RunbookError) as err:
        demo.build(server.url(), empty_db.name, system_uuid=system, rows=50, scale=0.01, log=lambda *_: None)
    assert f"database {empty_db.name} was not created by `runbook demo-db`" in str(err.value)
    assert "nothing was changed" in str(err.value)
    assert empty_db.scalar("SELECT count(*) FROM precious") == 1

    name = f"demo_marker_{empty_db.name}"
    try:
        demo.build(server.url(), name, system_uuid=system, rows=50, scale=0.01, log=lambda *_: None)
        with psycopg.connect(server.url(), autocommit=True) as admin:
            marker = "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s"
            assert admin.execute(marker, (name,)).fetchone()[0] == demo.MARKER
            with psycopg.connect(server.url(name), autocommit=True) as conn:
                conn.execute("CREATE TABLE scratch (id int)")
            demo.build(server.url(), name, system_uuid=system, rows=60, scale=0.01, log=lambda *_: None)
            with psycopg.connect(server.url(name)) as conn:
                assert conn.execute("SELECT to_regclass('scratch')").fetchone()[0] is None
                assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == 60
            # a demo database from before the marker is recognised by its Drizzle record, and marked when rebuilt
            admin.execute(f'COMMENT ON DATABASE "{name}" IS NULL')
            demo.build(server.url(), name, system_uuid=system, rows=50, scale=0.01, log=lambda *_: None)
            assert admin.execute(marker, (name,)).fetchone()[0] == demo.MARKER
            # one whose Drizzle record is another application's is not
            admin.execute(f'COMMENT ON DATABASE "{name}" IS NULL')
            with psycopg.connect(server.url(name), autocommit=True) as conn:
                conn.execute("UPDATE drizzle.__drizzle_migrations SET hash = 'another application'")
            with pytest.raises(RunbookError):
                demo.build(server.url(), name, system_uuid=system, rows=50, scale=0.01, log=lambda *_: None)
    finally:
        with psycopg.connect(server.url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
