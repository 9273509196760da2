"""The backfill's latency budget: a canary commit measures what the application's commits feel, and a
controller sizes and paces the batches to keep the budget (backfill/throttle.py)."""

from runbook_helpers import params as params_mod
from runbook_helpers.backfill.throttle import quantile


def _more_nulls(db, rows: int) -> None:
    db.execute("INSERT INTO knowledge_bases (uuid, org_id, name) SELECT gen_random_uuid(), 1, 'kb ' || i "
               "FROM generate_series(1, %s) i", (rows,))
    db.execute("ANALYZE knowledge_bases")


def _pace(db, **throttle) -> params_mod.Params:
    """Fixed-size batches of 400 keys (no target duration), 100 ms apart, so the backfill lasts a few seconds."""
    return params_mod.override(db.params, {"backfill": {
        "batch_size": 400, "max_batch_size": 400, "min_batch_size": 100, "target_batch_ms": None, "pause_ms": 100,
        "throttle": throttle}})


def test_quantile_is_the_nearest_rank():
    assert quantile([5.0, 1.0, 3.0], 0.99) == 5.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert quantile([float(i) for i in range(1, 101)], 0.5) == 50.0


def test_over_the_budget_batches_shrink_to_the_minimum_then_a_pause_appears(db):
    db.run("inspect", "seed")
    _more_nulls(db, 4000)
    # no commit takes 1 µs: the canary is always over this budget
    params = _pace(db, budget_p99_ms=0.001, max_pace_ms=100)
    out = db.run("backfill", params=params)["backfill"]
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0
    series = out["report"].progress
    sizes, paces = list(series["batch_size"]), list(series["pace_ms"])
    assert sizes[0] == 400, sizes
    assert min(sizes) == 100, sizes                       # halved down to min_batch_size ...
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes  # ... never growing while over the budget
    assert max(paces) > 0, paces                          # then a pause before each batch
    assert all(s == 100 for s, p in zip(sizes, paces) if p > 0)  # only once the size is at its minimum
    assert max(paces) <= 100                              # bounded by max_pace_ms
    assert series["canary_p99_ms"].dropna().gt(0.001).all() and series["canary_p99_ms"].notna().any()
    # the series is in the ledger for the archive: one row per batch
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.backfill_pace WHERE table_name = 'knowledge_bases'") \
        == len(series)
    assert db.scalar("SELECT beats FROM tenancy_runbook.canary WHERE id = 1") > 10


def test_within_a_generous_budget_batches_keep_their_full_size_and_no_pause(db):
    db.run("inspect", "seed")
    _more_nulls(db, 2000)
    out = db.run("backfill", params=_pace(db, budget_p99_ms=60000))["backfill"]
    series = out["report"].progress
    assert set(series["batch_size"]) == {400} and set(series["pace_ms"]) == {0}
    assert series["canary_p99_ms"].notna().any()
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0


def test_without_a_budget_there_is_no_canary_and_the_size_is_the_engines(db):
    db.run("inspect", "seed")
    out = db.run("backfill", params=_pace(db, budget_p99_ms=None, app_stall_ms=None))["backfill"]
    series = out["report"].progress
    assert set(series["batch_size"]) == {400} and series["canary_p99_ms"].isna().all()
    assert db.scalar("SELECT beats FROM tenancy_runbook.canary WHERE id = 1") == 0
