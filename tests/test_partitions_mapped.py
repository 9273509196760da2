"""The legacy mapping on partitioned core tables (issue 14, item 1): a rental shop whose `rental` is partitioned
by its key (range, a hash sub-partitioned level, a DEFAULT partition) and mapped by its store column, and whose
`payment` is partitioned by month and takes the store of its rental (a parent that is itself partitioned).
The mapped batches walk each leaf partition with a checkpoint of its own, resume after a kill, and the
rollout triggers on the parents assign rows written through the parent or into a partition directly.

Expected tenants are worked out here from the shop's rows (a store's tenant is the one named by its address),
not with the runbook's mapping expressions."""

import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT, Db, create_database, drop_database
from runbook_helpers import params as params_mod
from runbook_helpers.phases import rollback, validate

SHOP = """
CREATE TABLE store (store_id serial PRIMARY KEY, address text NOT NULL,
                    last_update timestamptz NOT NULL DEFAULT '2020-01-01');
CREATE TABLE staff (staff_id serial PRIMARY KEY, username text NOT NULL, email text NOT NULL,
                    store_id int NOT NULL REFERENCES store, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE film (film_id serial PRIMARY KEY, title text NOT NULL);
CREATE TABLE customer (customer_id serial PRIMARY KEY, store_id int NOT NULL REFERENCES store, name text NOT NULL);
CREATE TABLE rental (
  rental_id bigint PRIMARY KEY, store_id int NOT NULL REFERENCES store,
  customer_id int NOT NULL REFERENCES customer, rented_on date NOT NULL
) PARTITION BY RANGE (rental_id);
CREATE TABLE rental_low PARTITION OF rental FOR VALUES FROM (1) TO (401);
CREATE TABLE rental_high PARTITION OF rental FOR VALUES FROM (401) TO (1001) PARTITION BY HASH (rental_id);
CREATE TABLE rental_high_0 PARTITION OF rental_high FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE rental_high_1 PARTITION OF rental_high FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE rental_default PARTITION OF rental DEFAULT;
CREATE TABLE payment (
  payment_id bigserial, rental_id bigint NOT NULL REFERENCES rental, amount numeric(6, 2) NOT NULL,
  paid_on date NOT NULL, PRIMARY KEY (payment_id, paid_on)
) PARTITION BY RANGE (paid_on);
CREATE TABLE payment_2024_01 PARTITION OF payment FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE payment_2024_02 PARTITION OF payment FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');
CREATE TABLE payment_2024_03 PARTITION OF payment FOR VALUES FROM ('2024-03-01') TO ('2024-04-01');
CREATE TABLE payment_default PARTITION OF payment DEFAULT;
INSERT INTO store (address) VALUES ('47 MySakila Drive'), ('28 MySQL Boulevard'), ('1 Empty Street');
INSERT INTO staff (username, email, store_id) VALUES ('mike', 'mike@shop.example', 1), ('jon', 'jon@shop.example', 2);
INSERT INTO film (title) VALUES ('film 1');
INSERT INTO customer (store_id, name) SELECT 1 + i % 2, 'customer ' || i FROM generate_series(1, 40) i;
INSERT INTO rental (rental_id, store_id, customer_id, rented_on)
SELECT g, c.store_id, c.customer_id, date '2024-01-01' + g % 90
FROM generate_series(1, 1000) g JOIN customer c ON c.customer_id = 1 + g % 40;
INSERT INTO rental VALUES (5000, 2, 1, '2024-06-01');
INSERT INTO payment (rental_id, amount, paid_on)
SELECT rental_id, 1 + rental_id % 7, rented_on + (rental_id % 5)::int FROM rental WHERE rental_id % 4 <> 0;
"""
RENTAL_LEAVES = ["rental_default", "rental_high_0", "rental_high_1", "rental_low"]
PAYMENT_LEAVES = ["payment_2024_01", "payment_2024_02", "payment_2024_03", "payment_default"]

