"""Partitioned core tables (issue 14, item 1): a schema of its own, range-partitioned by a date with list and
hash sub-partitions and DEFAULT partitions, referencing and referenced by plain core tables, migrated end to
end through the phases with row level security and composite keys on; partitions created and attached
after the migration; and the rollback back to the exact schema of before."""

import psycopg
import pytest
from psycopg import sql

from conftest import schema_spec
from runbook_helpers import params as params_mod
from runbook_helpers.phases import rollback, validate

SCHEMA = """
CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TABLE events (
  id bigserial, occurred_on date NOT NULL, region text NOT NULL,
  account_id bigint NOT NULL REFERENCES accounts (id), payload text,
  PRIMARY KEY (id, occurred_on, region)
) PARTITION BY RANGE (occurred_on);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (region);
CREATE TABLE events_2024_eu PARTITION OF events_2024 FOR VALUES IN ('eu');
CREATE TABLE events_2024_us PARTITION OF events_2024 FOR VALUES IN ('us');
CREATE TABLE events_2024_other PARTITION OF events_2024 DEFAULT;
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY HASH (id);
CREATE TABLE events_2025_h0 PARTITION OF events_2025 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE events_2025_h1 PARTITION OF events_2025 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE TABLE event_notes (
  id bigserial PRIMARY KEY, event_id bigint NOT NULL, event_on date NOT NULL, event_region text NOT NULL,
  note text, FOREIGN KEY (event_id, event_on, event_region) REFERENCES events (id, occurred_on, region)
);
INSERT INTO accounts (name) SELECT 'account ' || g FROM generate_series(1, 20) g;
INSERT INTO events (occurred_on, region, account_id, payload)
SELECT date '2024-01-01' + (g % 700), (ARRAY['eu', 'us', 'apac'])[1 + g % 3], 1 + g % 20, 'payload ' || g
FROM generate_series(1, 3000) g;
INSERT INTO events (occurred_on, region, account_id, payload) VALUES ('2031-05-01', 'eu', 1, 'far future');
INSERT INTO event_notes (event_id, event_on, event_region, note)
SELECT id, occurred_on, region, 'note ' || id FROM events WHERE id % 10 = 0;
"""
LEAVES = ["events_2024_eu", "events_2024_other", "events_2024_us", "events_2025_h0", "events_2025_h1",
          "events_default"]


def partition_params(ci_params, **changes):
    """The ci params with this schema's spec in place of the demo's (core_tables replaced, not merged)."""
    return schema_spec(ci_params, ["accounts", "events", "event_notes"], [
        {"name": "events of an account", "sql": "SELECT count(*) FROM events WHERE account_id = 1"},
        {"name": "notes with their event", "sql": "SELECT count(*) FROM event_notes n JOIN events e ON "
                                                  "(e.id, e.occurred_on, e.region) = (n.event_id, n.event_on, n.event_region)"}],
        **changes)


@pytest.fixture
def pdb(empty_db, ci_params):
    empty_db.params = partition_params(ci_params)
    with empty_db.connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
    return empty_db


def rows(db, query, args=None):
    with db.connect() as conn:
        return conn.execute(query, args).fetchall()


def app_schema(db) -> str:
    return db.schema_dump(exclude_ledger=True)


