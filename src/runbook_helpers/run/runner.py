"""`runbook run`: execute the phase notebooks in order with papermill, stop at the first failure, archive.

The runner holds the single-runner advisory lock for the whole run (a second run fails fast, naming the
holder), passes each notebook only env, dry_run and run_id (never a secret: the kernel reads the DSN from
the environment variable itself), and writes the audit record whether the run succeeded or not.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .. import __version__, paths
from .. import params as params_mod
from ..db import database, runner_watch
from ..db.ledger import Ledger
from ..errors import RunbookError
from . import accounting, archive
from .session import DISTRIBUTE, FINALIZE, PHASES, ROLLBACK, operator

NOTEBOOKS = {
    "inspect": "01_inspect.ipynb",
    "seed": "02_seed.ipynb",
    "backfill": "03_backfill.ipynb",
    "constrain": "04_constrain.ipynb",
    "validate": "05_validate.ipynb",
    "finalize": "06_finalize.ipynb",
    "distribute": "07_distribute.ipynb",
    "rollback": "99_rollback.ipynb",
}


@dataclass
class RunResult:
    run_id: str
    folder: Path
    status: str
    phases: list[dict[str, Any]] = field(default_factory=list)
    manifest_sha256: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


def parse_phases(text: str | None) -> list[str]:
    if not text:
        return list(PHASES)
    wanted = [p.strip() for p in text.split(",") if p.strip()]
    for alone in (ROLLBACK, FINALIZE, DISTRIBUTE):
        if alone in wanted:
            if wanted != [alone]:
                raise RunbookError(f"{alone} runs alone: `runbook {alone} --env ENV`")
            return [alone]
    unknown = [p for p in wanted if p not in PHASES]
    if unknown:
        raise RunbookError(f"unknown phase(s) {', '.join(unknown)}; phases are {', '.join(PHASES)}")
    return [p for p in PHASES if p in wanted]  # always in runbook order


def _kernel_environment(env: str, run_id: str) -> dict[str, str]:
    return {"RUNBOOK_RUN_ID": run_id, "RUNBOOK_ENV": env, runner_watch.RUNNER_PID: str(os.getpid()),
            "RUNBOOK_HOME": str(paths.project_root()), "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            # the kernels' connection files (they hold the kernel's HMAC key) in the run's own folder, removed at
            # the end of the run and, after the runner was killed, by the next command (run/accounting.py)
            "JUPYTER_RUNTIME_DIR": str(accounting.kernel_runtime_dir(run_id))}


KERNEL_LOG = "kernels.log"  # kept in the archive of a failed run (a kernel that died says why there)


def _kernel_manager_class():
    """jupyter_client's kernel manager, its connection file (which holds the kernel's HMAC key) in
    $JUPYTER_RUNTIME_DIR: by default a kernel started by papermill writes it with tempfile.mkstemp into /tmp,
    where a killed run leaves it for ever."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import default

    class RunKernelManager(AsyncKernelManager):
        @default("connection_file")
        def _connection_file_default(self) -> str:
            # jupyter's own default folder (outside a run: `runbook notebooks`) need not exist on a fresh machine
            os.makedirs(jupyter_runtime_dir(), mode=0o700, exist_ok=True)
            return os.path.join(jupyter_runtime_dir(), f"kernel-{uuid.uuid4().hex}.json")

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            # the kernel process's own log (not its cells' output, which papermill records in the notebook) goes
            # to KERNEL_LOG beside its connection file, not the operator's terminal: a run ended by Ctrl-C must
            # not print the tracebacks of a kernel whose sockets were closed under it
            with open(os.path.join(jupyter_runtime_dir(), KERNEL_LOG), "ab") as log:
                kw["stderr"] = log
                return await super()._async_launch_kernel(kernel_cmd, **kw)

    return RunKernelManager


def execute_notebook(source: Path, target: Path, parameters: dict[str, Any] | None,
                     timeout_s: int | None = None) -> None:
    import papermill

    papermill.execute_notebook(str(source), str(target), parameters=parameters, kernel_name="python3",
                               progress_bar=False, log_output=False, cwd=str(source.parent),
                               execution_timeout=timeout_s, kernel_manager_class=_kernel_manager_class())


