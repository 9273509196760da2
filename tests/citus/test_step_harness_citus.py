"""Safe at every moment on Citus (issue 26): 07_distribute on the real cluster (create_reference_table and
create_distributed_table for real) walked one step at a time, the demo's tenant-aware application's contract checked
between any two steps (tests/step_harness.py): the legacy role sees every row, the application role with its tenant
set sees exactly its tenant's rows, and the tenant-aware workload runs."""

import pytest

import step_harness as harness
from citus_fixtures import MIGRATED, citus, citus_db, citus_params  # noqa: F401 (fixtures)


@pytest.mark.timeout(900)  # 92 steps, a contract check after each: 240 s here on a loaded 2-core machine
def test_every_step_of_distribute_keeps_the_tenant_aware_application_working(citus_db):
    """07 after finalize on the cluster: the key swaps, the foreign keys' drop and re-add, every reference table and
    distributed table made, never break the release that writes tenant_id (test_step_harness walks the same on plain
    PostgreSQL without Citus's calls)."""
    from test_step_harness import summarize
    db = citus_db(MIGRATED)
    # what the README asks of the DBA on Citus: the application role can log in on every node (Citus opens its
    # worker connections as the current user, after SET ROLE too); constrain creates it NOLOGIN
    db.execute(f"ALTER ROLE {harness.DEMO.app_role} LOGIN")
    walk = harness.Walk(db.url, harness.DEMO, workloads=(True,))
    walk.check("finalize (the start)")
    harness.walk_phase(db, "distribute", walk)
    print(f"{len(walk.steps)} steps walked")
    assert any(s.split(": ")[-1].startswith("distribute ") for s in walk.steps)
    assert walk.failures == [], "\n".join(f"{n}x {k}" for k, n in summarize(walk.failures).items())