def test_inspect_shows_the_partitions_and_plans_each_step_per_partition(pdb):
    out = pdb.run("inspect")["inspect"]
    pre = out["preflight"].set_index("check")
    assert pre.loc["partitioned core tables are named by their parent", "status"] == "ok"
    assert "events (8 partitions)" in pre.loc["partitioned core tables are named by their parent", "detail"]
    ready = out["readiness"].set_index(["check", "object"])
    assert ready.loc[("partitioned tables: composite keys hold the partition key", "events"), "finding"].startswith(
        "partitioned by RANGE (occurred_on); UNIQUE (tenant_id, id, occurred_on, region) holds every level's")
    inv = out["inventory"].set_index("table")
    assert inv.loc["events", "partitioning"] == "RANGE (occurred_on): 8 partitions, 6 with rows"
    assert inv.loc["events", "rows"] == 3001
    parts = out["partitions"]
    assert sorted(parts[parts["rows"].notna()]["partition"]) == LEAVES
    assert parts["rows"].sum() == 3001 and parts.set_index("partition").loc["events_default", "rows"] == 1
    plan = out["plan"]
    events = plan[plan["table"] == "events"]
    for leaf in LEAVES:
        assert f"validate the NOT NULL check on partition {leaf}" in set(events["action"])
        assert f"validate the foreign key on partition {leaf}" in set(events["action"])
        assert f"build the index on (tenant_id) of partition {leaf}" in set(events["action"])
    statements = " ;; ".join(events["statement"])
    assert 'CREATE INDEX "events_tenant_id_idx" ON ONLY "public"."events"' in statements
    assert 'CREATE INDEX "events_2024_tenant_id_idx" ON ONLY "public"."events_2024"' in statements
    assert 'ALTER INDEX "public"."events_2024_tenant_id_idx" ATTACH PARTITION "public"."events_2024_eu_tenant_id_idx"' \
        in statements
    assert "CREATE INDEX CONCURRENTLY" not in " ".join(events[events["action"].str.contains("ON ONLY")]["statement"])
    assert not any("CONCURRENTLY" in s and '"public"."events" ' in s for s in events["statement"])
    # the whole plan, per partition, is valid SQL for this server: run it for real and nothing fails
    assert set(pdb.run("seed", "backfill", "constrain")["constrain"]["applied"]["outcome"]) == {"applied"}


def leaf_state(db):
    """Per leaf: tenant_id NOT NULL, its foreign key to tenants (validated, part of the parent's), its index
    (valid, attached), RLS (enabled, forced), and the rollout triggers it inherited."""
    return {r[0]: r[1:] for r in rows(db, """
        SELECT c.relname,
               (SELECT attnotnull FROM pg_attribute WHERE attrelid = c.oid AND attname = 'tenant_id'),
               (SELECT bool_and(con.convalidated AND con.conparentid <> 0) FROM pg_constraint con
                  WHERE con.conrelid = c.oid AND con.contype = 'f' AND con.confrelid = 'tenants'::regclass),
               (SELECT bool_and(i.indisvalid) FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indexrelid
                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                  WHERE i.indrelid = c.oid AND a.attname = 'tenant_id' AND i.indnatts = 1),
               c.relrowsecurity AND c.relforcerowsecurity,
               (SELECT array_agg(tgname::text ORDER BY tgname) FROM pg_trigger WHERE tgrelid = c.oid
                  AND tgname LIKE 'tenancy_rollout%')
        FROM pg_class c WHERE c.relispartition AND c.relkind = 'r' AND c.relname LIKE 'events%' ORDER BY 1""")}


@pytest.fixture
def migrated(migrated_db, ci_params):
    """pdb migrated through constrain: a copy of this worker's migrated template of the schema."""
    p = partition_params(ci_params)
    db = migrated_db("inspect", "seed", "backfill", "constrain", params=p, schema=SCHEMA)
    db.legacy_schema = app_schema(migrated_db(params=p, schema=SCHEMA))
    return db


