"""Conflicts between tenants found before anything changes (issue 14, item 5), on a small rental-shop schema of
its own: stores are the legacy orgs, customers and inventory belong to a store, a rental follows its inventory
item (its parent) and also references a customer, who may belong to another store.

Expected counts and keys are worked out here from the rows the fixture writes, not with the runbook's
expressions.
"""

from __future__ import annotations

import pytest

from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.legacy import conflicts
from runbook_helpers.phases import inspect
from runbook_helpers.distribution import readiness
from runbook_helpers.tenancy import lint

SHOP_SQL = """
CREATE TABLE org (id bigserial PRIMARY KEY, uuid uuid NOT NULL UNIQUE, name text NOT NULL, slug text NOT NULL UNIQUE,
  plan text NOT NULL DEFAULT 'free', created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(), deleted_at timestamptz);
CREATE TABLE "user" (id bigserial PRIMARY KEY, uuid uuid NOT NULL UNIQUE, email text NOT NULL, display_name text,
  org_ids bigint[] NOT NULL DEFAULT '{}', role_ids bigint[] NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE org_user (org_id bigint NOT NULL REFERENCES org, user_id bigint NOT NULL REFERENCES "user",
  role text NOT NULL DEFAULT 'member', created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (org_id, user_id));
CREATE TABLE customer (id bigserial PRIMARY KEY, org_id bigint REFERENCES org, name text NOT NULL);
CREATE TABLE inventory (id bigserial PRIMARY KEY, org_id bigint REFERENCES org, film text NOT NULL);
CREATE TABLE rental (id bigserial PRIMARY KEY, inventory_id bigint NOT NULL REFERENCES inventory,
  customer_id bigint NOT NULL REFERENCES customer, rented_at timestamptz NOT NULL DEFAULT now());
INSERT INTO org (uuid, name, slug) VALUES (gen_random_uuid(), 'Store 1', 's1'), (gen_random_uuid(), 'Store 2', 's2');
INSERT INTO "user" (uuid, email) VALUES (gen_random_uuid(), 'm1@example.com'), (gen_random_uuid(), 'm2@example.com');
INSERT INTO org_user (org_id, user_id, role) VALUES (1, 1, 'owner'), (2, 2, 'owner');
-- store 1 + (id % 2): odd ids in store 2, even ids in store 1
INSERT INTO customer (org_id, name) SELECT 1 + g % 2, 'customer ' || g FROM generate_series(1, 20) g;
INSERT INTO inventory (org_id, film) SELECT 1 + g % 2, 'film ' || g FROM generate_series(1, 10) g;
-- rentals 1..20 rent to a customer of the item's store, 21..40 to one of the other store
INSERT INTO rental (inventory_id, customer_id)
SELECT 1 + g % 10, 1 + g % 10 + CASE WHEN g > 20 THEN 1 ELSE 0 END FROM generate_series(1, 40) g;
"""
CROSS_STORE = list(range(21, 41))  # the rentals whose customer belongs to the other store
RULE_KEY = "rental.rental_customer_id_fkey"


def shop_params(base: params_mod.Params, **changes) -> params_mod.Params:
    """The ci params (composite keys on) for the shop's tables instead of the demo's, with the legacy mapping."""
    d = base.model_dump(by_alias=True)
    d["core_tables"] = {"customer": {"org_column": "org_id"}, "inventory": {"org_column": "org_id"},
                        "rental": {"parent": {"table": "inventory", "column": "inventory_id"}}}
    d["shared_tables"] = []
    d["rls"] = {**d["rls"], "enabled": False, "legacy_role": None, "lint_accept": []}
    d["drizzle"] = {**d["drizzle"], "folder": None, "record_after_validate": [], "schema_file": None}
    d["validate"] = {"smoke_queries": []}
    d["legacy"]["enabled"] = True
    d["distribution"]["composite_keys"] = True
    d.update(changes)
    return params_mod.Params.model_validate(d)


@pytest.fixture
def shop(empty_db):
    db = empty_db
    db.execute(SHOP_SQL)
    db.params = shop_params(db.params)
    return db


def legacy_insert_works(db) -> dict[str, str]:
    """The legacy application's inserts, as it writes them (no tenant_id): table -> 'ok' or the error."""
    out = {}
    statements = {
        "customer": "INSERT INTO customer (org_id, name) VALUES (1, 'new customer')",
        "inventory": "INSERT INTO inventory (org_id, film) VALUES (2, 'new film')",
        "rental (same store)": "INSERT INTO rental (inventory_id, customer_id) VALUES (2, 2)",
        "rental (other store)": "INSERT INTO rental (inventory_id, customer_id) VALUES (2, 3)",
    }
    for what, statement in statements.items():
        try:
            db.execute(statement)
            out[what] = "ok"
        except Exception as exc:  # the database's own refusal, reported as the test's outcome
            out[what] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return out



