"""`runbook baseline reset`: forget the pre-migration baseline and schema snapshot, so that the next 01_inspect
captures them anew (after a rollback, the application has kept writing: the old counts are stale).

The baseline is what 05_validate and 99_rollback compare against, so the reset is refused while a run holds
the single-runner lock (the session takes it) and while the database is migrated or partly migrated (the
rollback plan is not empty: roll back first). It needs --yes where the env requires confirmation, and is
archived like a run: a folder with what was forgotten (baseline_before.csv) and its manifest in the chain,
and a row in the ledger's runs.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Callable

from .. import __version__
from .. import params as params_mod
from ..errors import RunbookError
from ..phases import original_schema, rollback
from . import accounting, archive
from .session import PhaseSession, operator

ACTION = "baseline reset"


def reset(env: str, *, yes: bool = False, log: Callable[[str], None] = print) -> str | None:
    """Reset the env's baseline; returns the archive folder's manifest sha256 (None: there was none)."""
    params = params_mod.load(env)
    if params.database.confirm_required and not yes:
        raise RunbookError(f"env {env} changes a production database: add --yes to confirm the baseline reset. "
                           f"Nothing was changed.")
    with PhaseSession("rollback", params=params, dry_run=True, log=lambda *_: None) as rb:
        if not rb.ledger.exists(rb.control) or not len(baseline := rb.ledger.baseline(rb.control)):
            log(f"env {env}: no baseline recorded; nothing to reset (01_inspect captures one)")
            return None
        left = rollback.steps(rb)
        if left:
            raise RunbookError(
                f"the {env} database is migrated or partly migrated ({len(left)} rollback steps remain, e.g. "
                f"{left[0].table}: {left[0].action}): the baseline is what 05_validate and 99_rollback compare "
                f"against. Roll back first (`runbook rollback --env {env}`), then reset it. Nothing was changed.")
        accounting.close_died_runs(rb.control, params, f"runbook {ACTION}", log)
        run_id = uuid.uuid4().hex[:8]
        started = datetime.now(timezone.utc)
        folder = archive.run_folder(params.archive.dir, env, started, run_id)
        commit = archive.git_commit()
        rb.ledger.start_run(rb.control, run_id, env, operator(), [ACTION], False, __version__, commit)
        baseline.to_csv(folder / "baseline_before.csv", index=False)
        with rb.engine.begin() as conn:  # both or neither
            tables = rb.ledger.forget_baseline(conn)
            snapshot_rows = original_schema.forget(conn, params.ledger_schema)
        sha = accounting.write_record(folder, params, {
            "run_id": run_id, "env": env, "operator": operator(), "dry_run": False, "status": "succeeded",
            "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
            "runbook_version": __version__, "git_commit": commit,
            "server": {"version": rb.identity.server_version, "database": rb.identity.database,
                       "system_identifier": rb.identity.system_identifier},
            "phases": [{"name": ACTION, "status": "succeeded", "baseline_tables": tables,
                        "snapshot_rows": snapshot_rows, "file": "baseline_before.csv"}],
        })
        rb.ledger.finish_run(rb.control, run_id, "succeeded", sha)
    log(f"env {env}: baseline of {tables} tables and the pre-change snapshot forgotten; the next 01_inspect "
        f"captures them anew; archive: {folder}")
    return sha
