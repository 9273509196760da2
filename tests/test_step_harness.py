"""Safe at every moment (issue 25): every phase of the demo (legacy mapping, RLS and composite keys on) and of the
shop walked one step at a time with the application's contract checked between any two steps (tests/step_harness.py),
rollback started from after each forward phase, and a kill right after every kind of step resumed to the end state
of an uninterrupted run. `make test-matrix` kills after every step, not only one of each kind."""

import os

import pytest

import step_harness as harness
from conftest import LEGACY_ON
from runbook_helpers import params as params_mod

pytestmark = pytest.mark.slow
FORWARD = ("inspect", "seed", "backfill", "constrain", "validate")


@pytest.fixture
def demo_params(ci_params):
    return params_mod.override(ci_params, LEGACY_ON)


def test_every_step_of_every_forward_phase_keeps_the_demo_application_working(db, demo_params):
    db.params = demo_params
    walk = harness.Walk(db.url, harness.DEMO)
    walk.check("the start")
    for phase in FORWARD:
        harness.walk_phase(db, phase, walk)
    walk.workloads = (True,)  # finalize waits for the release that writes tenant_id
    harness.walk_phase(db, "finalize", walk, force=True)
    print(f"{len(walk.steps)} steps walked")
    assert walk.failures == [], "\n".join(f"{n}x {k}" for k, n in summarize(walk.failures).items())


AFTER = {"seed": FORWARD[:2], "backfill": FORWARD[:3], "constrain": FORWARD[:4], "validate": FORWARD,
         "finalize": FORWARD}


@pytest.mark.parametrize("after", list(AFTER))
def test_every_step_of_rollback_keeps_the_demo_application_working(migrated_db, demo_params, after):
    db = migrated_db(*AFTER[after], params=demo_params)
    if after == "finalize":
        harness.run_phase(db.session("finalize"), force=True)
    walk = harness.Walk(db.url, harness.DEMO, switch=from_finalize if after == "finalize" else None,
                        workloads=(True,) if after == "finalize" else (False,))
    walk.check(f"{after} (the start)")
    harness.walk_phase(db, "rollback", walk)
    print(f"{len(walk.steps)} steps walked")
    assert walk.failures == [], "\n".join(f"{n}x {k}" for k, n in summarize(walk.failures).items())


def test_every_step_of_distributes_plain_postgres_part_keeps_the_tenant_aware_application_working(migrated_db):
    """07_distribute after finalize, the application agreed to (tenant_id, …) keys: its key swaps and the foreign key
    drop/re-add cycle (what plain PostgreSQL can run of it) never break the release that writes tenant_id."""
    from test_distribute import AGREED, finalized
    db = finalized(migrated_db, AGREED)
    walk = harness.Walk(db.url, harness.DEMO, workloads=(True,))
    walk.check("finalize (the start)")
    harness.walk_phase(db, "distribute", walk)
    print(f"{len(walk.steps)} steps walked")
    assert len(walk.steps) > 20
    assert walk.failures == [], "\n".join(f"{n}x {k}" for k, n in summarize(walk.failures).items())


def from_finalize(walk, step: str) -> None:
    """Rollback after finalize: the tenant-aware release runs until the rollout triggers are back on every table
    (rollback's first steps), then the legacy release too, then only the legacy one once tenant_id is going."""
    if walk.workloads == (True,) and "install the rollout triggers" not in step:
        walk.workloads = (True, False)
    if "drop tenant_id" in step or "put back the tenant_id" in step:
        walk.workloads = (False,)


def summarize(failures):
    import re as _re
    from collections import Counter
    return Counter(_re.sub(r"\d+", "N", f.split(": ", 1)[0][:90] + " || " + f.split(": ", 2)[-1][:110]) for f in failures)