def start_html_renderer() -> ThreadPoolExecutor:
    """The thread that renders each executed notebook as HTML while the next one runs; all renderings are
    finished before the secret scan and the manifest. Every import of the run happens here first, on the calling
    thread (papermill, jupyter_client's kernel manager, nbconvert and what an export imports, by exporting a
    warm-up notebook): two threads importing the same packages at once can meet in a circular import, and one of
    them then gets a partly initialised module (`cannot import name 'AsyncKernelManager' from partially
    initialized module 'jupyter_client.manager'`). The thread only ever renders."""
    import papermill  # noqa: F401
    from papermill.exceptions import PapermillExecutionError  # noqa: F401

    _kernel_manager_class()
    archive.warm_up_html()
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="html")


def _headline(engine, params) -> dict[str, Any]:
    ledger = Ledger(params.ledger_schema)
    with engine.connect() as conn:
        if not ledger.exists(conn):
            return {}
        baseline = ledger.baseline(conn)
        cps = ledger.checkpoints(conn)
    return {
        "core_tables": len(params.tables),
        "baseline_rows": int(baseline["row_count"].sum()) if len(baseline) else 0,
        "rows_backfilled_in_batches": int(cps["rows_updated"].sum()) if len(cps) else 0,
    }


def run(env: str, phases: str | None = None, *, dry_run: bool = False, yes: bool = False,
        cell_timeout_s: int | None = None, force: bool = False, since: str | None = None,
        log: Callable[[str], None] = print) -> RunResult:
    params = params_mod.load(env)
    wanted = parse_phases(phases)
    if params.database.confirm_required and not yes and not dry_run:
        raise RunbookError(f"env {env} changes a production database: add --yes to confirm "
                           f"(or --dry-run to see the plan). Nothing was changed.")
    engine = database.make_engine(params, phase="runner")
    control = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    lost: list[str] = []  # why the runner's own connection is gone: the server went away mid-run

    def on_server(call, *args, default=None):
        """call(*args) on the server, unless the server went away (then `default`, and `lost` says why): a run
        whose server stopped ends with its phase's error and a manifest, not a traceback from its clean-up."""
        if lost:
            return default
        try:
            return call(*args)
        except Exception as exc:
            if not connection_lost(exc):
                raise
            lost.append(_first_line(exc))
            return default

    try:
        ident = database.identity(control)
        database.check_expected_identity(params, ident)
        database.try_advisory_lock(control, database.RUN_LOCK, "runbook run")
        secrets = _secrets(env)
        # holding the run lock, no other runner of this database is writing a folder: an unclosed one is dead
        unclosed = archive.scan_unfinished_runs(params.archive.dir, env, secrets)
        for old, findings in unclosed.items():
            for p in findings:
                log(f"SECRET FOUND in the unclosed run {old.name}: {p}")
        run_id = uuid.uuid4().hex[:8]
        accounting.close_died_runs(control, params, f"run {run_id}", log)  # before this run's folder exists
        started = datetime.now(timezone.utc)
        folder = archive.run_folder(params.archive.dir, env, started, run_id)
        ledger = Ledger(params.ledger_schema)
        commit = archive.git_commit()
        recorded = False

        def record_run() -> None:
            """The run's row in the ledger, once the ledger exists: a first run leaves creating it to
            01_inspect, which does so only after its preflight passed (bad input changes nothing)."""
            nonlocal recorded
            if not dry_run and not recorded and on_server(ledger.exists, control, default=False):
                on_server(ledger.start_run, control, run_id, env, operator(), wanted, dry_run, __version__, commit)
                recorded = not lost

        if not dry_run and "inspect" not in wanted:
            ledger.ensure(control)
        record_run()
        log(f"run {run_id} on env {env} ({ident.database}, PostgreSQL {ident.server_version})"
            f"{' DRY RUN' if dry_run else ''}: {', '.join(wanted)}")
        os.environ.update(_kernel_environment(env, run_id))
        accounting.kernel_runtime_dir(run_id).mkdir(parents=True, exist_ok=True)
        result = RunResult(run_id, folder, "succeeded")
        previous = signal.signal(signal.SIGTERM, _terminate)
        html = start_html_renderer()
        renderings: list[tuple[dict[str, Any], Future]] = []
        try:
            for phase in wanted:
                record = _run_phase(phase, folder, env, dry_run, run_id, cell_timeout_s, log, force, since)
                target = folder / record["notebook"]
                if target.exists():
                    renderings.append((record, html.submit(archive.export_html, target)))
                record_run()
                result.phases.append(record)
                if record["status"] != "succeeded":
                    result.status = "failed"
                    break
        except KeyboardInterrupt as exc:
            _retrieve_abandoned_cells()
            result.status = "interrupted"
            why = str(exc) or "Ctrl-C"
            result.phases.append({"name": phase, "status": "interrupted", "error": why,
                                  "notebook": NOTEBOOKS[phase]})
            interrupted = phase
        finally:
            signal.signal(signal.SIGTERM, previous)
            if result.status == "failed":
                _keep_kernel_log(run_id, folder)
            accounting.remove_kernel_runtime(run_id)  # the kernels' connection files, a killed kernel's too
            for record, rendering in renderings:
                try:
                    rendering.result()
                except Exception as exc:  # an HTML failure must not hide the phase's own outcome
                    record["html_error"] = f"{type(exc).__name__}: {exc}"
            html.shutdown()
        if result.status != "succeeded":
            cancelled = on_server(cancel_run_backends, control, params, run_id, default=0)
            if lost:
                log(f"  the server went away ({lost[0]}): it ended every statement of this run; this run's record "
                    f"in the ledger stays open until the next run closes it")
            elif result.status == "interrupted":  # one line: what was cancelled
                log(f"  {interrupted} interrupted ({why}): cancelled "
                    + (f"{cancelled} statement(s) this run still had running on the server" if cancelled
                       else "the phase; no statement of this run is still running on the server"))
            else:
                log(f"  cancelled {cancelled} statement(s) this run still had running on the server" if cancelled
                    else "  no statement of this run is still running on the server")
            if recorded:
                on_server(ledger.fail_open_phases, control, run_id)
        if lost:  # the listings read the database: not written (an embedded server is not started again for them)
            lint_note = ambiguities_note = conflicts_note = unlisted_note = writes_note = pace_note = sizes_note = \
                drizzle_note = f"not written: the server went away during the run ({lost[0]})"
        else:
            lint_note = _write_lint(folder, env, run_id)
            ambiguities_note = _write_ambiguities(folder, params, env, run_id)
            conflicts_note = _write_conflicts(folder, env, run_id)
            unlisted_note = _write_unlisted(folder, env, run_id)
            writes_note = _write_app_writes(folder, env, run_id)
            pace_note = _write_pace(folder, env, run_id) if "backfill" in wanted else None
            sizes_note = _write_table_sizes(folder, env, run_id) if "validate" in wanted else None
            drizzle_note = _write_drizzle_schema(folder, params, env, run_id) if "validate" in wanted else None
        result.problems = archive.scan_for_secrets(folder, secrets)
        if result.problems:
            result.status = "failed"
            for p in result.problems:
                log(f"SECRET FOUND: {p}")
        manifest = {
            "run_id": run_id, "env": env, "operator": operator(), "dry_run": dry_run,
            "status": result.status, "started_at": started.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "runbook_version": __version__, "git_commit": commit,
            "server": {"version": ident.server_version, "database": ident.database,
                       "system_identifier": ident.system_identifier},
            "params": params.public_dict(),
            "phases": result.phases,
            "stopped_at": _stopped_at(result),
            "server_went_away": lost[0] if lost else None,
            "headline": {} if lost else on_server(_headline, engine, params, default={}),
            "secret_scan": result.problems or "clean",
            "unclosed_runs_secret_scan": {old.name: f for old, f in unclosed.items()} or "clean",
            "tenancy_lint": lint_note,
            "legacy_ambiguities": ambiguities_note,
            "tenant_conflicts": conflicts_note,
            "unlisted_tables": unlisted_note,
            "application_writes": writes_note,
            "backfill_pace": pace_note,
            "table_sizes": sizes_note,
            "drizzle_schema": drizzle_note,
        }
        result.manifest_sha256 = archive.write_manifest(folder, manifest)
        if recorded:
            on_server(ledger.finish_run, control, run_id, result.status, result.manifest_sha256)
        log(f"run {run_id} {result.status}; archive: {folder}")
        return result
    finally:
        try:
            # checked at the end of every run: none is left behind (a server that went away holds none)
            on_server(database.release_runbook_locks, control)
        finally:
            control.close()
            engine.dispose()


