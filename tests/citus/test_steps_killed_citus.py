"""Resumable from every step on Citus (issue 26, item 3): 07_distribute on the real cluster (create_reference_table
and create_distributed_table run for real), the demo migrated through 06_finalize with the ci env's spec (legacy
mapping, RLS, composite keys), the application agreed to the (tenant_id, …) keys. The phase is stopped right after
a step (tests/step_harness.py raises there, as a kill would), re-run, and must end in the state an uninterrupted run
ends in: the coordinator's catalog without the ledger, a fingerprint of every table's rows, and Citus's distribution
state (which tables are distributed or reference, colocation, shards per node, no leftover shard or cleanup record
on any node). make test-citus stops after one step of each kind; RUNBOOK_STEPS=all after every step. The walk with
the application's contract checked between steps is test_step_harness_citus.py (its own file: --dist loadfile gives
it the other worker)."""

import os

import pytest

import step_harness as harness
from citus_fixtures import MIGRATED, citus, citus_db, citus_params  # noqa: F401 (fixtures)

ALL_STEPS = os.environ.get("RUNBOOK_STEPS") == "all"
# tests the kills are shared out over. Here (2 cores shared with other work): one of each kind, 17 kills, 185 s in
# 2 shares; every step, 92 kills, 16 min 40 s with -n 2 --dist load (about 20 s a kill, two at once; --dist loadfile
# keeps a file on one worker, so about twice that)
SHARES = 8 if ALL_STEPS else 2
_recorded: list[tuple[list[str], dict]] = []  # per worker: the uninterrupted run's steps and end state


def reference(citus_db) -> tuple[list[str], dict]:
    if not _recorded:
        db = citus_db(MIGRATED)
        steps = harness.recorded_steps(db, "distribute")
        _recorded.append((steps, harness.end_state(db)))
    return _recorded[0]


def test_an_uninterrupted_distribute_leaves_every_table_placed_and_nothing_behind(citus_db, citus_params):
    steps, want = reference(citus_db)
    kinds = {harness.kind_of(s) for s in steps}
    print(f"distribute: {len(steps)} steps of {len(kinds)} kinds")
    assert any("create_distributed_table" in s or s.split(": ")[-1].startswith("distribute ") for s in steps)
    assert want["citus leftovers"] == "[]", want["citus leftovers"]
    tables = {k.split(" ", 1)[1].strip('"'): v for k, v in want.items()
              if k.startswith("citus ") and k != "citus leftovers"}
    distributed = [t for t, v in tables.items() if v.startswith("h tenant_id")]
    assert sorted(distributed) == sorted(citus_params.tables), tables
    assert len({v.split("colocated with ")[1] for t, v in tables.items() if t in distributed}) == 1, tables


@pytest.mark.timeout(900)  # 8 or 9 kills a share, each a copy, a killed run and a re-run: 73-112 s here
@pytest.mark.parametrize("share", range(SHARES))
def test_distribute_killed_after_a_step_resumes_to_the_end_state_of_an_uninterrupted_run(citus_db, share):
    steps, want = reference(citus_db)
    positions = list(range(1, len(steps) + 1)) if ALL_STEPS else harness.one_per_kind(steps)
    assert steps and positions, "distribute committed no step"
    mine = positions[share::SHARES]
    wrong = harness.kills_that_differ(lambda: citus_db(MIGRATED), "distribute", steps, want, mine)
    print(f"distribute on Citus: {len(steps)} steps; this share killed after {len(mine)} of {len(positions)} "
          f"({'every step' if ALL_STEPS else 'one of each kind'})")
    assert wrong == {}, "\n".join(f"killed after step {k}: {v}" for k, v in list(wrong.items())[:5])
