"""A phase without its notebook: the same helper calls, in the same order, as the phase's notebook.

For tests and benchmarks, which drive many databases and need return values rather than cell outputs.
Operators use the notebooks (or `runbook run`); keep this in step with them.
"""

from __future__ import annotations

from typing import Any

from ..errors import RunbookError
from . import backfill, constrain, distribute, finalize, inspect, rollback, seed, validate


def run_phase(rb, since=None, force: bool = False) -> dict[str, Any]:
    """Run rb.phase to its verdict; raises like the notebook's last cell would. Closes the session.
    `since` and `force` are 06_finalize's parameters (`force` is 99_rollback's too)."""
    out: dict[str, Any] = {}
    try:
        if rb.phase == "inspect":
            out["preflight"] = inspect.preflight(rb)
            inspect.assert_ready(out["preflight"])  # the notebook stops here too, before reading any rows
            out["inventory"] = inspect.inventory(rb)
            out["unlisted"] = inspect.unlisted_tables(rb)
            out["partitions"] = inspect.partition_inventory(rb)
            out["conflicts"] = inspect.tenant_conflicts(rb)
            out["lint"] = inspect.lint(rb)
            out["readiness"] = inspect.distribution_readiness(rb)
            out["drizzle"] = inspect.drizzle_status(rb)
            out["baseline"] = inspect.capture_baseline(rb, out["preflight"])
            out["plan"] = inspect.full_plan(rb)
            out["cost"] = inspect.cost(rb)
            out["verdict"] = inspect.assert_ready(out["preflight"])
        elif rb.phase == "seed":
            out["shape"] = seed.shape_report(rb)
            out["plan"] = seed.plan(rb)
            out["applied"] = seed.apply(rb)
            out["ambiguities"] = seed.legacy_ambiguities(rb)
            out["verdict"] = seed.assert_seeded(rb)
        elif rb.phase == "backfill":
            out["strategies"] = backfill.strategies(rb)
            out["plan"] = backfill.plan(rb)
            out["cost"] = backfill.cost(rb)
            out["report"] = backfill.apply(rb)
            out["verdict"] = backfill.assert_filled(rb)
        elif rb.phase == "constrain":
            out["plan"] = constrain.plan(rb)
            out["applied"] = constrain.apply(rb)
            out["status"] = constrain.status(rb)
            out["verdict"] = constrain.assert_constrained(rb)
        elif rb.phase == "validate":
            out["checks"] = validate.checks(rb)
            out["tenants"] = validate.rows_per_tenant(rb)
            out["lint"] = validate.lint(rb)
            out["isolation"] = validate.isolation_suite(rb)
            out["verdict"] = validate.assert_all_passed(out["checks"], rb.dry_run, out["lint"], out["isolation"])
            out["writes"] = validate.application_writes(rb)
            out["sizes"] = validate.sizes(rb)
            out["drizzle"] = validate.hand_over_to_drizzle(rb, out["verdict"])
        elif rb.phase == "finalize":
            out["assists"] = finalize.assists(rb, since)
            out["plan"] = finalize.plan(rb)
            out["applied"] = finalize.apply(rb, since=since, force=force)
            out["status"] = finalize.status(rb)
            out["verdict"] = finalize.assert_finalized(rb)
        elif rb.phase == "distribute":
            out["target"] = distribute.target(rb)
            out["blockers"] = distribute.blockers(rb)
            out["plan"] = distribute.plan(rb)
            out["cost"] = distribute.cost(rb)
            out["applied"] = distribute.apply(rb)
            out["status"] = distribute.status(rb)
            out["verdict"] = distribute.assert_distributed(rb)
        elif rb.phase == "rollback":
            out["foreign rows"] = rollback.foreign_rows(rb)
            out["plan"] = rollback.plan(rb)
            out["applied"] = rollback.apply(rb, force=force)
            out["verdict"] = rollback.assert_rolled_back(rb)
        else:  # a phase this function does not know must not pass for one that ran
            raise RunbookError(f"no headless steps for phase {rb.phase!r}")
        rb.finish(summary={"verdict": out.get("verdict")})
    except BaseException as exc:
        rb.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        rb.close()
    return out
