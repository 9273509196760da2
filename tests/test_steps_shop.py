"""The shop (tests/schemas/shop.sql: stores as tenants, a partitioned payment table, keys without defaults) walked
one step at a time through every forward phase and back through rollback, the shop's application checked between
any two steps (tests/step_harness.py)."""

import pytest

import step_harness as harness
from test_second_schema import shop  # noqa: F401  (the fixture: a fresh shop database with its spec)

pytestmark = pytest.mark.slow


# 37 s alone here; at a load average of 10 (make test beside three other suites) it passed 300 s once
@pytest.mark.timeout(900)
def test_every_step_forward_and_back_keeps_the_shop_application_working(shop):  # noqa: F811
    db = shop
    walk = harness.Walk(db.url, harness.SHOP)
    walk.check("the start")
    for phase in ("inspect", "seed", "backfill", "constrain", "validate"):
        harness.walk_phase(db, phase, walk)
    forward = len(walk.steps)
    harness.walk_phase(db, "rollback", walk)
    print(f"shop: {forward} forward steps and {len(walk.steps) - forward} rollback steps walked")
    assert forward > 50 and len(walk.steps) > forward
    assert walk.failures == [], "\n".join(walk.failures[:30])