def _retrieve_abandoned_cells() -> None:
    """Ctrl-C stops papermill's event loop while the cell it executes is still a task on it; the kernel is shut down
    afterwards, the task ends with DeadKernelError, and when it is garbage collected asyncio prints "Task exception
    was never retrieved" with a traceback (seen under load). The outcome is known (the run was interrupted): each
    such task's exception is taken when it ends."""
    try:
        from jupyter_core.utils import ensure_event_loop
        tasks = asyncio.all_tasks(ensure_event_loop())
    except Exception:  # nothing to take: no loop was made
        return
    for task in tasks:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the server or the connection to it is gone (shut down, crashed, the network): the
    connection is then invalidated, and every later use of it fails too."""
    import psycopg
    from sqlalchemy.exc import DBAPIError, PendingRollbackError, ResourceClosedError

    if isinstance(exc, (PendingRollbackError, ResourceClosedError)):
        return True
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or isinstance(exc.orig, psycopg.OperationalError))


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def _stopped_at(result: RunResult) -> dict[str, Any] | None:
    """Where a run that did not succeed stopped: its phase, the cell and the phase's error (None: it succeeded)."""
    if result.status == "succeeded" or not result.phases:
        return None
    last = result.phases[-1]
    return {"phase": last["name"], "status": last["status"], "notebook": last.get("notebook"),
            "failed_cell": last.get("failed_cell"), "error": last.get("error")}


