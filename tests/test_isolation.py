"""The isolation suite: every case passes on the migrated demo, leaves nothing behind, and each case turns
red when the protection it relies on is removed."""

import pytest

from conftest import install_stand_in_citus
from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import validate

PROBE_SETTING = "app.current_tenant_id"


@pytest.fixture
def migrated(migrated_db):
    db = migrated_db("inspect", "seed", "backfill", "constrain")
    assert db.params.rls.enabled and db.params.distribution.composite_keys, "ci params enable RLS and composite keys"
    return db


def suite(db, params=None):
    with db.session("validate", params=params) as rb:
        return validate.isolation_suite(rb)


def failing(frame):
    return {(r.case, r.table) for r in frame[~frame["passed"]].itertuples()}


def test_every_case_passes_and_covers_the_attacks(migrated):
    results = suite(migrated)
    assert results["passed"].all(), results[~results["passed"]].to_dict("records")
    cases = set(results["case"])
    for expected in ("setting never set in this session", "setting empty", "setting garbage 'abc'",
                     "setting garbage '1 OR 1=1'", "setting '-1'", "setting an id that does not exist",
                     "setting reverted after SET LOCAL", "cross-tenant SELECT by key", "cross-tenant UPDATE by key",
                     "cross-tenant DELETE by key", "INSERT with another tenant's id",
                     "UPDATE moving a row to another tenant", "INSERT … ON CONFLICT DO UPDATE onto another tenant's key",
                     "pooled connection reused after a tenant's transaction", "COPY … TO exports only the tenant's rows",
                     "child row referencing another tenant's parent", "System Tenant rows not writable by a tenant",
                     "table owner isolated too (FORCE)", "negative control: owner without FORCE sees both tenants' rows"):
        assert expected in cases, expected
    per_table = results[results["case"] == "tenant sees exactly its own rows"]["table"].tolist()
    assert per_table == migrated.params.tables
    made = results[results["case"] == "probe rows created"]
    assert made["table"].tolist() == migrated.params.tables  # every probe runs on the demo, on fresh copies
    assert set(made["actual"]) == {"2 per probe tenant (copies with fresh keys)"}


def test_the_suite_leaves_nothing_behind(migrated):
    tables = migrated.params.tables + ["tenants"]
    before = {t: migrated.scalar(f"SELECT count(*) FROM {t}") for t in tables}
    suite(migrated)
    assert {t: migrated.scalar(f"SELECT count(*) FROM {t}") for t in tables} == before
    assert migrated.scalar("SELECT count(*) FROM tenants WHERE name LIKE 'isolation probe%'") == 0


def test_without_force_the_owner_case_goes_red(migrated):
    migrated.execute("ALTER TABLE workflows NO FORCE ROW LEVEL SECURITY")
    assert failing(suite(migrated)) == {("table owner isolated too (FORCE)", "workflows")}


def test_a_fail_open_policy_goes_red(migrated):
    migrated.execute("DROP POLICY tenant_isolation_select ON workflows")
    migrated.execute("CREATE POLICY tenant_isolation_select ON workflows FOR SELECT USING "
                     "(current_setting('app.current_tenant_id', true) IS NULL OR "
                     "tenant_id = NULLIF(current_setting('app.current_tenant_id', true), '')::bigint)")
    red = failing(suite(migrated))
    assert ("setting never set in this session", "workflows") in red


def test_a_missing_with_check_goes_red(migrated):
    migrated.execute("DROP POLICY tenant_isolation_update ON models")
    migrated.execute("CREATE POLICY tenant_isolation_update ON models FOR UPDATE USING "
                     "(tenant_id = NULLIF(current_setting('app.current_tenant_id', true), '')::bigint) WITH CHECK (true)")
    assert failing(suite(migrated)) == {("UPDATE moving a row to another tenant", "models")}


