"""The demo application after 07_distribute on a real Citus cluster (issue 26, finding 4): its tenant-aware release
runs without an error, and every statement it runs names its tenant the way Citus routes to one shard."""

import re
import time
from collections import Counter

import psycopg
from psycopg import sql
from psycopg.types.json import JsonbDumper

from citus_fixtures import MIGRATED, citus, citus_db, citus_params  # noqa: F401 (fixtures)

from runbook_helpers.workload import LegacyWorkload

# the one read of every tenant: the application's view has no tenant_id to filter on
NOT_TENANT_KEYED = {"list active_workflows"}
# each statement kind the issue names, as the workload calls it
KINDS = {"select by tenant and id": "read workflows by id", "join on tenant and key": "read rules of an org",
         "insert": "insert rule", "update": "update workflow status", "delete": "delete workflow (rules cascade)",
         "upsert": "upsert workflow by id", "move to another tenant": "move workflow to another org"}


def as_role(db, role: str = "legacy_app") -> str:
    return db.url.replace("postgresql://postgres@", f"postgresql://{role}@")


def run_tenant_aware(db, statements: int) -> LegacyWorkload:
    """07_distribute, then the tenant-aware release until it has run `statements` statements (at most a minute: the
    machine may be busy)."""
    db.run("distribute")
    p = db.params
    workload = LegacyWorkload(as_role(db), namespace=p.legacy.tenant_uuid_namespace,
                              system_tenant=p.system_tenant.uuid, tenant_aware=True, seed=8)
    workload.phase = "after distribute"
    workload.start()
    try:
        deadline = time.monotonic() + 60
        while len(workload.samples) < statements and time.monotonic() < deadline and workload.is_alive():
            time.sleep(0.2)
    finally:
        workload.stop()
    return workload


def test_the_tenant_aware_release_runs_without_an_error_on_the_distributed_database(citus_db):
    db = citus_db(MIGRATED)
    workload = run_tenant_aware(db, 600)
    errors = Counter(f"{s.kind}: {s.error}" for s in workload.errors())
    kinds = Counter(s.kind for s in workload.samples)
    print(f"{len(workload.samples)} statements, {sum(errors.values())} errors: {dict(errors)}")
    assert errors == Counter(), errors
    assert len(workload.samples) > 300, len(workload.samples)
    assert set(KINDS.values()) <= set(kinds), set(KINDS.values()) - set(kinds)
    # what it wrote is where it says: each of its workflows once, in its org's tenant, its rules with it; the
    # moved ones too, their rules moved along
    moved = [w for w in set(workload.written.moved) if w in workload.written.workflows]
    assert moved, workload.written.moved
    with db.connect() as conn:
        for workflow in workload.written.workflows:
            tenant = workload.tenant_of[("workflows", workflow)]
            assert conn.execute("SELECT array_agg(tenant_id) FROM workflows WHERE id = %s",
                                (workflow,)).fetchone()[0] == [tenant]
            assert conn.execute("SELECT count(*) FROM rules WHERE workflow_id = %s AND tenant_id <> %s",
                                (workflow, tenant)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM rules WHERE workflow_id = ANY(%s)", (moved,)).fetchone()[0] > 0


def test_every_tenant_keyed_statement_of_the_release_and_every_smoke_query_runs_on_one_shard(citus_db):
    db = citus_db(MIGRATED)
    workload = run_tenant_aware(db, 250)
    assert not workload.errors(), workload.errors()[:3]
    assert set(KINDS.values()) <= set(workload.statements), set(KINDS.values()) - set(workload.statements)
    tasks: dict[str, list[tuple[int, ...]]] = {}  # kind -> per statement, the Task Counts of its plan
    with db.connect() as conn:
        conn.adapters.register_dumper(dict, JsonbDumper)  # as the workload does: a jsonb it read, written back
        for kind, statements in workload.statements.items():
            for statement, args in statements:
                query = sql.SQL("EXPLAIN ") + (sql.SQL(statement) if isinstance(statement, str) else statement)
                plan = "\n".join(r[0] for r in conn.execute(query, args))
                tasks.setdefault(kind, []).append(tuple(int(n) for n in re.findall(r"Task Count: (\d+)", plan)))
                assert "Citus" in plan, (kind, plan)  # the statement went through the distributed planner
            conn.rollback()
    print({k: v for k, v in sorted(tasks.items())})
    fanned = {kind: counts for kind, counts in tasks.items()
              if kind not in NOT_TENANT_KEYED and any(c != (1,) for c in counts)}
    assert fanned == {}, fanned
    assert all(tasks[kind] and set(tasks[kind]) == {(1,)} for kind in KINDS.values()), \
        {k: tasks[k] for k in KINDS.values()}
    # the move touches two tenants, one statement each: 3 deletes and at least 1 insert, every one on one shard
    assert len(tasks["move workflow to another org"]) >= 4, tasks["move workflow to another org"]
    assert tasks["list active_workflows"] == [(32,)]  # the view's read of every tenant fans out (the only one)

    # the demo's smoke queries (05_validate) name their tenant too: one shard each, and they find rows
    smoke = {}
    with db.connect() as conn:
        for query in db.params.validate_.smoke_queries:
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query.sql))
            smoke[query.name] = (re.findall(r"Task Count: (\d+)", plan), len(conn.execute(query.sql).fetchall()))
    print(smoke)
    assert {name: tasks for name, (tasks, _) in smoke.items() if tasks != ["1"]} == {"active workflows view": ["32"]}
    assert all(rows for _, rows in smoke.values()), smoke


def test_updating_a_rows_tenant_is_what_citus_refuses(citus_db):
    """Why the release moves a workflow as delete + insert: an UPDATE of tenant_id on a distributed table is
    refused (0A000), and changes nothing."""
    db = citus_db(MIGRATED)
    db.run("distribute")
    tenant, workflow = db.scalar("SELECT array[tenant_id, id] FROM workflows ORDER BY id LIMIT 1")
    other = db.scalar("SELECT id FROM tenants WHERE id <> %s ORDER BY id LIMIT 1", (tenant,))
    with psycopg.connect(as_role(db), autocommit=True) as conn:
        try:
            conn.execute("UPDATE workflows SET tenant_id = %s WHERE tenant_id = %s AND id = %s",
                         (other, tenant, workflow))
        except psycopg.Error as exc:
            refused = exc.sqlstate
        else:
            refused = None
    assert refused == "0A000"
    assert db.scalar("SELECT tenant_id FROM workflows WHERE id = %s", (workflow,)) == tenant
