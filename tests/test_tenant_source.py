"""A tenant source you name (issue 14, item 4): a rental shop whose `store` rows become tenants, staff become
users and a staff member's store_id its membership, on a small schema of its own (no adapter views); the
demo's org/"user"/org_user is the other configuration (tests/test_legacy_mapping.py).

Expected values are worked out here in Python from the shop's rows, not with the runbook's expressions."""

import shutil
import uuid

import pytest

from conftest import ROOT, Db, create_database, drop_database
from runbook_helpers import params as params_mod
from runbook_helpers.errors import ParamsError, RunbookError
from runbook_helpers.phases import seed

NAMESPACE = uuid.UUID("6f1d3a4e-2b7c-4e0a-9c55-1d2e3f405162")  # params/base.yaml legacy.tenant_uuid_namespace

SHOP = """
CREATE TABLE store (store_id serial PRIMARY KEY, address text NOT NULL,
                    last_update timestamptz NOT NULL DEFAULT '2020-01-01');
CREATE TABLE staff (staff_id serial PRIMARY KEY, username text NOT NULL, email text NOT NULL,
                    store_id int NOT NULL REFERENCES store, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE film (film_id serial PRIMARY KEY, title text NOT NULL);
CREATE TABLE customer (customer_id serial PRIMARY KEY, store_id int NOT NULL REFERENCES store,
                       name text NOT NULL);
CREATE TABLE inventory (inventory_id serial PRIMARY KEY, film_id int NOT NULL REFERENCES film,
                        store_id int NOT NULL REFERENCES store);
CREATE TABLE rental (rental_id serial PRIMARY KEY, inventory_id int NOT NULL REFERENCES inventory,
                     customer_id int NOT NULL REFERENCES customer, staff_id int NOT NULL REFERENCES staff,
                     rented_at timestamptz NOT NULL DEFAULT now());
INSERT INTO store (address) VALUES ('47 MySakila Drive'), ('28 MySQL Boulevard'), ('1 Empty Street');
INSERT INTO staff (username, email, store_id) VALUES
  ('mike', 'Mike@shop.example ', 1), ('jon', 'jon@shop.example', 2), ('ann', 'ann@shop.example', 2),
  ('dup', 'MIKE@shop.example', 2);
INSERT INTO film (title) SELECT 'film ' || i FROM generate_series(1, 20) i;
INSERT INTO customer (store_id, name) SELECT 1 + i % 2, 'customer ' || i FROM generate_series(1, 40) i;
INSERT INTO inventory (film_id, store_id) SELECT 1 + i % 20, 1 + i % 2 FROM generate_series(1, 300) i;
INSERT INTO rental (inventory_id, customer_id, staff_id)
SELECT i.inventory_id, c.customer_id, CASE i.store_id WHEN 1 THEN 1 ELSE 2 END
FROM inventory i JOIN LATERAL (SELECT customer_id FROM customer c WHERE c.store_id = i.store_id
                               ORDER BY (c.customer_id * 7 + i.inventory_id) % 40 LIMIT 1) c ON true;
"""


def shop_params(tmp_path, extra: str = "") -> params_mod.Params:
    """The ci env (its embedded server) with the rental shop's spec instead of the demo's."""
    folder = tmp_path / "params"
    shutil.copytree(ROOT / "params", folder, dirs_exist_ok=True)
    (folder / "ci.yaml").write_text("extends: apps/rental_shop.yaml\ndatabase: {embedded: true}\n"
                                    "legacy: {enabled: true}\n" + extra)
    return params_mod.load("ci", folder)


@pytest.fixture
def shop(server, tmp_path):
    name = f"t_shop_{uuid.uuid4().hex[:10]}"
    create_database(server, name, None)
    db = Db(server, name, shop_params(tmp_path))
    db.execute(SHOP)
    yield db
    drop_database(server, name)


def rows(db, query, args=None):
    with db.connect() as conn:
        return conn.execute(query, args).fetchall()