SPEC = """
core_tables: !replace
  staff: {org_column: store_id}
  customer: {org_column: store_id}
  rental: {org_column: store_id}
  payment:
    parent: {table: rental, column: rental_id}
validate:
  smoke_queries:
    - name: payments of a customer
      sql: SELECT p.payment_id, p.amount FROM payment p JOIN rental r USING (rental_id) WHERE r.customer_id = 1
"""
OVERRIDES = {"rls": {"enabled": True}, "distribution": {"composite_keys": True},
             "backfill": {"batch_size": 100, "target_batch_ms": None}}

# a store's tenant from the shop's own data: tenants are named by the store's address
STORE_TENANT = "(SELECT t.id FROM tenants t JOIN store s ON s.address = t.name WHERE s.store_id = {})"


def params_folder(tmp_path):
    folder = tmp_path / "params"
    shutil.copytree(ROOT / "params", folder, dirs_exist_ok=True)
    (folder / "ci.yaml").write_text("extends: apps/rental_shop.yaml\ndatabase: {embedded: true}\n"
                                    "legacy: {enabled: true}\n" + SPEC)
    return folder


def load_params(folder):
    return params_mod.override(params_mod.load("ci", folder), OVERRIDES)


@pytest.fixture
def shop(server, tmp_path):
    name = f"t_pshop_{uuid.uuid4().hex[:10]}"
    create_database(server, name, None)
    db = Db(server, name, load_params(params_folder(tmp_path)))
    db.execute(SHOP)
    db.folder = tmp_path / "params"
    yield db
    drop_database(server, name)


@pytest.fixture
def shop_migrated(migrated_db, tmp_path):
    """The shop migrated in process through the given phases: a copy of this worker's migrated template of it."""
    return lambda *phases: migrated_db(*phases, params=load_params(params_folder(tmp_path)), schema=SHOP)


def rows(db, query, args=None):
    with db.connect() as conn:
        return conn.execute(query, args).fetchall()


def misplaced(db) -> dict[str, tuple[int, int]]:
    """Per mapped partitioned table: (rows, rows whose tenant is not their store's)."""
    rental = rows(db, "SELECT count(*), count(*) FILTER (WHERE r.tenant_id IS DISTINCT FROM "
                      + STORE_TENANT.format("r.store_id") + ") FROM rental r")[0]
    payment = rows(db, "SELECT count(*), count(*) FILTER (WHERE p.tenant_id IS DISTINCT FROM "
                       + STORE_TENANT.format("r.store_id") + ") FROM payment p JOIN rental r USING (rental_id)")[0]
    return {"rental": rental, "payment": payment}


def checkpoints(db):
    with db.session("backfill") as rb:
        frame = rb.ledger.checkpoints(rb.control)
    return frame.groupby("table_name").agg(rows=("rows_updated", "sum"), batches=("batches", "sum"),
                                           finished=("finished_at", lambda s: s.notna().all()))


def leaf_counts(db, table):
    return dict(rows(db, f"SELECT tableoid::regclass::text, count(*) FROM {table} GROUP BY 1"))


def test_preflight_accepts_a_mapped_partitioned_table_and_the_plan_walks_each_leaf(shop):
    """Replaces test_partitions.py's test that preflight refused this: the mapping now walks the partitions."""
    out = shop.run("inspect")["inspect"]
    pre = out["preflight"].set_index("check")
    assert (pre["status"] == "ok").all(), pre[pre["status"] != "ok"]
    assert pre.loc["partitioned core tables are named by their parent", "detail"] == (
        "partitioned: rental (5 partitions), payment (4 partitions); each is migrated through its parent, scans and "
        "batches partition by partition")
    assert pre.loc["legacy mapping can run", "detail"] == \
        "4 core tables map to their org's tenant: staff, customer, rental, payment"
    plan = out["plan"]
    for table, leaves in (("rental", RENTAL_LEAVES), ("payment", PAYMENT_LEAVES)):
        actions = [a for a in plan[plan["table"] == table]["action"] if a.startswith("give each row")]
        assert sorted(actions) == [f"give each row of partition {leaf} its org's tenant in batches of 100 (keyset on "
                                   f"({'rental_id' if table == 'rental' else 'payment_id, paid_on'}); its own "
                                   f"checkpoint)" for leaf in leaves]