def with_rules(db, rules: dict) -> None:
    db.params = params_mod.override(db.params, {"cross_tenant": {"foreign_keys": rules}})


def ledger_exists(db) -> bool:
    return db.scalar("SELECT to_regnamespace('tenancy_runbook') IS NOT NULL")


def tenant_of(db, table: str, key: int) -> int:
    return db.scalar(f"SELECT tenant_id FROM {table} WHERE id = %s", (key,))


def store_tenant(db, store: int) -> int:
    return db.scalar("SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = %s", (store,))


# --- found in inspect, before anything changes -------------------------------------------------------

def test_inspect_counts_rows_across_tenants_per_foreign_key_with_sample_keys_and_stops(shop):
    db = shop
    with db.session("inspect") as rb:
        frame = inspect.tenant_conflicts(rb).set_index("object")
    row = frame.loc[RULE_KEY]
    assert (row["kind"], row["rows"], row["rule"], row["status"]) == (conflicts.FOREIGN_KEY, len(CROSS_STORE), "stop",
                                                                      "FAIL")
    # rental 21 rents item 2 (store 1) to customer 3 (store 2): it follows its item, its customer does not
    assert row["sample keys"].split("; ") == [f"rental {r} (org {1 + (1 + r % 10) % 2}) -> customer {1 + r % 10 + 1} "
                                              f"(org {1 + (2 + r % 10) % 2})" for r in CROSS_STORE[:5]]
    assert frame.loc["rental.rental_inventory_id_fkey", "rows"] == 0  # the parent it follows: never across
    assert set(frame["kind"]) == {conflicts.FOREIGN_KEY}             # no table carries tenant_id yet

    with pytest.raises(RunbookError) as err:
        db.run("inspect")
    message = str(err.value)
    assert "no conflicts between tenants" in message and f"{RULE_KEY} -> customer (customer_id): 20 rows" in message
    assert "rental 21 (org 1) -> customer 3 (org 2)" in message
    assert f"cross_tenant.foreign_keys: {{{RULE_KEY}: {{wins: parent}}}}" in message
    assert not ledger_exists(db)  # no baseline, no ledger: nothing was changed


def test_without_the_legacy_mapping_every_row_goes_to_the_system_tenant_so_nothing_crosses(shop):
    db = shop
    db.params = params_mod.override(db.params, {"legacy": {"enabled": False}})
    with db.session("inspect") as rb:
        frame = inspect.tenant_conflicts(rb)
    assert len(frame) == 2 and frame["rows"].sum() == 0 and set(frame["status"]) == {conflicts.OK}


def test_later_phases_refuse_with_nothing_changed_while_a_conflict_has_no_rule(shop):
    db = shop
    with_rules(db, {RULE_KEY: {"wins": "child", "reason": "a customer may rent at any store"}})
    db.run("inspect")  # accepted: inspect passes and captures the baseline
    with_rules(db, {RULE_KEY: {"wins": "stop"}})
    with pytest.raises(RunbookError) as err:
        db.run("seed")
    assert f"{RULE_KEY} -> customer (customer_id): 20 rows" in str(err.value) and "Nothing was changed" in str(err.value)
    assert db.scalar("SELECT to_regclass('public.tenants')") is None  # seed created nothing


def test_backfill_refuses_with_nothing_changed_while_a_conflict_has_no_rule(shop):
    db = shop
    with_rules(db, {RULE_KEY: {"wins": "child", "reason": "a customer may rent at any store"}})
    db.run("inspect", "seed")
    with_rules(db, {RULE_KEY: {"wins": "stop"}})
    with pytest.raises(RunbookError, match=f"{RULE_KEY} -> customer \\(customer_id\\): 20 rows"):
        db.run("backfill")
    assert db.scalar("SELECT count(*) FROM pg_attribute WHERE attname = 'tenant_id' AND attrelid IN "
                     "('customer'::regclass, 'inventory'::regclass, 'rental'::regclass)") == 0


