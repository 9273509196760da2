"""The second schema (issue 14, item 7): a rental shop of our own making with the shapes the demo does not have
(tests/schemas/shop.sql: a range partitioned table with hash sub-partitions and a DEFAULT partition, keys
without a default, unique keys over several columns, views, a materialized view, a trigger, a SECURITY DEFINER
function, a function that writes, cross-tenant references of several kinds), migrated end to end with the legacy
mapping (stores as tenants), RLS and composite keys on, validated clean, and rolled back exactly.

Expected values are worked out from the shop's own rows, not with the runbook's expressions."""

import shutil
import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import ROOT, Db, create_database, drop_database
from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import rollback, validate
from runbook_helpers.phases.headless import run_phase

SCHEMAS = Path(__file__).parent / "schemas"
TABLES = ["store", "staff", "customer", "inventory", "rental", "payment"]
STORE_TENANT = "(SELECT m.tenant_id FROM tenancy_runbook.org_tenants m WHERE m.org_id = {}.store_id)"


def spec_params(tmp_path, name: str, extra: str = "") -> params_mod.Params:
    """The ci env (its embedded server) with the spec tests/schemas/<name>.yaml in place of the demo's."""
    folder = tmp_path / "params"
    shutil.copytree(ROOT / "params", folder, dirs_exist_ok=True)
    shutil.copy(SCHEMAS / f"{name}.yaml", folder / "apps" / f"{name}.yaml")
    (folder / "ci.yaml").write_text(f"extends: apps/{name}.yaml\ndatabase: {{embedded: true}}\n" + extra)
    return params_mod.load("ci", folder)


def shop_params(tmp_path, extra: str = "") -> params_mod.Params:
    """The ci env (its embedded server) with the shop's spec in place of the demo's."""
    return spec_params(tmp_path, "shop", extra)


@pytest.fixture
def shop(server, tmp_path):
    name = f"t_shop2_{uuid.uuid4().hex[:10]}"
    create_database(server, name, None)
    db = Db(server, name, shop_params(tmp_path))
    db.execute((SCHEMAS / "shop.sql").read_text())
    yield db
    drop_database(server, name)


def rows(db, query, args=None):
    with db.connect() as conn:
        return conn.execute(query, args).fetchall()