def test_mapped_partitioned_tables_migrate_end_to_end_with_rls_and_composite_keys(shop):
    db = shop
    out = db.run("inspect", "seed", "backfill", "constrain", "validate")
    checks = out["validate"]["checks"]
    assert checks["passed"].all(), checks[~checks["passed"]]
    assert out["validate"]["isolation"]["passed"].all()
    mine = checks[checks["check"] == "rows carry the tenant of their org (recomputed from legacy data)"]
    assert sorted(mine["table"]) == ["customer", "payment", "rental", "staff"]
    # every row has its store's tenant, both stores' tenants hold rows of each table
    assert misplaced(db) == {"rental": (1001, 0), "payment": (750, 0)}
    assert rows(db, "SELECT count(DISTINCT tenant_id) FROM payment") == [(2,)]
    assert rows(db, "SELECT count(*) FROM payment WHERE tenant_id = (SELECT id FROM tenants WHERE uuid = %s)",
                (str(db.params.system_tenant.uuid),)) == [(0,)]
    # leaf by leaf, each with its checkpoint, every row moved once (the fast default had put them on the System Tenant)
    cp = checkpoints(db)
    counts = {**leaf_counts(db, "rental"), **leaf_counts(db, "payment")}
    assert cp["rows"].to_dict() == {**counts, "customer": 40, "staff": 2}
    assert cp.loc[PAYMENT_LEAVES, "finished"].all() and cp.loc["payment_2024_02", "batches"] >= 3
    # composite keys through the partitions: payment's key to its rental carries the tenant
    fks = [d for (d,) in rows(db, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                                  "'payment'::regclass AND contype = 'f'")]
    assert any(d.startswith("FOREIGN KEY (tenant_id, rental_id) REFERENCES rental(tenant_id, rental_id)") for d in fks)
    again = db.run("seed", "backfill", "constrain")  # after success every phase is a no-op
    assert again["backfill"]["plan"].empty and again["constrain"]["plan"].empty


def test_rollback_after_the_mapped_migration_restores_the_exact_schema_and_rows(shop_migrated):
    db = shop_migrated()
    legacy = db.schema_dump(exclude_ledger=True)
    content = rows(db, "SELECT tableoid::regclass::text, count(*), sum(hashtext(p::text)) FROM payment p GROUP BY 1 "
                       "ORDER BY 1")
    db = shop_migrated("inspect", "seed", "backfill", "constrain")
    rb = db.session("rollback")
    try:
        rollback.apply(rb)
        assert rollback.assert_rolled_back(rb) == rollback.ROLLED_BACK + rollback.RETIRED
    finally:
        rb.close()
    assert db.schema_dump(exclude_ledger=True) == legacy
    assert rows(db, "SELECT tableoid::regclass::text, count(*), sum(hashtext(p::text)) FROM payment p GROUP BY 1 "
                    "ORDER BY 1") == content


def test_rollout_triggers_assign_through_the_parent_and_into_a_partition_and_children_follow(shop_migrated):
    db = shop_migrated("inspect", "seed", "backfill")
    store = {s: db.scalar(STORE_TENANT.format(s)) for s in (1, 2)}
    # through the parent and directly into a partition: each row gets its store's (or its rental's) tenant
    db.execute("INSERT INTO rental VALUES (6000, 2, 1, '2024-07-01')")
    db.execute("INSERT INTO rental_default VALUES (6001, 1, 2, '2024-07-02')")
    db.execute("INSERT INTO payment (rental_id, amount, paid_on) VALUES (6000, 3, '2024-07-03')")
    db.execute("INSERT INTO payment_2024_02 (rental_id, amount, paid_on) VALUES (6001, 4, '2024-02-10')")
    assert rows(db, "SELECT rental_id, tenant_id FROM rental WHERE rental_id >= 6000 ORDER BY 1") == \
        [(6000, store[2]), (6001, store[1])]
    assert rows(db, "SELECT tableoid::regclass::text, tenant_id FROM payment WHERE rental_id >= 6000 ORDER BY 1") == \
        [("payment_2024_02", store[1]), ("payment_default", store[2])]
    # a rental the application moves to another store takes its payments along, whichever partition holds them
    moved = 7  # a store-1 rental (customer 8) with a payment in January; two more in other months
    db.execute("INSERT INTO payment (rental_id, amount, paid_on) VALUES (%s, 5, '2024-03-15'), (%s, 6, '2025-01-01')",
               (moved, moved))
    assert db.scalar("SELECT store_id FROM rental WHERE rental_id = %s", (moved,)) == 1
    db.execute("UPDATE rental SET store_id = 2 WHERE rental_id = %s", (moved,))
    assert rows(db, "SELECT tableoid::regclass::text, tenant_id FROM payment WHERE rental_id = %s ORDER BY 1",
                (moved,)) == [("payment_2024_01", store[2]), ("payment_2024_03", store[2]), ("payment_default", store[2])]
    # recorded under the core table's name, whichever partition was written
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.app_writes WHERE table_name = 'payment' "
                     "AND first_op = 'INSERT'") == 4
    assert misplaced(db)["payment"][1] == 0