def _secrets(env: str) -> list[str]:
    """Every secret of the env's connection (none for an embedded server, which has no password)."""
    params = params_mod.load(env)
    return [] if params.database.embedded else database.known_secrets(params)


def _keep_kernel_log(run_id: str, folder: Path) -> None:
    log = accounting.kernel_runtime_dir(run_id) / KERNEL_LOG
    if log.is_file() and log.stat().st_size:
        folder.mkdir(parents=True, exist_ok=True)
        log.replace(folder / KERNEL_LOG)  # scanned for secrets with the rest of the archive


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def cancel_run_backends(control, params, run_id: str) -> int:
    """Cancel every statement still running under this run's application_name (a kernel killed mid-cell
    leaves its backend working otherwise), and wait until they have stopped."""
    from sqlalchemy import text

    pattern = database.application_name(params, "%", run_id)
    query = text("SELECT pid FROM pg_stat_activity WHERE application_name LIKE :p AND pid <> pg_backend_pid() "
                 "AND state <> 'idle'")
    pids = [r[0] for r in control.execute(query, {"p": pattern})]
    for pid in pids:
        # cast: on Citus a pid sent as smallint is ambiguous (see lock_holders.cancel_backend)
        control.execute(text("SELECT pg_cancel_backend(CAST(:pid AS integer))"), {"pid": pid})
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        if not control.execute(query, {"p": pattern}).first():
            break
        time.sleep(0.1)
    return len(pids)


def _write_lint(folder: Path, env: str, run_id: str) -> str:
    """The tenancy lint as JSON in the archive (read-only; a failure is noted, it does not fail the run)."""
    import json

    from ..phases import validate
    from ..tenancy import lint
    from .session import PhaseSession
    try:
        rb = PhaseSession("validate", env, dry_run=True, run_id=run_id, log=lambda *_: None)
        try:
            frame = validate.lint(rb)
        finally:
            rb.close()
    except Exception as exc:  # the database may be unreachable after a failed phase
        return f"not written: {type(exc).__name__}: {exc}"
    (folder / "tenancy_lint.json").write_text(json.dumps({
        "clean": lint.clean(frame), "findings": frame.to_dict("records")}, indent=2) + "\n", encoding="utf-8")
    failed = int((frame["status"] == lint.FAIL).sum())
    advisory = int((frame["status"] == lint.ADVISORY).sum())
    return f"tenancy_lint.json: {len(frame)} findings, {failed} failing" + (
        f", {advisory} advisory (rls.enabled is false)" if advisory else "")