def test_existing_tenant_id_naming_no_tenant_is_counted_and_stops_inspect(shop):
    """A table whose tenant_id is already NOT NULL but names no tenant used to pass inspect, seed and backfill
    and fail in constrain, leaving its foreign key NOT VALID."""
    db = shop
    db.params = params_mod.override(db.params, {"legacy": {"enabled": False}})
    db.execute("ALTER TABLE inventory ADD COLUMN tenant_id bigint NOT NULL DEFAULT 999")
    with db.session("inspect") as rb:
        frame = inspect.tenant_conflicts(rb).set_index("object")
    row = frame.loc["inventory.tenant_id"]
    assert (row["kind"], row["rows"], row["status"]) == (conflicts.NO_TENANT, 10, "FAIL")
    assert row["sample keys"] == "; ".join(f"inventory {i} (tenant_id 999)" for i in range(1, 6))
    # without the mapping the rentals land in the System Tenant, their items in "tenant 999": that crosses too
    assert frame.loc["rental.rental_inventory_id_fkey", "rows"] == 40
    with pytest.raises(RunbookError) as err:
        db.run("inspect")
    assert "inventory.tenant_id: 10 rows name no tenant (e.g. inventory 1 (tenant_id 999)" in str(err.value)
    assert not ledger_exists(db)


def test_a_rule_naming_no_foreign_key_stops_preflight(shop):
    db = shop
    with_rules(db, {"rental.no_such_fkey": {"wins": "parent"}, RULE_KEY: {"wins": "child", "reason": "customers rent anywhere"}})
    with pytest.raises(RunbookError) as err:
        db.run("inspect")
    assert "cross_tenant.foreign_keys.rental.no_such_fkey: no such foreign key between core tables" in str(err.value)


def test_a_child_rule_needs_a_reason():
    with pytest.raises(params_mod.ParamsError) as err:
        params_mod.override(params_mod.load("ci"), {"cross_tenant": {"foreign_keys": {RULE_KEY: {"wins": "child"}}}})
    assert "wins: child keeps a reference across tenants; say why" in str(err.value)


# --- the rules, honoured by backfill, the rollout trigger, constrain, the lint and readiness ------------

def test_child_wins_keeps_the_plain_foreign_key_and_the_application_writes_across_stores(shop):
    db = shop
    reason = "a customer may rent at any store; the rental belongs to the store of its item"
    with_rules(db, {RULE_KEY: {"wins": "child", "reason": reason}})
    out = db.run()  # inspect … validate
    assert out["validate"]["verdict"]
    assert tenant_of(db, "rental", 21) == store_tenant(db, 1) and tenant_of(db, "customer", 3) == store_tenant(db, 2)
    fks = db.scalar("SELECT array_agg(conname::text ORDER BY conname) FROM pg_constraint WHERE contype = 'f' "
                    "AND conrelid = 'rental'::regclass")
    assert "rental_tenant_id_customer_id_customer_tenant_id_id_fk" not in fks  # no composite twin for it
    assert "rental_tenant_id_inventory_id_inventory_tenant_id_id_fk" in fks   # the parent's twin is there
    with db.session("validate") as rb:
        findings = lint.run(rb).set_index("object")
        ready = readiness.readiness(rb).set_index("object")
    assert (findings.loc[RULE_KEY, "status"], findings.loc[RULE_KEY, "reason"]) == (lint.ACCEPTED, reason)
    assert "an accepted cross-tenant reference" in ready.loc[RULE_KEY, "finding"]
    assert set(legacy_insert_works(db).values()) == {"ok"}


def test_child_wins_lets_an_unmapped_table_reference_a_mapped_one(shop):
    """A table without a mapping that references a mapped one must follow it, unless the reference is accepted
    across tenants: then its rows keep the System Tenant."""
    db = shop
    db.execute("CREATE TABLE payment (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customer, amount int);"
               "INSERT INTO payment (customer_id, amount) SELECT 1 + g % 20, g FROM generate_series(1, 30) g")
    db.params = params_mod.override(db.params, {"core_tables": {"payment": {}}})
    with db.session("inspect") as rb:
        pre = inspect.preflight(rb).set_index("check")
    assert "core_tables.payment: it references customer" in pre.loc["legacy mapping can run", "detail"]
    assert "payment.payment_customer_id_fkey -> customer (customer_id): 30 rows" in \
        pre.loc["no conflicts between tenants", "detail"]
    with_rules(db, {"payment.payment_customer_id_fkey": {"wins": "child", "reason": "payments are settled centrally"}})
    with_rules(db, {RULE_KEY: {"wins": "child", "reason": "a customer may rent at any store"}})
    with db.session("inspect") as rb:
        pre = inspect.preflight(rb).set_index("check")
    assert pre.loc["legacy mapping can run", "status"] == "ok" and pre.loc["no conflicts between tenants", "status"] == "ok"