def test_migrated_end_to_end_with_rls_and_composite_keys(migrated):
    db = migrated
    out = db.run("validate")["validate"]
    assert out["checks"]["passed"].all(), out["checks"][~out["checks"]["passed"]]
    assert out["isolation"]["passed"].all(), out["isolation"][~out["isolation"]["passed"]]
    again = db.run("seed", "backfill", "constrain")  # after success every phase is a no-op
    assert again["backfill"]["plan"].empty and again["constrain"]["plan"].empty
    expected = (True, True, True, True, ["tenancy_rollout_assign", "tenancy_rollout_record"])
    assert leaf_state(db) == {leaf: expected for leaf in LEAVES}
    assert rows(db, "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = 'events_tenant_id_idx'::regclass") == [(True,)]
    cons = dict(rows(db, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'events'::regclass"))
    # the composite key includes the partition key (the primary key does, as PostgreSQL requires)
    assert cons["events_tenant_id_id_occurred_on_region_unique"] == "UNIQUE (tenant_id, id, occurred_on, region)"
    assert cons["events_tenant_id_account_id_accounts_tenant_id_id_fk"].startswith(
        "FOREIGN KEY (tenant_id, account_id) REFERENCES accounts(tenant_id, id)")
    notes = dict(rows(db, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                          "'event_notes'::regclass AND contype = 'f'"))
    assert any(d.startswith("FOREIGN KEY (tenant_id, event_id, event_on, event_region) REFERENCES "
                            "events(tenant_id, id, occurred_on, region)") for d in notes.values())
    # every constraint validated; PostgreSQL before 18 leaves the internal per-partition rows of a foreign key that
    # REFERENCES a partitioned table (event_notes -> events_2024, …) marked NOT VALID after a VALIDATE of the key
    # itself, which is validated and enforced
    assert rows(db, "SELECT count(*) FROM pg_constraint WHERE NOT convalidated AND conrelid::regclass::text LIKE "
                    "'event%' AND NOT (conrelid = 'event_notes'::regclass AND conparentid <> 0 AND "
                    "current_setting('server_version_num')::int < 180000)") == [(0,)]


def as_app(db, tenant, query, args=None):
    with db.connect() as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(db.params.rls.app_role)))
        conn.execute("SELECT set_config(%s, %s, false)", (db.params.rls.setting, str(tenant)))
        return conn.execute(query, args).fetchall()


def second_tenant(db) -> int:
    with db.connect(autocommit=True) as conn:
        tid = conn.execute("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'second') RETURNING id").fetchone()[0]
        conn.execute("UPDATE accounts SET tenant_id = %s WHERE id = 2", (tid,))  # its events follow (ON UPDATE CASCADE)
    return tid


def test_a_partition_queried_directly_shows_only_the_tenants_rows_or_is_refused(migrated):
    db = migrated
    system = db.scalar("SELECT id FROM tenants WHERE uuid = %s", (str(db.params.system_tenant.uuid),))
    other = second_tenant(db)
    moved = db.scalar("SELECT count(*) FROM events_2024_eu WHERE tenant_id = %s", (other,))
    assert moved > 0
    # the application role has no privilege on partitions: a direct query is refused
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_app(db, other, "SELECT count(*) FROM events_2024_eu")
    # granted anyway, the partition's own policies (the parent's do not apply to a direct query) still isolate
    db.execute(sql.SQL("GRANT SELECT ON events_2024_eu TO {}").format(sql.Identifier(db.params.rls.app_role)))
    assert as_app(db, other, "SELECT count(*) FROM events_2024_eu") == [(moved,)]
    assert as_app(db, other, "SELECT count(*) FROM events_2024_eu WHERE tenant_id <> %s", (other,)) == [(0,)]
    total = db.scalar("SELECT count(*) FROM events_2024_eu")
    assert as_app(db, system, "SELECT count(*) FROM events_2024_eu") == [(total - moved,)]
    # through the parent, as always
    assert as_app(db, other, "SELECT count(DISTINCT tenant_id) FROM events") == [(1,)]


