"""07_distribute on a real Citus cluster (issue 26): the demo with the ci env's spec (legacy mapping, RLS, composite
keys) and the shop (tests/schemas/shop.sql), end to end with nothing done by hand but what a refusal, made before
any change, tells the DBA to do."""

import threading
import time
from pathlib import Path

import psycopg
import pytest
from citus_fixtures import AGREED, MIGRATED, citus, citus_db, citus_params, on_cluster  # noqa: F401 (fixtures)

import step_harness as harness
from runbook_helpers import faults
from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import distribute, inspect
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.tenancy import rls
from test_second_schema import shop_params

SHOP = (Path(__file__).parents[1] / "schemas" / "shop.sql").read_text()
SAME_COLUMNS = """
SELECT c.relname, array_agg(ic.relname::text ORDER BY ic.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY(%s)
GROUP BY c.relname, i.indkey::text, coalesce(pg_get_expr(i.indpred, i.indrelid), '') HAVING count(*) > 1
"""


def _counts(db, tables) -> dict[str, int]:
    with db.connect() as conn:
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def allow_login(db, role: str) -> None:
    """The DBA's fix that 07's preflight asks for: the role may log in (initdb's trust covers 127.0.0.1, so the
    coordinator authenticates as it on the workers)."""
    db.execute(f'ALTER ROLE "{role}" LOGIN')


def ledger_changes(db) -> int:
    return db.scalar("SELECT count(*) FROM tenancy_runbook.distribution_changes")


def citus_tables(db) -> dict[str, tuple[str, bool]]:
    with db.connect() as conn:
        return {t: (kind, auto) for t, kind, auto in conn.execute(
            "SELECT logicalrelid::regclass::text, CASE WHEN partmethod = 'h' THEN 'distributed' WHEN repmodel = 't' "
            "THEN 'reference' ELSE 'local' END, autoconverted FROM pg_dist_partition").fetchall()}


def test_the_demo_distributes_end_to_end_and_its_foreign_keys_come_back_validated(citus_db):
    db = citus_db(MIGRATED)
    allow_login(db, db.params.rls.app_role)
    before = _counts(db, db.params.tables)
    with db.session("distribute", dry_run=True) as rb:
        plan = distribute.plan(rb)
        cost = distribute.cost(rb).set_index("table")
    cascades = [a for a in plan["action"] if "without ON UPDATE CASCADE" in a]
    assert cascades, "the plan says which foreign keys come back without ON UPDATE CASCADE"
    # every table that becomes a Citus local table is named, at the reference table whose creation takes it
    user = plan[plan["table"] == "user"].iloc[0]
    assert user["action"].endswith("; Citus makes org_user, org Citus local tables (they stay on the coordinator)")
    assert "org_user becomes a Citus local table: org_user references user (org_user_user_id_fkey)" in user["why safe"]
    assert cost.loc["org", "becomes"].startswith("Citus local table (stays on the coordinator): org_user references org")
    redundant = [a for a in plan["action"] if a.startswith("drop ") and ": the same columns as " in a]
    assert len(redundant) == len(db.params.tables), redundant

    db.run("distribute")
    assert _counts(db, db.params.tables) == before
    with db.connect() as conn:
        groups = conn.execute("SELECT count(DISTINCT colocationid), count(*) FROM pg_dist_partition "
                              "WHERE partmethod = 'h'").fetchone()
        fks = conn.execute("SELECT conrelid::regclass::text, conname, convalidated, confupdtype FROM pg_constraint "
                           "WHERE contype = 'f' AND connamespace = 'public'::regnamespace").fetchall()
        duplicates = conn.execute(SAME_COLUMNS, (db.params.tables,)).fetchall()
    assert groups == (1, len(db.params.tables)), groups
    assert fks and all(valid for _, _, valid, _ in fks), [f for f in fks if not f[2]]
    # the runbook's own (tenant_id, …) keys: NO ACTION on update, since a row's tenant can no longer change
    assert {upd for _, name, _, upd in fks if "_tenant_id_" in name and name.endswith("_tenant_id_id_fk")} == {"a"}
    # no second unique index on the columns of another (before: 8, e.g. workflows_pkey and
    # workflows_tenant_id_id_unique on (tenant_id, id)); each one dropped is in the ledger
    assert duplicates == []
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.distribution_changes WHERE kind = 'redundant key'") == \
        len(db.params.tables)
    # what Citus made of each table is what the plan said: the local ones are exactly those it named
    made = citus_tables(db)
    assert {t for t, (kind, _) in made.items() if kind == "local"} == {"org", "org_user"}
    assert {t for t, (kind, _) in made.items() if kind == "reference"} == {
        "tenants", "users", "user_tenants", "node_types", '"user"'}
    with db.session("distribute", dry_run=True) as rb:
        status = distribute.status(rb)
    assert (status["should be"] == status["is"]).all(), status.to_dict("records")