def test_bypassrls_on_the_app_role_goes_red(db):
    # A role is cluster-wide: this test gives BYPASSRLS to an app role of its own, never to the one that the
    # tests running beside it (other databases, same server) use.
    role = "app_user_bypass_probe"
    params = params_mod.override(db.params, {"rls": {"app_role": role}})
    db.run("inspect", "seed", "backfill", "constrain", params=params)
    db.execute(f"ALTER ROLE {role} BYPASSRLS")
    try:
        red = failing(suite(db, params))
    finally:
        db.execute(f"ALTER ROLE {role} NOBYPASSRLS")
    for table in db.params.tables:
        assert ("tenant sees exactly its own rows", table) in red
        assert ("cross-tenant SELECT by key", table) in red
    assert ("setting never set in this session", "workflows") in red


def test_a_foreign_key_without_tenant_id_goes_red(migrated):
    """Only the single-column key the application had is left (its (tenant_id, …) twin dropped)."""
    migrated.execute("ALTER TABLE decision_tables DROP CONSTRAINT "
                     "decision_tables_tenant_id_model_id_models_tenant_id_id_fk")
    assert failing(suite(migrated)) == {("child row referencing another tenant's parent", "decision_tables -> models")}


# What Citus enforces, in plain PostgreSQL: once a user has written rows in a transaction, no other user may query
# or write in it ("cannot perform query on placements that were modified in this transaction by a different user").
# A trigger notes the first writer of the transaction; a restrictive policy and the trigger refuse anyone else.
ONE_USER_PER_TRANSACTION = """
CREATE FUNCTION probe_note_writer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF coalesce(current_setting('probe.writer', true), '') NOT IN ('', current_user) THEN
    RAISE EXCEPTION 'written as % after % wrote in this transaction', current_user, current_setting('probe.writer');
  END IF;
  PERFORM set_config('probe.writer', current_user, true);
  RETURN NULL;
END $$;
CREATE FUNCTION probe_one_user() RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF coalesce(current_setting('probe.writer', true), '') NOT IN ('', current_user) THEN
    RAISE EXCEPTION 'read as % what % wrote in this transaction', current_user, current_setting('probe.writer');
  END IF;
  RETURN true;
END $$;
"""


def test_each_probe_transaction_is_one_users_alone(migrated):
    """The probe rows are written by the role that probes (the application role; the table owner for the owner
    cases), never by the migration role before a SET LOCAL ROLE: every case passes where one user per transaction
    is enforced. Red without it: every case reading as the application role fails with 'read as app_user what
    postgres wrote in this transaction'."""
    migrated.execute(ONE_USER_PER_TRANSACTION)
    for table in migrated.params.tables:
        migrated.execute(f"CREATE TRIGGER zz_probe_note_writer AFTER INSERT OR UPDATE OR DELETE ON {table} "
                         "FOR EACH ROW EXECUTE FUNCTION probe_note_writer()")
        migrated.execute(f"CREATE POLICY zz_probe_one_user ON {table} AS RESTRICTIVE FOR SELECT USING (probe_one_user())")
    results = suite(migrated)
    assert results["passed"].all(), results[~results["passed"]].to_dict("records")
    assert len(results) > 70


def test_on_a_citus_coordinator_before_distribution_the_suite_runs_as_on_postgresql(migrated):
    """Citus opens worker connections as the current user, which a NOLOGIN application role cannot: but before
    07_distribute every table is still on the coordinator, which answers alone. Where pg_extension shows Citus (here
    an empty stand-in) and nothing is distributed, every case runs (tests/citus/ checks the distributed side: the
    role named, nothing probed)."""
    install_stand_in_citus(migrated)
    results = suite(migrated)
    assert "application role can reach the Citus workers" not in set(results["case"])
    assert results["passed"].all(), results[~results["passed"]].to_dict("records")
    assert len(results) > 70