def test_the_shop_spec_loads_as_a_second_configuration(tmp_path):
    p = shop_params(tmp_path)
    assert p.legacy.source.tenants.table == "store" and p.legacy.source.tenants.uuid is None
    assert [m.label for m in p.legacy.source.memberships] == ["staff"]
    assert list(p.core_tables) == ["staff", "customer", "inventory", "rental"]
    assert p.origin("legacy", "source", "tenants", "key") == "params/apps/rental_shop.yaml"


def test_seed_creates_tenants_users_and_memberships_from_the_shop_and_a_rerun_is_a_no_op(shop):
    db = shop
    db.run("inspect", "seed")
    stores = rows(db, "SELECT store_id, address FROM store ORDER BY store_id")
    tenants = dict(rows(db, "SELECT uuid, name FROM tenants WHERE uuid <> %s", (str(db.params.system_tenant.uuid),)))
    assert tenants == {uuid.uuid3(NAMESPACE, f"store:{sid}"): address for sid, address in stores}
    assert rows(db, "SELECT count(*) FROM tenants WHERE updated_at = '2020-01-01'") == [(3,)]
    # staff become users with a derived uuid; 'dup' has mike's email but for case: listed, not merged
    users = dict(rows(db, "SELECT uuid, email FROM users"))
    assert users == {uuid.uuid3(NAMESPACE, f"staff:{sid}"): email.strip().lower() for sid, email in
                     rows(db, "SELECT staff_id, email FROM staff WHERE username <> 'dup'")}
    # each staff member (the duplicate excepted) belongs to its store, with the default role
    members = rows(db, "SELECT s.staff_id, st.store_id, ut.role FROM user_tenants ut JOIN users u ON u.id = ut.user_id "
                       "JOIN tenants t ON t.id = ut.tenant_id JOIN staff s ON u.email = lower(btrim(s.email)) "
                       "AND s.username <> 'dup' JOIN store st ON t.name = st.address ORDER BY 1")
    assert members == [(1, 1, "staff"), (2, 2, "staff"), (3, 2, "staff")]
    with db.session("seed") as rb:
        ambiguous = seed.legacy_ambiguities(rb)
        assert seed.plan(rb).empty  # a re-run plans nothing
    assert ambiguous[["kind", "table", "key"]].values.tolist() == [["duplicate email (not migrated)", "staff", "4"]]
    counts = rows(db, "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM users), "
                      "(SELECT count(*) FROM user_tenants)")
    db.run("seed")
    assert counts == rows(db, "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM users), "
                              "(SELECT count(*) FROM user_tenants)") == [(4, 3, 3)]


def test_backfill_and_the_rollout_triggers_give_each_row_its_store(shop):
    db = shop
    db.run("inspect", "seed", "backfill")
    tenant = "(SELECT m.tenant_id FROM tenancy_runbook.org_tenants m WHERE m.org_id = x.store_id)"
    for table in ("staff", "customer", "inventory"):
        wrong = rows(db, f"SELECT count(*), count(*) FILTER (WHERE tenant_id IS DISTINCT FROM {tenant}) FROM {table} x")
        assert wrong[0][1] == 0 and wrong[0][0] > 0, table
    assert rows(db, "SELECT count(*) FROM rental r JOIN inventory i USING (inventory_id) "
                    "WHERE r.tenant_id IS DISTINCT FROM i.tenant_id") == [(0,)]
    assert rows(db, "SELECT count(DISTINCT tenant_id) FROM rental") == [(2,)]
    # the legacy application keeps writing without tenant_id: the rollout triggers give its rows their store's
    db.execute("INSERT INTO customer (store_id, name) VALUES (2, 'new')")
    db.execute("INSERT INTO inventory (film_id, store_id) VALUES (1, 2)")
    db.execute("INSERT INTO rental (inventory_id, customer_id, staff_id) SELECT max(inventory_id), "
               "(SELECT max(customer_id) FROM customer), 2 FROM inventory")
    db.execute("UPDATE customer SET store_id = 1 WHERE name = 'customer 3'")
    store_2 = rows(db, "SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = 2")[0][0]
    store_1 = rows(db, "SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = 1")[0][0]
    assert rows(db, "SELECT tenant_id FROM customer WHERE name = 'new'") == [(store_2,)]
    assert rows(db, "SELECT tenant_id FROM rental WHERE rental_id = (SELECT max(rental_id) FROM rental)") == [(store_2,)]
    assert rows(db, "SELECT tenant_id FROM customer WHERE name = 'customer 3'") == [(store_1,)]