@pytest.mark.parametrize("race", ["changed", "created"])
def test_distribute_goes_through_when_a_role_it_creates_on_a_worker_is_changed_there_at_that_moment(
        citus_db, citus, race):
    """Citus creates (or alters) on the workers each role a table depends on (its owner, the roles granted on it) as
    07 distributes it. The same done on a worker at that moment fails the step: an ALTER ROLE there ("tuple
    concurrently updated": make test-matrix failed so, two databases of the cluster distributed at once; a password
    rotation) or a CREATE ROLE (a duplicate in pg_authid_rolname_index). The step is one transaction, so 07 tries it
    again instead of stopping."""
    db = citus_db(MIGRATED)
    worker = citus.workers[0]
    if race == "changed":  # the tables' owner, on the worker already or created there now
        role = db.scalar("SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'tenants'")
        with psycopg.connect(worker.url(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
        change = f'ALTER ROLE "{role}" CONNECTION LIMIT -1'
    else:  # a role granted on tenants that no worker has yet
        role = citus.new_name("reader")
        with psycopg.connect(citus.coordinator.url(), autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
        db.execute(f'GRANT SELECT ON tenants TO "{role}"')
        change = f'CREATE ROLE "{role}" NOLOGIN'
    outcome: list = []

    def distribute_it() -> None:
        try:
            outcome.append(db.run("distribute"))
        except Exception as exc:  # the assertion below reports it
            outcome.append(exc)

    try:
        with psycopg.connect(worker.url()) as holder, psycopg.connect(worker.url(), autocommit=True) as watcher:
            holder.execute(change)  # the same row of pg_authid, not committed
            runner = threading.Thread(target=distribute_it)
            runner.start()
            deadline = time.monotonic() + 120
            while not watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                                      "query LIKE 'SELECT worker_create_or_alter_role(%%'").fetchone()[0]:
                assert runner.is_alive() and time.monotonic() < deadline, f"07 never met the change: {outcome}"
                time.sleep(0.05)
            holder.commit()
            runner.join(600)
        assert outcome and not isinstance(outcome[0], Exception), outcome
        assert citus_tables(db)["tenants"] == ("reference", False)
        retried = db.scalar("SELECT attempts FROM tenancy_runbook.statement_journal WHERE phase = 'distribute' "
                            "AND action LIKE 'make tenants a reference table%%' AND outcome = 'applied'")
        assert retried == 2
    finally:
        if race == "created":  # the role goes with the database that holds its grants
            citus.drop_database(db.name)
            for node in citus.nodes:
                with psycopg.connect(node.url(), autocommit=True) as conn:
                    conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_refusals_come_before_any_change_and_the_dbas_fix_lets_it_through(citus_db, citus_params, citus):
    """The application role as 04_constrain makes it (NOLOGIN): readiness on the coordinator and 07's preflight say
    so before any change; after ALTER ROLE … LOGIN the phase runs, and the workers have the role able to log in."""
    role = "citus_app_refused"  # this test's own role: roles are the server's, the other tests' app_user stays LOGIN
    params = params_mod.override(citus_params, {"rls": {"app_role": role}})
    db = citus_db(MIGRATED, params=params)
    db.execute(f'ALTER ROLE "{role}" NOLOGIN')  # as 04_constrain made it (a previous run of this test gave it LOGIN)
    with db.session("inspect", dry_run=True) as rb:
        ready = inspect.distribution_readiness(rb).set_index(["check", "object"])
    row = ready.loc[("roles that query distributed tables can log in", role)]
    assert not row["ready"] and row["what to do"].startswith(f"ALTER ROLE {role} LOGIN on the coordinator")
    assert ready.loc[("foreign keys holding tenant_id have no ON UPDATE action",
                      "rules.rules_tenant_id_workflow_id_workflows_tenant_id_id_fk"), "ready"]
    before = db.schema_dump()
    with pytest.raises(RunbookError) as refused:
        run_phase(db.session("distribute"))
    assert str(refused.value) == (
        f"07_distribute cannot start: {role}: the application role (rls.app_role) is NOLOGIN: Citus opens its "
        f"connections to the workers as the current user, so its queries of the distributed tables would fail "
        f"(ALTER ROLE {role} LOGIN on the coordinator before 07_distribute (Citus copies the role to the workers "
        f"with the tables that depend on it, and propagates ALTER ROLE once it is there), and let the coordinator "
        f"authenticate as {role} on every worker (pg_dist_authinfo, a .pgpass entry of the coordinator's OS user, "
        f"or the workers' pg_hba.conf for the coordinator's address)). Nothing was changed.")
    assert db.schema_dump() == before
    assert ledger_changes(db) == 0 and citus_tables(db) == {}

    allow_login(db, role)
    db.run("distribute")
    assert {kind for kind, _ in citus_tables(db).values()} == {"distributed", "reference", "local"}
    for worker in citus.workers:  # Citus copied the role to the workers as it is now, able to log in
        with psycopg.connect(worker.url()) as conn:
            assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (role,)).fetchone() == (True,)
    tenant = db.scalar("SELECT tenant_id FROM workflows GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")
    own = db.scalar("SELECT count(*) FROM workflows WHERE tenant_id = %s", (tenant,))
    with db.connect() as conn:  # the role reads its tenant's rows of a distributed table through the workers
        conn.execute(f'SET ROLE "{role}"')
        rls.set_tenant(conn, tenant)
        assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == own > 0



def test_a_run_stopped_after_every_table_is_distributed_resumes_to_an_uninterrupted_runs_end_state(citus_db):
    """Finding 2: a run stopped once every table is distributed and every recorded foreign key dropped (where the
    issue's run failed) is finished by a re-run, to the end state of a run never interrupted."""
    whole = citus_db(MIGRATED)
    allow_login(whole, whole.params.rls.app_role)
    steps: list[str] = []
    with faults.watch_steps(steps.append):
        run_phase(whole.session("distribute"))
    want = harness.end_state(whole)
    stop_after = max(i for i, s in enumerate(steps, 1) if s.split(": ", 2)[2].startswith("distribute "))

    db = citus_db(MIGRATED)
    count = [0]

    def stop(detail: str) -> None:
        count[0] += 1
        if count[0] == stop_after:
            raise harness.StepKilled(detail)

    with pytest.raises(harness.StepKilled):
        with faults.watch_steps(stop):
            run_phase(db.session("distribute"))
    assert {kind for kind, _ in citus_tables(db).values()} >= {"distributed", "reference"}
    dropped = db.scalar("SELECT count(*) FROM tenancy_runbook.distribution_changes WHERE kind = 'foreign key' AND "
                        "definition LIKE 'FOREIGN KEY (tenant_id) REFERENCES tenants(id)%%' AND table_name = ANY(%s)",
                        (db.params.tables,))
    assert dropped == len(db.params.tables) and db.scalar(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = 'public'::regnamespace "
        "AND confrelid = 'tenants'::regclass") == 0
    with db.session("distribute", dry_run=True) as rb:  # before: 8 x "tenant_id is not NOT NULL with a validated …"
        assert distribute.blockers(rb).to_dict("records") == []
    resumed: list[str] = []
    with faults.watch_steps(resumed.append):
        run_phase(db.session("distribute"))
    assert resumed == steps[stop_after:]
    assert harness.differences(harness.end_state(db), want) == []


FLATTEN = """
DO $$
DECLARE q record;
BEGIN
  FOR q IN SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'payment'::regclass AND c.relkind = 'p' ORDER BY 1
  LOOP
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', q.relname || '_flat', q.relname);
    EXECUTE format('INSERT INTO %I SELECT * FROM %I', q.relname || '_flat', q.relname);
    EXECUTE format('ALTER TABLE payment DETACH PARTITION %I', q.relname);
    EXECUTE format('DROP TABLE %I', q.relname);
    EXECUTE format('ALTER TABLE %I RENAME TO %I', q.relname || '_flat', q.relname);
    EXECUTE format('ALTER TABLE payment ATTACH PARTITION %I %s', q.relname, q.bound);
  END LOOP;
END $$
"""


def test_the_shop_refuses_its_multi_level_partitions_before_any_change_and_distributes_once_handled(
        citus_db, citus, tmp_path):
    """Finding 6: payment is range partitioned with hash sub-partitions. Readiness and 07's preflight say so before
    any change; once the DBA has done what they say (the quarters made plain partitions, and the shop's other
    documented blockers handled), 07 distributes the single-level partitioned table with the rest."""
    params = on_cluster(citus, shop_params(tmp_path), {"distribution": {"application_keys_agreed": True,
                                                                        "triggers": "enable_unsafe"}})
    db = citus_db(MIGRATED, params=params, schema=SHOP)
    db.execute("ALTER ROLE shop_app NOLOGIN")  # as 04_constrain made it (a previous run gave it LOGIN)
    tables = list(db.params.tables)
    before_rows = _counts(db, tables)
    with db.session("inspect", dry_run=True) as rb:
        ready = inspect.distribution_readiness(rb).set_index(["check", "object"])
    levels = ready.loc[("partitioned tables have one level of partitions", "payment")]
    assert not levels["ready"] and levels["finding"].startswith(
        "payment_2026_q1, payment_2026_q2, payment_2026_q3, payment_2026_q4 are partitioned too: Citus refuses the table")
    with db.session("distribute", dry_run=True) as rb:
        stops = distribute.blockers(rb)
        plan = distribute.plan(rb)
    multi = stops[stops["blocker"] == "Citus cannot distribute a multi-level partitioned table"]
    assert list(multi["object"]) == ["payment"]
    assert "make payment_2026_q1, payment_2026_q2, payment_2026_q3, payment_2026_q4 plain partitions of payment" in \
        multi.iloc[0]["what to do"]
    assert {"payment", "customer", "staff", "shop_app"} <= set(stops["object"])
    # the bytes Citus moves for a partitioned table: its partitions' (before: 0)
    leaves = db.scalar("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c WHERE c.relkind = 'r' AND "
                       "c.relispartition AND c.relname LIKE 'payment%%'")
    moved = plan.dropna(subset=["data moved (bytes)"]).set_index("table")["data moved (bytes)"]
    assert moved["payment"] == leaves > 0
    schema_before = db.schema_dump()
    with pytest.raises(RunbookError, match=r"payment: Citus cannot distribute a multi-level partitioned table"):
        run_phase(db.session("distribute"))
    assert db.schema_dump() == schema_before and ledger_changes(db) == 0 and citus_tables(db) == {}

    # the DBA does what the blockers say: quarters made plain partitions, payment's key made (tenant_id, …) by hand
    # (the runbook swaps no key of a partitioned table), the accepted cross-tenant foreign keys dropped (Citus keeps
    # no foreign key across tenants), the application role given LOGIN
    db.execute(FLATTEN)
    db.execute("ALTER TABLE payment DROP CONSTRAINT payment_pkey; ALTER TABLE payment ADD CONSTRAINT payment_pkey "
               "PRIMARY KEY (tenant_id, payment_id, payment_date)")
    for fk in ("rental.rental_customer_id_fkey", "rental.rental_staff_id_fkey", "payment.payment_customer_id_fkey"):
        table, name = fk.split(".")
        db.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    allow_login(db, "shop_app")
    with db.session("distribute", dry_run=True) as rb:
        assert distribute.blockers(rb).to_dict("records") == []
    db.run("distribute")
    assert _counts(db, tables) == before_rows
    made = citus_tables(db)
    partitions = [t for t in made if t.startswith("payment_")]
    assert sorted(partitions) == ["payment_2026_q1", "payment_2026_q2", "payment_2026_q3", "payment_2026_q4",
                                  "payment_other"]
    assert {t for t, (kind, _) in made.items() if kind == "distributed"} == set(tables) | set(partitions)
    assert {t for t, (kind, _) in made.items() if kind == "reference"} == {"tenants", "users", "user_tenants", "film"}
    with db.connect() as conn:
        groups = conn.execute("SELECT count(DISTINCT colocationid) FROM pg_dist_partition WHERE partmethod = 'h'"
                              ).fetchone()[0]
        invalid = conn.execute("SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE contype = 'f' AND "
                               "connamespace = 'public'::regnamespace AND NOT convalidated").fetchall()
        duplicates = conn.execute(SAME_COLUMNS, (tables,)).fetchall()
    assert groups == 1 and invalid == [] and duplicates == []
    with db.session("distribute", dry_run=True) as rb:  # a re-run has nothing left to do
        assert distribute.analyse(rb).steps == []