# A small schema of real constraints: primary keys without a default, unique keys over several columns,
# foreign keys to other tenant tables, a key whose CHECK no fresh value satisfies (staff), an empty table whose
# probe rows the suite makes (notes), and an empty table no made row fits (coupon: no value the suite tries
# matches its CHECK, so it has no row to copy, make or move).
RENTAL_SCHEMA = """
CREATE TABLE store (store_id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE customer (customer_id integer PRIMARY KEY, store_id integer NOT NULL REFERENCES store,
                       email varchar(40) NOT NULL, UNIQUE (store_id, email));
CREATE TABLE inventory (inventory_id bigserial PRIMARY KEY, store_id integer NOT NULL REFERENCES store,
                        film_code text NOT NULL, copy_no smallint NOT NULL, UNIQUE (store_id, film_code, copy_no));
CREATE TABLE rental (rental_id integer PRIMARY KEY, rental_date timestamptz NOT NULL,
                     inventory_id bigint NOT NULL REFERENCES inventory, customer_id integer NOT NULL REFERENCES customer,
                     UNIQUE (rental_date, inventory_id, customer_id));
CREATE TABLE staff (staff_id integer PRIMARY KEY CHECK (staff_id BETWEEN 1 AND 99),
                    store_id integer NOT NULL REFERENCES store, login text NOT NULL UNIQUE);
CREATE TABLE notes (note_id integer PRIMARY KEY, rental_id integer REFERENCES rental, body text);
CREATE TABLE coupon (coupon_id integer PRIMARY KEY, code text NOT NULL CHECK (code ~ '^[A-Z]{3}-[0-9]{4}$'));
INSERT INTO store SELECT i, 'store ' || i FROM generate_series(1, 3) i;
INSERT INTO customer SELECT i, 1 + i % 3, 'c' || i || '@example.com' FROM generate_series(1, 20) i;
INSERT INTO inventory (store_id, film_code, copy_no) SELECT 1 + i % 3, 'film-' || (i % 7), i FROM generate_series(1, 30) i;
INSERT INTO rental SELECT i, timestamptz '2024-01-01 00:00+00' + i * interval '1 hour', 1 + i % 30, 1 + i % 20
FROM generate_series(1, 40) i;
INSERT INTO staff SELECT i, 1 + i % 3, 'staff' || i FROM generate_series(1, 10) i;
"""
RENTAL_TABLES = ["store", "customer", "inventory", "rental", "staff", "notes", "coupon"]
COUPON_ACCEPTED = {"case": "probe rows created", "table": "coupon",
                   "reason": "coupon is empty until the coupons feature ships; nothing to isolate yet"}
COUPON_CANNOT_RUN = ("cannot run: no fresh copy could be inserted (the table has no row to copy, and no row could be "
                     'made for it: no value of column "code" (text) satisfies coupon_code_check')


def rental_params(ci_params, accept=()):
    spec = ci_params.model_dump(by_alias=True)
    spec.update(core_tables={t: {} for t in RENTAL_TABLES}, shared_tables=[])
    spec["validate"]["smoke_queries"] = []
    spec["drizzle"].update(folder=None, record_after_validate=[], schema_file=None)
    spec["rls"]["isolation_accept"] = list(accept)
    spec["rls"]["lint_accept"] = []
    return params_mod.Params.model_validate(spec)


@pytest.fixture
def rental(empty_db, ci_params):
    with empty_db.connect(autocommit=True) as conn:
        conn.execute(RENTAL_SCHEMA)
        owner = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'app_owner'").fetchone()
        for table in RENTAL_TABLES if owner else []:
            conn.execute(f"ALTER TABLE {table} OWNER TO app_owner")
    params = rental_params(ci_params)
    empty_db.run("inspect", "seed", "backfill", "constrain", params=params)
    return empty_db