def test_the_shop_migrates_and_validates_with_its_conservation_checks(shop):
    db = shop
    db.params = params_mod.override(db.params, {"rls": {"enabled": True}, "distribution": {"composite_keys": True}})
    checks = db.run("inspect", "seed", "backfill", "constrain", "validate")["validate"]["checks"]
    assert checks["passed"].all()
    mine = checks[checks["check"] == "rows carry the tenant of their org (recomputed from legacy data)"]
    assert sorted(mine["table"]) == ["customer", "inventory", "rental", "staff"]
    assert checks[checks["check"] == "each legacy org has its tenant"][["table", "expected", "actual"]].values.tolist() \
        == [["store", "3", "3"]]
    assert checks[checks["check"].str.startswith("each legacy (user, org) pair")][["expected", "actual"]].values.tolist() \
        == [["3", "3"]]
    assert rows(db, "SELECT count(*) FROM pg_views WHERE schemaname = 'public'") == [(0,)]  # no adapter views


def test_a_tenant_source_that_does_not_fit_names_the_file_and_key_and_changes_nothing(server, tmp_path, shop):
    db = shop
    p = shop_params(tmp_path, "legacy:\n  enabled: true\n  source:\n    tenants: {key: shop_id}\n")
    with pytest.raises(RunbookError) as err:
        db.run("inspect", params=p)
    assert "column store.shop_id does not exist (params/ci.yaml, legacy.source.tenants.key)" in str(err.value)
    assert rows(db, "SELECT to_regnamespace('tenancy_runbook') IS NULL, to_regclass('tenants') IS NULL") == [(True, True)]
    # a text key is a key (issue 27), but the memberships still hold the integer staff_id: they cannot compare
    p = shop_params(tmp_path, "legacy:\n  enabled: true\n  source:\n    users: {key: username}\n")
    with pytest.raises(RunbookError, match=r"column staff.staff_id is integer but holds keys of staff.username, which "
                                           r"is text \(params/apps/rental_shop.yaml, legacy.source.memberships.0.user\)"):
        db.run("inspect", params=p)
    p = shop_params(tmp_path, "legacy:\n  enabled: true\n  source:\n    tenants: {key: last_update}\n")
    with pytest.raises(RunbookError, match=r"column store.last_update is timestamp with time zone: a key of the "
                                           r"tenant source must be an integer, text or uuid column \(params/ci.yaml, "
                                           r"legacy.source.tenants.key\)"):
        db.run("inspect", params=p)
    p = shop_params(tmp_path, "core_tables:\n  rental: {parent: null}\n")
    with pytest.raises(RunbookError, match=r"core_tables.rental: it references .* \(params/ci.yaml, "
                                           r"core_tables.rental\)"):
        db.run("inspect", params=p)
    p = shop_params(tmp_path, "core_tables:\n  customer: {org_column: shop_id}\n")
    with pytest.raises(RunbookError, match=r"column customer.shop_id does not exist \(params/ci.yaml, "
                                           r"core_tables.customer.org_column\)"):
        db.run("inspect", params=p)


def test_role_maps_and_sources_must_agree(tmp_path):
    with pytest.raises(ParamsError, match=r"params/ci.yaml: legacy.source.memberships.0.role_map: staff.grade holds "
                                          r"roles; name the map"):
        shop_params(tmp_path, "legacy:\n  source:\n    memberships: [{table: staff, user: staff_id, tenant: store_id, "
                              "role: grade}]\n")
    with pytest.raises(ParamsError, match=r"legacy.roles.grades: no membership source uses this role map"):
        shop_params(tmp_path, "legacy:\n  roles: {grades: {a: staff}}\n")
    with pytest.raises(ParamsError, match=r"legacy.source: legacy.enabled needs the tenant source"):
        shop_params(tmp_path, "legacy: !replace {enabled: true}\n")  # drops the inherited source