def test_partitions_created_or_attached_later_inherit_it_all(migrated):
    db = migrated
    system = db.scalar("SELECT id FROM tenants WHERE uuid = %s", (str(db.params.system_tenant.uuid),))
    db.execute("CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    # an existing table with rows, attached as a partition: it must carry tenant_id NOT NULL already
    db.execute("CREATE TABLE events_2027 (LIKE events INCLUDING DEFAULTS)")
    db.execute("INSERT INTO events_2027 (occurred_on, region, account_id, payload, tenant_id) "
               "SELECT date '2027-03-01' + g, 'eu', 1, 'attached ' || g, %s FROM generate_series(1, 50) g", (system,))
    db.execute("ALTER TABLE events ATTACH PARTITION events_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
    state = leaf_state(db)
    for leaf in ("events_2026", "events_2027"):
        nn, fk, index, _rls, triggers = state[leaf]
        assert (nn, fk, index) == (True, True, True), leaf
        assert triggers == ["tenancy_rollout_assign", "tenancy_rollout_record"]
    # the rollout triggers behave: a row written without tenant_id gets its tenant and is recorded
    db.execute("INSERT INTO events (occurred_on, region, account_id, payload) VALUES ('2026-06-01', 'us', 3, 'new')")
    db.execute("INSERT INTO events_2027 (occurred_on, region, account_id) VALUES ('2027-12-01', 'us', 3)")  # directly
    assert rows(db, "SELECT tenant_id FROM events_2026") == [(system,)]
    assert rows(db, "SELECT tenant_id FROM events_2027 WHERE occurred_on = '2027-12-01'") == [(system,)]
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.app_writes WHERE table_name = 'events' "
                     "AND first_op = 'INSERT'") == 2
    # RLS through the parent covers them; the FK refuses a tenant that does not exist
    assert as_app(db, system, "SELECT count(*) FROM events WHERE occurred_on BETWEEN '2026-01-01' AND '2027-12-31'") == [(52,)]
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("INSERT INTO events_2026 (occurred_on, region, account_id, tenant_id) "
                   "VALUES ('2026-07-01', 'eu', 1, 999999)")
    # an attached table whose tenant_id is nullable is refused by PostgreSQL itself
    db.execute("CREATE TABLE events_2028 (LIKE events)")
    db.execute("ALTER TABLE events_2028 ALTER COLUMN tenant_id DROP NOT NULL")
    with pytest.raises(psycopg.errors.DatabaseError):
        db.execute("ALTER TABLE events ATTACH PARTITION events_2028 FOR VALUES FROM ('2028-01-01') TO ('2029-01-01')")
    # a re-run of constrain gives them their own policies
    applied = db.run("constrain")["constrain"]["applied"]
    assert {a for a in applied["action"]} <= {"create the SELECT tenant policy", "create the INSERT tenant policy",
                                               "create the UPDATE tenant policy", "create the DELETE tenant policy",
                                               "enable row level security", "force row level security on the table owner too"}
    assert leaf_state(db)["events_2026"][3] and leaf_state(db)["events_2027"][3]
    # the 50 rows ATTACH brought in passed no rollout trigger, so nothing recorded them as the application's
    # writes: validate counts them against the rows of before and says so (attach tables with rows after
    # 06_finalize, or write them through the parent)
    assert failing(db) == {("rows the application did not write: count unchanged", "events"),
                           ("rows the application did not write: pre-existing columns unchanged (fingerprint)",
                            "events")}


def test_rollback_restores_the_exact_schema(migrated):
    db = migrated
    counts = rows(db, "SELECT count(*) FROM events UNION ALL SELECT count(*) FROM event_notes")
    rb = db.session("rollback")
    try:
        rollback.apply(rb)
        assert rollback.assert_rolled_back(rb) == rollback.ROLLED_BACK + rollback.RETIRED
    finally:
        rb.close()
    assert app_schema(db) == db.legacy_schema
    assert rows(db, "SELECT count(*) FROM events UNION ALL SELECT count(*) FROM event_notes") == counts


def test_finalize_removes_the_triggers_from_every_partition(migrated):
    db = migrated
    db.run("validate")
    from runbook_helpers.phases.headless import run_phase
    run_phase(db.session("finalize"), force=True)
    assert all(s[4] is None for s in leaf_state(db).values())


def failing(db):
    with db.session("validate") as rb:
        frame = validate.checks(rb)
    return {(r.check, r.table) for r in frame[~frame["passed"]].itertuples()}


def test_validate_checks_every_partition_itself(migrated):
    db = migrated
    with db.session("validate") as rb:
        frame = validate.checks(rb)
    mine = frame[frame["check"].str.startswith("partition: ")]
    assert len(mine) == 2 * len(LEAVES) and mine["passed"].all()
    # a partition that lost its own row level security: the parent's policies do not cover a direct query
    db.execute("ALTER TABLE events_2025_h1 NO FORCE ROW LEVEL SECURITY")
    assert failing(db) == {("partition: row level security of its own (direct queries)", "events.events_2025_h1")}


def test_a_partition_attached_later_without_rls_fails_validate_until_constrain_runs_again(migrated):
    db = migrated
    db.execute("CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    assert failing(db) == {("partition: row level security of its own (direct queries)", "events.events_2026")}
    db.run("constrain")
    assert failing(db) == set()


def test_an_interrupted_constrain_resumes_per_partition(pdb):
    """Half of the per-partition work done (CHECK validated on one leaf, a NOT VALID key on another, the parent's
    index ON ONLY with one leaf attached) and an INVALID leftover of an interrupted build on a third: the re-run
    finishes it, drops and rebuilds the leftover, and the parent's index ends valid."""
    pdb.run("inspect", "seed", "backfill")
    pdb.execute("ALTER TABLE events ADD CONSTRAINT events_tenant_id_nn_check CHECK (tenant_id IS NOT NULL) NOT VALID")
    pdb.execute("ALTER TABLE events_2024_us VALIDATE CONSTRAINT events_tenant_id_nn_check")
    pdb.execute("ALTER TABLE events_default ADD CONSTRAINT events_default_tenant_id_tenants_id_fk FOREIGN KEY "
                "(tenant_id) REFERENCES tenants (id) NOT VALID")
    pdb.execute("CREATE INDEX events_tenant_id_idx ON ONLY events (tenant_id)")
    pdb.execute("CREATE INDEX CONCURRENTLY events_default_tenant_id_idx ON events_default (tenant_id)")
    pdb.execute("ALTER INDEX events_tenant_id_idx ATTACH PARTITION events_default_tenant_id_idx")
    with pytest.raises(psycopg.errors.UniqueViolation):  # an interrupted build: an INVALID index remains
        pdb.execute("CREATE UNIQUE INDEX CONCURRENTLY events_2024_eu_tenant_id_idx ON events_2024_eu (tenant_id)")
    out = pdb.run("constrain")["constrain"]
    actions = list(out["plan"]["action"])
    assert "drop INVALID index events_2024_eu_tenant_id_idx left by an interrupted build" in actions
    assert "validate the NOT NULL check on partition events_2024_us" not in actions
    assert "add foreign key to tenants NOT VALID on partition events_default" not in actions
    assert "validate the foreign key on partition events_default" in actions
    assert "build the index on (tenant_id) of partition events_default" not in actions
    assert not any(a.startswith("create the index on (tenant_id) ON ONLY the table") for a in actions)
    assert set(out["applied"]["outcome"]) == {"applied"}
    assert pdb.scalar("SELECT indisvalid AND NOT indisunique FROM pg_index WHERE indexrelid = "
                      "'events_2024_eu_tenant_id_idx'::regclass")
    assert pdb.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'events_tenant_id_idx'::regclass")
    assert pdb.run("constrain")["constrain"]["plan"].empty  # after success: nothing left to do


def test_a_partly_applied_tenant_column_is_filled_partition_by_partition(pdb, ci_params):
    """tenant_id there already, NULL everywhere (a partly applied 0001): the batches walk each leaf partition
    with a checkpoint of its own; rollback puts every NULL back."""
    pdb.params = partition_params(ci_params, backfill={"batch_size": 200})
    pdb.execute("ALTER TABLE events ADD COLUMN tenant_id bigint")
    # one partition's rows carry a tenant already: the System Tenant, there before the runbook as the
    # application's 0000 creates tenants (inspect refuses a tenant_id that names no tenant)
    pdb.execute("CREATE TABLE tenants (id bigserial PRIMARY KEY, uuid uuid NOT NULL UNIQUE, name text NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now())")
    pdb.execute("INSERT INTO tenants (id, uuid, name) VALUES (1, %s, 'System Tenant')",
                (str(pdb.params.system_tenant.uuid),))
    pdb.execute("UPDATE events SET tenant_id = 1 WHERE region = 'eu' AND occurred_on < '2025-01-01'")
    kept = pdb.scalar("SELECT count(*) FROM events WHERE tenant_id = 1")
    # the application's own row trigger (on the parent, so on every partition) must not fire for the batches
    pdb.execute("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.payload := NEW.payload "
                "|| ' touched'; RETURN NEW; END$$; CREATE TRIGGER events_touch BEFORE UPDATE ON events FOR EACH ROW "
                "EXECUTE FUNCTION touch()")
    legacy = app_schema(pdb)
    plan = pdb.run("inspect")["inspect"]["plan"]
    fills = [a for a in plan[plan["table"] == "events"]["action"] if a.startswith("fill NULL tenant_id")]
    to_fill = [leaf for leaf in LEAVES if leaf != "events_2024_eu"]
    assert sorted(fills) == [f"fill NULL tenant_id of partition {leaf} in batches of 200 (keyset on (id, occurred_on, "
                             f"region); its own checkpoint)" for leaf in to_fill]
    pdb.run("seed", "backfill")
    with pdb.session("backfill") as rb:
        checkpoints = rb.ledger.checkpoints(rb.control)
    per_leaf = checkpoints.groupby("table_name")["rows_updated"].sum().to_dict()
    counts = dict(rows(pdb, "SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1"))
    del counts["events_2024_eu"]
    assert per_leaf == counts and sum(per_leaf.values()) == 3001 - kept
    batches = checkpoints.groupby("table_name")["batches"].sum()
    assert batches["events_default"] == 1 and batches.drop("events_default").min() >= 2  # of 200 rows at most
    assert pdb.scalar("SELECT count(*) FROM events WHERE tenant_id IS NULL") == 0
    assert pdb.scalar("SELECT count(*) FROM events WHERE payload LIKE '%touched'") == 0
    pdb.run("constrain", "validate")
    rb = pdb.session("rollback")
    try:
        rollback.apply(rb)
    finally:
        rb.close()
    assert app_schema(pdb) == legacy
    # row for row: a ctid names a row only within its partition
    assert pdb.scalar("SELECT count(*) FROM events WHERE tenant_id = 1") == kept
    assert pdb.scalar("SELECT count(*) FROM events WHERE tenant_id IS NULL") == 3001 - kept


def test_a_partition_named_as_a_core_table_is_refused_with_nothing_changed(pdb, ci_params):
    data = partition_params(ci_params).model_dump(by_alias=True)
    data["core_tables"]["events_2024_eu"] = {}
    pdb.params = params_mod.Params.model_validate(data)
    before = app_schema(pdb)
    with pytest.raises(Exception, match=r"partitions named as core tables: events_2024_eu \(a partition of "
                                        r"events_2024\) -> name the partitioned parent in core_tables instead"):
        pdb.run("inspect")
    assert app_schema(pdb) == before
    assert pdb.scalar("SELECT to_regnamespace('tenancy_runbook')") is None


def test_a_dry_run_plans_constrain_per_partition_before_backfill(pdb):
    pdb.run("inspect", "seed")
    from runbook_helpers.phases import constrain
    with pdb.session("constrain", dry_run=True) as rb:
        plan = constrain.plan(rb)
    events = plan[plan["table"] == "events"]
    assert {f"validate the foreign key on partition {leaf}" for leaf in LEAVES} <= set(events["action"])
    assert {f"attach {leaf}_tenant_id_idx to {'events' if leaf == 'events_default' else leaf.rsplit('_', 1)[0]}"
            f"_tenant_id_idx" for leaf in LEAVES} <= set(events["action"])
    assert "attach events_2024_tenant_id_idx to events_tenant_id_idx" in set(events["action"])