def test_probes_run_on_real_constraints_and_a_table_no_row_fits_cannot_until_accepted(rental, ci_params):
    results = suite(rental, rental_params(ci_params))
    made = results[results["case"] == "probe rows created"].set_index("table")["actual"]
    for table in ("store", "customer", "inventory", "rental"):
        assert made[table] == "2 per probe tenant (copies with fresh keys)", table
    assert made["staff"] == "2 per probe tenant (existing rows moved to the probe tenants)"
    assert made["notes"] == "2 per probe tenant (made for the empty table, with fresh keys)"
    assert made["coupon"].startswith(COUPON_CANNOT_RUN), made["coupon"]
    assert made["coupon"].endswith("and no existing rows could be moved to the probe tenants (0 rows that no other "
                                   "row references (4 needed))")
    assert failing(results) == {("probe rows created", "coupon")}
    per_table = set(results[results["case"] == "tenant sees exactly its own rows"]["table"])
    assert per_table == set(RENTAL_TABLES) - {"coupon"}
    assert ("child row referencing another tenant's parent", "customer -> store") in {
        (r.case, r.table) for r in results[results["passed"]].itertuples()}
    # the probes leave nothing behind
    assert rental.scalar("SELECT count(*) FROM staff WHERE tenant_id <> (SELECT id FROM tenants WHERE uuid = %s)",
                         (str(ci_params.system_tenant.uuid),)) == 0
    assert rental.scalar("SELECT count(*) FROM customer") == 20
    assert rental.scalar("SELECT count(*) FROM notes") == rental.scalar("SELECT count(*) FROM coupon") == 0
    # unaccepted, the probe that cannot run fails validate; accepted with a reason, it passes and says so
    with pytest.raises(RunbookError) as err:
        rental.run("validate", params=rental_params(ci_params))
    assert "isolation probe rows created [coupon]: expected 2 per probe tenant, got cannot run:" in str(err.value)
    accepted = suite(rental, rental_params(ci_params, [COUPON_ACCEPTED]))
    assert accepted["passed"].all(), accepted[~accepted["passed"]].to_dict("records")
    note = accepted.set_index(["case", "table"]).loc[("probe rows created", "coupon"), "actual"]
    assert note.endswith(f"(accepted: {COUPON_ACCEPTED['reason']})")


def test_an_acceptance_takes_the_case_as_validate_prints_it(rental, ci_params):
    """What the failure prints before the table ("isolation probe rows created [coupon]") can be copied into
    rls.isolation_accept as it is; the case's own name (COUPON_ACCEPTED) stays valid too."""
    with pytest.raises(RunbookError) as err:
        rental.run("validate", params=rental_params(ci_params))
    line = next(x for x in str(err.value).splitlines() if "[coupon]" in x)
    printed = line.split("- ", 1)[1].split(" [coupon]")[0]
    assert printed == "isolation probe rows created"
    copied = {"case": printed, "table": "coupon", "reason": "copied from the failure as validate printed it"}
    accepted = suite(rental, rental_params(ci_params, [copied]))
    assert accepted["passed"].all(), accepted[~accepted["passed"]].to_dict("records")
    note = accepted.set_index(["case", "table"]).loc[("probe rows created", "coupon"), "actual"]
    assert note.startswith(COUPON_CANNOT_RUN) and note.endswith(f"(accepted: {copied['reason']})")


def test_probes_through_existing_rows_still_catch_a_leak(rental, ci_params):
    rental.execute("DROP POLICY tenant_isolation_select ON staff")
    rental.execute("CREATE POLICY tenant_isolation_select ON staff FOR SELECT USING (true)")
    red = failing(suite(rental, rental_params(ci_params, [COUPON_ACCEPTED])))
    assert {("tenant sees exactly its own rows", "staff"), ("cross-tenant SELECT by key", "staff")} <= red


def test_an_acceptance_never_hides_a_case_that_ran_and_failed(rental, ci_params):
    rental.execute("ALTER TABLE customer DROP CONSTRAINT customer_tenant_id_store_id_store_tenant_id_store_id_fk")
    params = rental_params(ci_params, [COUPON_ACCEPTED, {"case": "child row referencing another tenant's parent",
                                                        "table": "customer -> store", "reason": "tried to hide it"}])
    assert ("child row referencing another tenant's parent", "customer -> store") in failing(suite(rental, params))