def test_parent_wins_moves_the_child_to_that_parent_in_backfill_and_the_rollout_trigger(shop):
    db = shop
    with_rules(db, {RULE_KEY: {"wins": "parent"}})
    with db.session("inspect") as rb:  # the rental now follows its customer: its item is the one across
        frame = inspect.tenant_conflicts(rb).set_index("object")
    assert frame.loc[RULE_KEY, "rows"] == 0 and frame.loc["rental.rental_inventory_id_fkey", "rows"] == 20
    with pytest.raises(RunbookError, match="rental.rental_inventory_id_fkey -> inventory"):
        db.run("inspect")
    with_rules(db, {RULE_KEY: {"wins": "parent"},
                    "rental.rental_inventory_id_fkey": {"wins": "child", "reason": "items are lent between stores"}})
    assert db.run()["validate"]["verdict"]
    for r in (1, 21):  # backfill gave each rental its customer's store
        customer = 1 + r % 10 + (1 if r > 20 else 0)
        assert tenant_of(db, "rental", r) == store_tenant(db, 1 + customer % 2)
    db.execute("INSERT INTO rental (id, inventory_id, customer_id) VALUES (100, 2, 3)")  # item: store 1, customer: 2
    assert tenant_of(db, "rental", 100) == store_tenant(db, 2)  # the rollout trigger follows the customer


# --- a failed VALIDATE names its rows, and leaves the application writing -----------------------------

@pytest.fixture
def shop_backfilled(shop):
    """The shop without cross-store rentals, migrated up to constrain; then the application writes one (its
    trigger gives it the item's store), as if right after constrain's own preflight had passed."""
    db = shop
    db.execute("DELETE FROM rental WHERE id > 20")
    db.run("inspect", "seed", "backfill")
    db.execute("INSERT INTO rental (inventory_id, customer_id) VALUES (2, 3)")  # id 41: the sequence is at 40
    return db


def test_constrain_refuses_a_conflict_written_since_backfill_with_nothing_changed(shop_backfilled):
    db = shop_backfilled
    with pytest.raises(RunbookError) as err:
        db.run("constrain")
    assert f"{RULE_KEY} -> customer (customer_id): 1 rows" in str(err.value) and "rental 41" in str(err.value)
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conrelid = 'rental'::regclass AND contype IN ('c', 'u') "
                     "OR conname LIKE '%tenant_id%' AND conrelid = 'rental'::regclass") == 0


def test_a_failed_validate_names_count_and_keys_and_the_legacy_application_keeps_writing(shop_backfilled, monkeypatch):
    db = shop_backfilled
    # the conflict lands after constrain's preflight passed (a write racing it): VALIDATE meets it
    monkeypatch.setattr(conflicts, "require_resolved", lambda rb, actual=False: None)
    with pytest.raises(RunbookError) as err:
        db.run("constrain")
    message = str(err.value)
    composite = "rental_tenant_id_customer_id_customer_tenant_id_id_fk"
    assert f"validate {composite} failed" in message
    assert f"1 row violate it, e.g. (id) = (41): tenant_id, customer_id = ({store_tenant(db, 1)}, 3)" in message
    assert "undone so new writes do not meet it" in message
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = %s", (composite,)) == 0
    # the legacy application writes every kind of row it wrote before, across stores too
    assert legacy_insert_works(db) == {"customer": "ok", "inventory": "ok", "rental (same store)": "ok",
                                       "rental (other store)": "ok"}


def test_validate_failures_of_the_not_null_check_and_the_tenants_key_name_their_rows(shop_backfilled, monkeypatch):
    db = shop_backfilled
    db.execute("DELETE FROM rental WHERE id = 41")
    monkeypatch.setattr(conflicts, "require_resolved", lambda rb, actual=False: None)  # as if written after the preflight
    db.execute_unrecorded("UPDATE customer SET tenant_id = NULL WHERE id IN (4, 7)")
    with pytest.raises(RunbookError) as err:
        db.run("constrain")
    assert "customer: validate the NOT NULL check failed" in str(err.value)
    assert "2 rows violate it, e.g. (id) = (4): tenant_id = (NULL), (id) = (7): tenant_id = (NULL)" in str(err.value)
    db.execute_unrecorded("UPDATE customer SET tenant_id = 999 WHERE id IN (4, 7)")
    with pytest.raises(RunbookError) as err:
        db.run("constrain")
    assert "customer: validate the foreign key failed" in str(err.value)
    assert "2 rows violate it, e.g. (id) = (4): tenant_id = (999), (id) = (7): tenant_id = (999)" in str(err.value)
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = 'customer_tenant_id_tenants_id_fk'") == 0
    assert set(legacy_insert_works(db).values()) == {"ok"}