def _write_listing(folder: Path, phase: str, env: str, run_id: str, read, write, describe,
                   keep_empty: bool = True) -> str | None:
    """A read-only listing in the archive, read in a dry-run session of `phase`: `read(rb)` gives the frame,
    `write(frame, folder)` stores it, `describe(frame)` is the manifest's note (None, nothing written: an empty
    frame unless `keep_empty`). A failure is noted, it does not fail the run (the database may be unreachable
    after a failed phase)."""
    from .session import PhaseSession
    try:
        with PhaseSession(phase, env, dry_run=True, run_id=run_id, log=lambda *_: None) as rb:
            frame = read(rb)
    except Exception as exc:
        return f"not written: {type(exc).__name__}: {exc}"
    if frame.empty and not keep_empty:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    write(frame, folder)
    return describe(frame)


def _write_ambiguities(folder: Path, params, env: str, run_id: str) -> str | None:
    """legacy_ambiguities.csv: what the legacy mapping did not guess (None when the mapping is off)."""
    from ..legacy import checks as legacy_checks
    if not params.legacy.enabled:
        return None

    def describe(frame) -> str:
        kinds = legacy_checks.ambiguity_summary(frame).groupby("kind", sort=False)["cases"].sum()
        return f"legacy_ambiguities.csv: {len(frame)} cases ({', '.join(f'{k}: {n}' for k, n in kinds.items())})"
    return _write_listing(folder, "seed", env, run_id, legacy_checks.ambiguities,
                          lambda frame, at: legacy_checks.write_csv(frame, at / "legacy_ambiguities.csv"), describe)


def _write_conflicts(folder: Path, env: str, run_id: str) -> str:
    """tenant_conflicts.csv: per foreign key between tenant tables, the rows that would cross tenants (count,
    sample keys, rule), and tenant_id values naming no tenant."""
    from ..legacy import conflicts

    def describe(frame) -> str:
        crossing = frame[frame["rows"] > 0]
        return f"tenant_conflicts.csv: {len(frame)} checked, {len(crossing)} with rows across tenants" + (
            f" ({', '.join(f'{r.object}: {r.rows} {r.status}' for r in crossing.itertuples())})" if len(crossing)
            else "")
    return _write_listing(folder, "inspect", env, run_id, conflicts.report,
                          lambda frame, at: conflicts.write_csv(frame, at / "tenant_conflicts.csv"), describe)


def _write_unlisted(folder: Path, env: str, run_id: str) -> str:
    """unlisted_tables.csv: every table of the schema in neither core_tables nor shared_tables, with its rows,
    foreign keys to and from the core tables and what to do (or the one line saying there is none)."""
    from ..phases import inspect, unlisted

    def describe(frame) -> str:
        if unlisted.NONE_COLUMN in frame:
            return f"unlisted_tables.csv: none ({frame[unlisted.NONE_COLUMN].iloc[0]})"
        return (f"unlisted_tables.csv: {len(frame)} table{'s' if len(frame) != 1 else ''} in neither core_tables nor "
                f"shared_tables ({', '.join(frame['table'])})")
    return _write_listing(folder, "inspect", env, run_id, inspect.unlisted_tables,
                          lambda frame, at: frame.to_csv(at / "unlisted_tables.csv", index=False), describe)


def _write_app_writes(folder: Path, env: str, run_id: str) -> str | None:
    """application_writes.csv: the key of every row the application wrote during the rollout window, and what
    happened to it (None before the window opened)."""
    from ..phases import validate

    def describe(frame) -> str:
        counts = frame.groupby("change")["key"].count()
        return f"application_writes.csv: {len(frame)} rows ({', '.join(f'{k}: {n}' for k, n in counts.items())})"
    return _write_listing(folder, "validate", env, run_id, validate.application_write_keys,
                          lambda frame, at: frame.to_csv(at / "application_writes.csv", index=False), describe,
                          keep_empty=False)