def failing(db):
    with db.session("validate") as rb:
        frame = validate.checks(rb)
    return frame[~frame["passed"]]


def test_validate_counts_a_partitions_row_on_the_wrong_tenant_and_backfill_moves_it_back(shop_migrated):
    db = shop_migrated("inspect", "seed", "backfill")
    check = "rows carry the tenant of their org (recomputed from legacy data)"
    assert check not in set(failing(db)["check"])
    db.execute_unrecorded("UPDATE payment_2024_03 SET tenant_id = (SELECT id FROM tenants WHERE uuid = %s) "
                          "WHERE payment_id = (SELECT min(payment_id) FROM payment_2024_03)",
                          (str(db.params.system_tenant.uuid),))
    wrong = failing(db)
    assert wrong[wrong["check"] == check][["table", "expected", "actual"]].values.tolist() == [["payment", "0", "1"]]
    assert db.run("backfill")["backfill"]["report"].summary.set_index("table").loc["payment", "rows updated"] == 1
    assert check not in set(failing(db)["check"])
    assert misplaced(db)["payment"] == (750, 0)


WORKER = """
import sys
from pathlib import Path
from runbook_helpers import params as params_mod
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.run.session import PhaseSession
p = params_mod.override(params_mod.load("ci", Path(sys.argv[3])), {overrides!r})
for phase in sys.argv[2].split(","):
    run_phase(PhaseSession(phase, params=p, database_name=sys.argv[1], run_id="pmapfault", log=lambda *_: None))
print("completed")
"""


@pytest.mark.slow
def test_a_mapped_backfill_killed_inside_a_partition_resumes_from_that_partitions_checkpoint(shop):
    db = shop
    env = dict(os.environ, RUNBOOK_HEADLESS="1", RUNBOOK_FAULT="backfill.after_batch=payment_2024_02#2@kill")
    proc = subprocess.run([sys.executable, "-c", WORKER.format(overrides=OVERRIDES), db.name, "inspect,seed,backfill",
                           str(db.folder)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    before = checkpoints(db)
    assert before.loc[RENTAL_LEAVES + ["payment_2024_01"], "finished"].all()
    assert (before.loc["payment_2024_02", "batches"], before.loc["payment_2024_02", "finished"]) == (2, False)
    assert "payment_2024_03" not in before.index
    assert misplaced(db)["payment"][1] > 0
    db.run("backfill")
    after = checkpoints(db)
    # the finished leaves were not walked again; the killed one went on from its checkpoint, each row once
    assert after.loc[RENTAL_LEAVES + ["payment_2024_01"]].equals(before.loc[RENTAL_LEAVES + ["payment_2024_01"]])
    assert after.loc[PAYMENT_LEAVES, "finished"].all()
    assert after.loc[PAYMENT_LEAVES, "rows"].to_dict() == leaf_counts(db, "payment")
    assert misplaced(db) == {"rental": (1001, 0), "payment": (750, 0)}
    checks = db.run("constrain", "validate")["validate"]["checks"]
    assert checks["passed"].all(), checks[~checks["passed"]]
