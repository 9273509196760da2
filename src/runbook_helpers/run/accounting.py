"""Every run accounted for: a run whose runner died is closed in the ledger and given a manifest in the chain.

A runner holds database.RUN_LOCK on its control connection for the whole run, and its kernel holds
PHASE_LOCK for each phase. A run the ledger still has as 'running' while neither lock has another holder
was not finished by its runner: it died (SIGKILL, a lost machine). The next run (once it holds RUN_LOCK)
and `runbook audit` mark it 'died' with its open phase runs and journal entries, write a manifest into
its archive folder saying what it reached, and so link it into the hash chain. An archive folder with no
manifest and no ledger row (a dry run's, or one killed before the ledger existed) is closed the same way.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import text

from ..db import database
from ..db.ledger import Ledger
from . import archive

DIED = "died"


def kernel_runtime_dir(run_id: str) -> Path:
    """Where a run's kernels write their connection files (JUPYTER_RUNTIME_DIR): the run's own folder under
    .runbook/, removed at the end of the run, or by the next command when the runner died."""
    return archive.paths.project_root() / ".runbook" / "kernels" / run_id


def remove_kernel_runtime(run_id: str) -> None:
    shutil.rmtree(kernel_runtime_dir(run_id), ignore_errors=True)


def other_lock_holders(conn, which: int) -> list[int]:
    """Backends other than this one holding a runbook advisory lock on this database."""
    own = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    holders = conn.execute(database.HOLDER_SQL, {"cls": database.LOCK_CLASS, "obj": which}).mappings().all()
    return [h["pid"] for h in holders if h["pid"] != own]


def runner_alive(conn) -> bool:
    """A run or a phase is in progress on this database (someone else holds RUN_LOCK or PHASE_LOCK)."""
    return bool(other_lock_holders(conn, database.RUN_LOCK) or other_lock_holders(conn, database.PHASE_LOCK))


def _env_folder(params) -> Path:
    return archive._base(params.archive.dir) / params.env


def _folder_of(params, run_id: str, started_at: datetime | None) -> Path:
    """The run's archive folder, created (from the ledger's start time) when the run left none here."""
    base = _env_folder(params)
    found = sorted(base.glob(f"*-{run_id}")) if base.is_dir() else []
    if found:
        return found[0]
    return archive.run_folder(params.archive.dir, params.env, started_at or datetime.now(timezone.utc), run_id)


def _scan(folder: Path, params) -> list[str]:
    """The secret scan of a killed run's folder: every secret the env's connection has (DSN, PGPASSWORD,
    .pgpass, service file), in every encoding the archive can hold it."""
    return archive.scan_for_secrets(folder, [] if params.database.embedded else database.known_secrets(params))


def _reached_text(phases: list[dict[str, Any]], statement: dict[str, Any] | None) -> str:
    done = [p["name"] for p in phases if p["status"] == "succeeded"]
    where = next((p["name"] for p in phases if p["status"] == DIED), None)
    text_ = f"phases finished: {', '.join(done) or 'none'}"
    if where:
        text_ += f"; died in {where}"
    if statement:
        text_ += f" during {statement['action']}" + (f" on {statement['table_name']}" if statement.get("table_name")
                                                     else "")
    return text_


def write_record(folder: Path, params, data: dict[str, Any]) -> str:
    """Scan the folder for the env's secrets, then write its manifest into the chain; returns its sha256."""
    problems = _scan(folder, params)
    data["secret_scan"] = problems or "clean"
    return archive.write_manifest(folder, data)