def _write_pace(folder: Path, env: str, run_id: str) -> str | None:
    """backfill_pace.csv and backfill_pace.png: per batch of this run, the throttle's signal (the canary's p99,
    standby lag) and choice (batch size, pace), and the throughput (None without a batched backfill)."""
    from . import charts

    def read(rb):
        frame = rb.ledger.pace(rb.control, run_id)
        frame.attrs["throttle"] = rb.params.backfill.throttle
        return frame

    def write(frame, at: Path) -> None:
        frame.to_csv(at / "backfill_pace.csv", index=False)
        (at / "backfill_pace.png").write_bytes(charts.backfill_pace(frame, frame.attrs["throttle"]).data)

    def describe(frame) -> str:
        tables = frame.groupby("table_name")["batch"].count()
        return "backfill_pace.csv and backfill_pace.png: " + ", ".join(f"{t}: {n} batches" for t, n in tables.items())
    return _write_listing(folder, "backfill", env, run_id, read, write, describe, keep_empty=False)


def _write_table_sizes(folder: Path, env: str, run_id: str) -> str | None:
    """table_sizes.csv: every core table's heap, indexes and total in bytes, before backfill and now."""
    from ..phases import validate

    def describe(frame) -> str:
        grown = frame.dropna(subset=["total before"])
        delta = int((grown["total after"] - grown["total before"]).sum()) if len(grown) else 0
        return f"table_sizes.csv: {len(frame)} tables, {delta / 1024 / 1024:+,.1f} MB in all since backfill started"
    return _write_listing(folder, "validate", env, run_id, validate.sizes,
                          lambda frame, at: frame.to_csv(at / "table_sizes.csv", index=False), describe)


def _write_drizzle_schema(folder: Path, params, env: str, run_id: str) -> str | None:
    """drizzle_schema.md (and .diff, where params name the application's schema file) in the archive: what
    the application's schema.ts declares now (read-only; None without a Drizzle project; a failure is noted)."""
    from .. import drizzle_schema
    from .session import PhaseSession
    if not params.drizzle.folder:
        return None
    try:
        with PhaseSession("validate", env, dry_run=True, run_id=run_id, log=lambda *_: None) as rb:
            handover = drizzle_schema.build(rb)
            changes = drizzle_schema.diff(rb.params, handover)
    except Exception as exc:  # the database may be unreachable after a failed phase
        return f"not written: {type(exc).__name__}: {exc}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "drizzle_schema.md").write_text(drizzle_schema.markdown(handover), encoding="utf-8")
    if changes:
        (folder / "drizzle_schema.diff").write_text(changes, encoding="utf-8")
    return "drizzle_schema.md" + (f" and drizzle_schema.diff ({changes.count(chr(10) + '+') } lines added to "
                                  f"{params.drizzle.schema_file})" if changes else "")


def _run_phase(phase: str, folder: Path, env: str, dry_run: bool, run_id: str, timeout_s: int | None,
               log: Callable[[str], None], force: bool = False, since: str | None = None) -> dict[str, Any]:
    from papermill.exceptions import PapermillExecutionError

    source = paths.notebooks_dir() / NOTEBOOKS[phase]
    target = folder / NOTEBOOKS[phase]
    record: dict[str, Any] = {"name": phase, "notebook": target.name, "html": target.with_suffix(".html").name,
                              "started_at": datetime.now(timezone.utc).isoformat()}
    t0 = time.monotonic()
    log(f"  {phase} ...")
    try:
        parameters = {"env": env, "dry_run": dry_run, "run_id": run_id}
        if phase in (ROLLBACK, FINALIZE):
            parameters["force"] = force
        if phase == FINALIZE:
            parameters["since"] = since
        execute_notebook(source, target, parameters, timeout_s)
        record["status"] = "succeeded"
    except PapermillExecutionError as exc:
        record["status"] = "failed"
        record["error"] = f"{exc.ename}: {exc.evalue}"
        record["failed_cell"] = exc.exec_count
    except Exception as exc:  # kernel died, timeout, notebook missing
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
    if "error" in record:  # the exception text may quote a secret; it goes to the terminal and the manifest
        record["error"] = archive.redact_text(record["error"], _secrets(env))
    record["finished_at"] = datetime.now(timezone.utc).isoformat()
    record["seconds"] = round(time.monotonic() - t0, 2)
    line = f"  {phase} {record['status']} in {record['seconds']:.1f} s"
    if record["status"] != "succeeded":
        line += f"\n    {record.get('error')}\n    see {target}"
    log(line)
    return record
