"""Killed right after any step (issue 25): each phase of the demo (legacy mapping, RLS and composite keys on) is
stopped right after a step (tests/step_harness.py raises there, as a kill would), re-run, and must end in the state
an uninterrupted run ends in: the catalog without the ledger, and a fingerprint of every table's rows. make test
stops after one step of each kind; `make test-matrix` (RUNBOOK_STEPS=all) after every step. The steps are what an
uninterrupted run commits, recorded, so a new step is killed the day it is added. Real SIGKILLs of a runner
process, at steps chosen the same way, are in tests/test_faults.py."""

import os

import pytest

import step_harness as harness
from conftest import LEGACY_ON
from test_distribute import AGREED
from runbook_helpers import params as params_mod

pytestmark = pytest.mark.slow
FORWARD = ("inspect", "seed", "backfill", "constrain", "validate")
ALL_STEPS = os.environ.get("RUNBOOK_STEPS") == "all"  # make test-matrix: every step, not one of each kind
# each phase killed from the state the phases before it leave; finalize and rollback with their parameters; 07's
# plain-PostgreSQL part (step_harness.plain_distribute) after finalize, the application agreed (test_distribute)
KILLED = {"seed": (FORWARD[:1], {}), "backfill": (FORWARD[:2], {}), "constrain": (FORWARD[:3], {}),
          "finalize": (FORWARD, {"force": True}), "rollback": (FORWARD, {}), "distribute": (FORWARD + ("finalize",), {})}
SHARES = {"seed": 1, "backfill": 2, "constrain": 4, "finalize": 1, "rollback": 2, "distribute": 2}  # tests per phase
if ALL_STEPS:
    SHARES = {phase: 4 * n for phase, n in SHARES.items()}
# the same batches in every run: batch sizes fixed (no adapting to the batches' time, no controller on the canary's
# latency), which on a busy machine otherwise split the backfill into more batches in one run than in another
FIXED_BATCHES = {"backfill": {"target_batch_ms": None, "throttle": {"budget_p99_ms": None}}}
_recorded: dict[str, tuple[list[str], dict]] = {}  # per worker: the uninterrupted run's steps and end state


def reference(migrated_db, params, phase: str) -> tuple[list[str], dict]:
    if phase not in _recorded:
        before, kw = KILLED[phase]
        harness.warm_up(migrated_db(*before, params=params), phase, **kw)
        db = migrated_db(*before, params=params)
        steps = harness.recorded_steps(db, phase, **kw)
        _recorded[phase] = steps, harness.end_state(db)
    return _recorded[phase]


@pytest.mark.parametrize("phase,share", [(phase, i) for phase, n in SHARES.items() for i in range(n)])
def test_a_phase_killed_after_a_step_resumes_to_the_end_state_of_an_uninterrupted_run(migrated_db, ci_params, phase,
                                                                                      share):
    params = params_mod.override(params_mod.override(ci_params, AGREED if phase == "distribute" else LEGACY_ON),
                                 FIXED_BATCHES)
    before, kw = KILLED[phase]
    steps, want = reference(migrated_db, params, phase)
    positions = list(range(1, len(steps) + 1)) if ALL_STEPS else harness.one_per_kind(steps)
    assert steps and positions, f"{phase} committed no step"
    mine = positions[share::SHARES[phase]]
    wrong = harness.kills_that_differ(lambda: migrated_db(*before, params=params), phase, steps, want, mine, **kw)
    print(f"{phase}: {len(steps)} steps; this share killed after {len(mine)} of {len(positions)} "
          f"({'every step' if ALL_STEPS else 'one of each kind'})")
    assert wrong == {}, "\n".join(f"killed after step {k}: {v}" for k, v in list(wrong.items())[:5])