def counts(db) -> dict[str, int]:
    return {t: rows(db, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES + ["film"]}


def app_view(db, role: str, tenant: int | None, query: str):
    """What a role sees, with the tenant set for the transaction as the tenant-aware application sets it."""
    with db.connect() as conn:
        conn.execute(f"SET ROLE {role}")
        if tenant is not None:
            conn.execute("SELECT set_config('app.current_tenant_id', %s, true)", (str(tenant),))
        try:
            return conn.execute(query).fetchall()
        except psycopg.Error as exc:
            return exc.sqlstate


def test_the_shop_migrates_end_to_end_validates_clean_and_rolls_back_exactly(shop):
    db = shop
    before_rows, before_schema = counts(db), db.schema_dump()
    sales_before = rows(db, "SELECT * FROM sales_by_store ORDER BY store_id")
    results = db.run("inspect", "seed", "backfill", "constrain", "validate")

    # inspect found the cross-tenant references and the params' rule for each; nothing stopped
    conflicts = results["inspect"]["conflicts"]
    found = conflicts[conflicts["rows"] > 0].set_index("object")
    across = "SELECT count(*) FROM rental r JOIN inventory i USING (inventory_id) JOIN {} USING ({}) WHERE i.store_id <> x.store_id"
    expected = {"rental.rental_customer_id_fkey": rows(db, across.format("customer x", "customer_id"))[0][0],
                "rental.rental_staff_id_fkey": rows(db, across.format("staff x", "staff_id"))[0][0],
                "payment.payment_customer_id_fkey": rows(db, across.replace("FROM rental r", "FROM payment p JOIN "
                                                         "rental r USING (rental_id)").replace("JOIN {} USING ({})",
                                                         "JOIN customer x ON x.customer_id = p.customer_id"))[0][0]}
    assert min(expected.values()) > 1000
    assert found["rows"].to_dict() == expected
    assert set(found["rule"]) == {"child"} and set(found["status"]) == {"accepted"}

    checks = results["validate"]["checks"]
    assert checks["passed"].all(), checks[~checks["passed"]].to_dict("records")
    isolation = results["validate"]["isolation"]
    assert isolation["passed"].all(), isolation[~isolation["passed"]].to_dict("records")
    assert set(isolation["table"]) >= set(TABLES)
    smoke = checks[checks["check"] == "smoke query runs"].set_index("table")["actual"]
    assert smoke["overdue report (stages rows in a temporary table)"] == "runs (its writes rolled back)"
    assert counts(db) == before_rows  # no row lost or added

    # every row carries its store's tenant: its own store, its copy's store, its rental's
    for table in ("store", "staff", "customer", "inventory"):
        assert rows(db, f"SELECT count(*) FROM {table} x WHERE x.tenant_id IS DISTINCT FROM "
                        f"{STORE_TENANT.format('x')}") == [(0,)], table
    assert rows(db, "SELECT count(*) FROM rental r JOIN inventory i USING (inventory_id) "
                    "WHERE r.tenant_id IS DISTINCT FROM i.tenant_id") == [(0,)]
    assert rows(db, "SELECT count(*) FROM payment p JOIN rental r USING (rental_id) "
                    "WHERE p.tenant_id IS DISTINCT FROM r.tenant_id") == [(0,)]
    assert rows(db, "SELECT count(DISTINCT tenant_id) FROM payment") == [(3,)]

    # every leaf partition has tenant_id NOT NULL, its part of the index attached, and RLS of its own
    leaves = rows(db, "SELECT c.relname, a.attnotnull, c.relrowsecurity, c.relforcerowsecurity FROM pg_inherits i "
                      "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_attribute a ON a.attrelid = c.oid "
                      "AND a.attname = 'tenant_id' WHERE c.relkind = 'r' AND c.relname LIKE 'payment%' ORDER BY 1")
    assert len(leaves) == 9 and all(r[1:] == (True, True, True) for r in leaves), leaves
    assert rows(db, "SELECT bool_and(i.indisvalid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE i.indrelid = 'payment'::regclass AND pg_get_indexdef(i.indexrelid) LIKE '%(tenant_id%'") \
        == [(True,)]

    # composite keys where both sides share a tenant; the accepted cross-tenant references stay plain keys
    composite = {r[0] for r in rows(db, "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid = ANY "
                                        "('{rental,payment}'::regclass[]) AND pg_get_constraintdef(oid) LIKE "
                                        "'FOREIGN KEY (tenant_id,%'")}
    assert any("inventory" in c for c in composite) and any("rental" in c and c.startswith("payment") for c in composite)
    assert not any("customer" in c or "staff" in c for c in composite), composite
    assert rows(db, "SELECT count(*) FROM pg_constraint WHERE conname IN ('rental_customer_id_fkey', "
                    "'rental_staff_id_fkey', 'payment_customer_id_fkey') AND conrelid = ANY "
                    "('{rental,payment}'::regclass[]) AND convalidated") == [(3,)]

    # the tenant-aware application role sees one store through the tables and the views, nothing of the rest
    store_2 = rows(db, f"SELECT {STORE_TENANT.format('s')} FROM store s WHERE store_id = 2")[0][0]
    own = rows(db, "SELECT count(*) FROM customer WHERE store_id = 2")[0][0]
    assert app_view(db, "shop_app", store_2, "SELECT count(*) FROM customer") == [(own,)]
    assert app_view(db, "shop_app", store_2, "SELECT count(*) FROM customer_list") == [(own,)]
    assert app_view(db, "shop_app", store_2, "SELECT count(*) FROM payment_2026_q2_h0") == "42501"
    assert app_view(db, "shop_app", None, "SELECT count(*) FROM payment") == [(0,)]
    assert app_view(db, "shop_app", store_2, "SELECT * FROM sales_by_store") == "42501"
    # the legacy application, unchanged, sees every store and its views and functions answer as before
    assert app_view(db, "shop_legacy", None, "SELECT count(*) FROM payment") == [(before_rows["payment"],)]
    assert rows(db, "SELECT * FROM sales_by_store ORDER BY store_id") == sales_before

    # the legacy application keeps writing without tenant_id: a rental (its key supplied, as the shop does)
    # of a store-2 copy and its payment into the DEFAULT partition get store 2's tenant
    item = rows(db, "SELECT min(inventory_id) FROM inventory WHERE store_id = 2")[0][0]
    with psycopg.connect(db.url, autocommit=True, user="shop_legacy") as conn:
        conn.execute("INSERT INTO rental (rental_id, rental_date, inventory_id, customer_id, staff_id) "
                     "VALUES (999001, '2026-12-01 12:00+00', %s, 1, 1)", (item,))
        conn.execute("INSERT INTO payment (customer_id, rental_id, amount, payment_date) "
                     "VALUES (1, 999001, 3.99, '2031-01-01 00:00+00')")
    assert rows(db, "SELECT tenant_id FROM rental WHERE rental_id = 999001") == [(store_2,)]
    assert rows(db, "SELECT tableoid::regclass::text, tenant_id FROM payment WHERE rental_id = 999001") \
        == [("payment_other", store_2)]

    # the shop's application does not write tenant_id yet: closing the window needs force
    with pytest.raises(RunbookError, match="the application still writes rows without their tenant"):
        db.run("finalize")
    run_phase(db.session("finalize"), force=True)
    assert run_phase(db.session("rollback"))["verdict"] == rollback.ROLLED_BACK + rollback.RETIRED
    assert db.schema_dump(exclude_ledger=True) == before_schema


def test_cross_tenant_references_without_a_rule_stop_inspect_and_change_nothing(shop, tmp_path):
    db = shop
    p = shop_params(tmp_path, "cross_tenant: !replace {foreign_keys: {}}\n")
    with pytest.raises(RunbookError) as err:
        db.run("inspect", params=p)
    assert "rental.rental_customer_id_fkey" in str(err.value)
    assert rows(db, "SELECT to_regclass('tenants') IS NULL") == [(True,)]


def test_tenant_ids_that_name_no_tenant_stop_inspect_and_change_nothing(shop):
    db = shop
    db.execute("ALTER TABLE customer ADD COLUMN tenant_id bigint NOT NULL DEFAULT 42")
    before = db.schema_dump()
    with pytest.raises(RunbookError) as err:
        db.run("inspect")
    assert "customer" in str(err.value) and "42" in str(err.value)
    assert db.schema_dump() == before


def test_the_shop_with_no_rentals_or_payments_probes_every_table_without_an_acceptance(shop):
    """Every table probed (issue 27, item 3), on the shop: its rentals and payments emptied, and payment's DEFAULT
    partition dropped, so a made payment must land in one of 2026's quarters, each hashed in two. The isolation
    suite makes its own rental and payment (the payment's rental one it made), runs every case on every table with
    no acceptance, and leaves both tables empty."""
    db = shop
    db.execute("TRUNCATE payment, rental; DROP TABLE payment_other")
    assert not db.params.rls.isolation_accept
    db.run("inspect", "seed", "backfill", "constrain")
    with db.session("validate") as rb:
        isolation = validate.isolation_suite(rb)
    assert isolation["passed"].all(), isolation[~isolation["passed"]].to_dict("records")
    made = isolation[isolation["case"] == "probe rows created"].set_index("table")["actual"].to_dict()
    assert made == {t: "2 per probe tenant (copies with fresh keys)" for t in TABLES if t not in ("rental", "payment")} \
        | {t: "2 per probe tenant (made for the empty table, with fresh keys)" for t in ("rental", "payment")}
    assert set(isolation[isolation["case"] == "tenant sees exactly its own rows"]["table"]) == set(TABLES)
    assert rows(db, "SELECT (SELECT count(*) FROM rental), (SELECT count(*) FROM payment)") == [(0, 0)]
