"""05_validate and the isolation suite on the distributed demo (issue 26, finding 3): the ci env's spec with the legacy
mapping on, distributed by 07_distribute on a real Citus cluster, then validated as a DBA would after scaling out."""

from citus_fixtures import MIGRATED, citus, citus_db, citus_params  # noqa: F401 (fixtures)

from runbook_helpers.phases import validate
from runbook_helpers.tenancy import isolation

MAPPING_CHECKS = ("rows per tenant add up to the table's rows", "each legacy org has its tenant",
                  "rows carry the tenant of their org (recomputed from legacy data)",
                  "each legacy (user, org) pair has exactly one membership, with its mapped role",
                  "memberships of org tenants without a legacy pair",
                  "each legacy user is migrated or listed as a duplicate")
UNIQUENESS = "every uniqueness of before is kept"
SWAPPED = "swapped by 07_distribute with the application's agreement"


def _distributed(db):
    """What the DBA does for the application role (NOLOGIN since 04), then 07_distribute: it may log in, which 07 and
    the isolation suite need (Citus opens its connections to the workers as the current user), and so may the tables' owner
(the owner cases run as it)."""
    with db.connect(autocommit=True) as conn:
        for role in ("app_user", "app_owner"):  # the owner too: the suite's owner cases run as it
            conn.execute(f"ALTER ROLE {role} LOGIN")  # before 07, whose preflight asks for the application role's
    db.run("distribute")
    with db.connect(autocommit=True) as conn:
        # Citus propagates ALTER ROLE to the workers; the probes depend on it, so say so if it ever stops
        on_workers = conn.execute("SELECT result FROM run_command_on_workers($$SELECT string_agg(rolname, ',' ORDER BY "
                                  "rolname) FROM pg_roles WHERE rolname IN ('app_user', 'app_owner') AND rolcanlogin$$)"
                                  ).fetchall()
    assert on_workers == [("app_owner,app_user",), ("app_owner,app_user",)], on_workers
    return db


def _cases(frame) -> list[tuple[str, str]]:
    return sorted(zip(frame["case"], frame["table"]))


def test_validate_passes_on_the_distributed_demo_with_the_mapping_on_and_every_isolation_case_runs(citus_db):
    db = citus_db(MIGRATED)
    with db.session("validate") as rb:  # the same database before 07: the coordinator alone answers
        local = validate.isolation_suite(rb)
    assert local["passed"].all(), local[~local["passed"]].to_string()
    _distributed(db)

    out = db.run("validate")["validate"]
    checks, cases = out["checks"], out["isolation"]
    assert checks["passed"].all(), checks[~checks["passed"]].to_string()
    assert cases["passed"].all(), cases[~cases["passed"]].to_string()
    assert out["verdict"] == f"all {len(checks) + len(out['lint']) + len(cases)} checks passed"

    # the legacy mapping's checks ran (on distributed tables), each passing
    names = set(checks["check"])
    assert all(name in names for name in MAPPING_CHECKS), names
    carry = checks[checks["check"] == "rows carry the tenant of their org (recomputed from legacy data)"]
    assert sorted(carry["table"]) == sorted(t for t, s in db.params.core_tables.items() if s.org_column or s.parent)

    # every isolation case that runs on PostgreSQL ran on Citus too, on every table, none "cannot run"
    assert not cases["actual"].str.contains("cannot run").any()
    assert _cases(cases) == _cases(local)
    assert len(cases) == 77, len(cases)  # 8 tables × 8 cases; 6 setting, upsert, COPY, child, 2 owner, 2 pooled
    made = cases[cases["case"] == isolation.PROBE_ROWS]
    assert made["table"].tolist() == db.params.tables

    # the keys 07 swapped to (tenant_id, …) pass, saying so; the others are as they were
    unique = checks[checks["check"] == UNIQUENESS].set_index("table")
    assert unique.loc["workflows.workflows_pkey", "expected"] == "PRIMARY KEY (id)"
    assert unique.loc["workflows.workflows_pkey", "actual"].startswith(f"PRIMARY KEY (tenant_id, id): {SWAPPED}")
    with db.connect() as conn:
        swapped = {f"{t}.{n}" for t, n in conn.execute(
            "SELECT table_name, name FROM tenancy_runbook.distribution_changes WHERE kind = 'key'")}
    assert swapped and swapped <= set(unique.index)
    assert {t for t in unique.index if SWAPPED in unique.loc[t, "actual"]} == swapped


def test_on_citus_the_checks_still_fail_what_is_wrong(citus_db):
    """The forms Citus plans still see a row under the wrong tenant, and a swapped key that is not the agreed one;
    the isolation probes, now that they run on the distributed tables, see a policy that leaks."""
    db = _distributed(citus_db(MIGRATED))

    def failed():
        with db.session("validate") as rb:
            frame = validate.checks(rb)
        return {(r.check, r.table): r.actual for r in frame[~frame["passed"]].itertuples()}

    assert failed() == {}
    with db.connect(autocommit=True) as conn:
        # a knowledge base moved to the System Tenant (its org maps elsewhere); Citus does not update tenant_id in
        # place, so it is deleted and inserted again
        system = conn.execute("SELECT id FROM tenants WHERE uuid = %s",
                              (str(db.params.system_tenant.uuid),)).fetchone()[0]
        conn.execute("CREATE TEMP TABLE moved AS SELECT * FROM knowledge_bases WHERE tenant_id <> %s "
                     "ORDER BY id LIMIT 1", (system,))
        conn.execute("DELETE FROM knowledge_bases k USING moved m WHERE k.tenant_id = m.tenant_id AND k.id = m.id")
        conn.execute("UPDATE moved SET tenant_id = %s", (system,))
        conn.execute("INSERT INTO knowledge_bases SELECT * FROM moved")
        # a swapped key that is no longer the agreed (tenant_id, …) form of the old one
        conn.execute("ALTER TABLE endpoints DROP CONSTRAINT endpoints_method_path_key")
        conn.execute("ALTER TABLE endpoints ADD CONSTRAINT endpoints_method_path_key UNIQUE (tenant_id, path, method)")
    assert failed() == {
        ("rows carry the tenant of their org (recomputed from legacy data)", "knowledge_bases"): "1",
        (UNIQUENESS, "endpoints.endpoints_method_path_key"):
            "UNIQUE (tenant_id, path, method), but 07_distribute swapped UNIQUE (method, path) to "
            "UNIQUE (tenant_id, method, path)"}

    with db.connect(autocommit=True) as conn:  # a fail-open SELECT policy on a distributed table
        conn.execute("DROP POLICY tenant_isolation_select ON workflows")
        conn.execute("CREATE POLICY tenant_isolation_select ON workflows FOR SELECT USING (true)")
    with db.session("validate") as rb:
        cases = validate.isolation_suite(rb)
    assert not cases["actual"].str.contains("cannot run").any()
    red = {(r.case, r.table) for r in cases[~cases["passed"]].itertuples()}
    assert {("tenant sees exactly its own rows", "workflows"), ("cross-tenant SELECT by key", "workflows")} <= red, red
    assert {table for _, table in red} == {"workflows"}, red