def close_died_runs(control, params, closed_by: str, log: Callable[[str], None] = print) -> list[str]:
    """Close every run of the env whose runner died (see the module docstring); returns their run ids. Does
    nothing while another session holds RUN_LOCK or PHASE_LOCK: that run is alive, its rows are its own."""
    if runner_alive(control):
        return []
    ledger = Ledger(params.ledger_schema)
    closed: list[str] = []
    now = datetime.now(timezone.utc)
    for row in ledger.open_runs(control, params.env):
        run_id = row["run_id"]
        reached = ledger.reached(control, run_id)
        phases = [{"name": p["phase"], "status": DIED if p["status"] == "running" else p["status"],
                   "started_at": p["started_at"], "finished_at": p["finished_at"]} for p in reached["phases"]]
        statement = reached["open_statements"][-1] if reached["open_statements"] else None
        folder = _folder_of(params, run_id, row["started_at"])
        sha = None
        if not (folder / archive.MANIFEST).is_file():
            sha = write_record(folder, params, {
                "run_id": run_id, "env": params.env, "operator": row["operator"], "dry_run": row["dry_run"],
                "status": DIED, "started_at": row["started_at"], "finished_at": None,
                "closed_at": now.isoformat(), "closed_by": closed_by,
                "runbook_version": row["runbook_version"], "git_commit": row["git_commit"],
                "planned_phases": list(row["phases"] or []), "phases": phases,
                "reached": {"summary": _reached_text(phases, statement),
                            "phases_finished": [p["name"] for p in phases if p["status"] == "succeeded"],
                            "in_phase": next((p["name"] for p in phases if p["status"] == DIED), None),
                            "in_statements": reached["open_statements"]},
            })
        else:
            sha = archive.sha256_file(folder / archive.MANIFEST)
        ledger.close_died_run(control, run_id, DIED, sha)
        remove_kernel_runtime(run_id)
        closed.append(run_id)
        log(f"run {run_id} {DIED} (its runner ended without finishing it): {_reached_text(phases, statement)}; "
            f"manifest written to {folder}")
    # no ledger row: a dry run, or one killed before the ledger existed. Only after the newest manifest: an
    # older folder without one lost it later (removed by hand), and `audit verify` names that gap instead
    known = {r[0] for r in ledger.run_manifests(control, params.env)} if ledger.exists(control) else set()
    finished = [p.parent.name for p in _env_folder(params).glob(f"*/{archive.MANIFEST}")]
    for folder in unfinished_folders(params):
        run_id = folder.name.rsplit("-", 1)[-1]
        if run_id in known or any(name > folder.name for name in finished):
            continue
        notebooks = sorted(p.name for p in folder.glob("*.ipynb"))
        write_record(folder, params, {
            "run_id": run_id, "env": params.env, "status": DIED, "closed_at": now.isoformat(),
            "closed_by": closed_by, "phases": [],
            "reached": {"summary": f"no open ledger row; notebooks written: {', '.join(notebooks) or 'none'}",
                        "notebooks": notebooks},
        })
        remove_kernel_runtime(run_id)
        closed.append(run_id)
        log(f"run {run_id} {DIED} (no open ledger row, no manifest): manifest written to {folder}")
    return closed


def unfinished_folders(params) -> list[Path]:
    base = _env_folder(params)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not (p / archive.MANIFEST).is_file())


def gaps(control, params) -> list[str]:
    """Every way the env's archive and its ledger disagree: a run in the ledger with no manifest (or another
    manifest than the one recorded), a folder without a manifest."""
    problems: list[str] = []
    for folder in unfinished_folders(params):
        problems.append(f"{folder.name}: no manifest (a run that never finished; `runbook audit list` closes it once "
                        f"its runner is gone)")
    ledger = Ledger(params.ledger_schema)
    if control is None or not ledger.exists(control):
        return problems
    base = _env_folder(params)
    for run_id, status, recorded in ledger.run_manifests(control, params.env):
        if status == "running":
            continue  # in progress (or closed by the next command once its runner is gone)
        found = sorted(base.glob(f"*-{run_id}")) if base.is_dir() else []
        manifest = found[0] / archive.MANIFEST if found else None
        if manifest is None or not manifest.is_file():
            problems.append(f"run {run_id} ({status}) is in the ledger but its manifest is missing from the chain "
                            f"({found[0].name if found else 'no archive folder'})")
        elif recorded and archive.sha256_file(manifest) != recorded:
            problems.append(f"run {run_id}: {found[0].name}/{archive.MANIFEST} has sha256 "
                            f"{archive.sha256_file(manifest)}, not the {recorded} the ledger recorded")
    return problems
