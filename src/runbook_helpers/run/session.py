"""A phase session: what every notebook opens first and every phase helper receives.

It loads the env's params, connects (starting the embedded server if that is the env's database),
takes the single-runner advisory locks, and records the phase in the ledger. It holds no secret: the DSN
is read from the environment variable by db/database.py and never stored here.
"""

from __future__ import annotations

import getpass
import json
import os
from datetime import datetime, timezone
from typing import Any

import pandas as pd
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from .. import params as params_mod
from ..db import database, runner_watch
from ..db.ddl import Executor
from ..db.ledger import Ledger
from ..errors import RunbookError
from ..legacy import conflicts
from ..params import Params
from . import parameters as notebook_parameters
from .progress import Progress

PHASES = ["inspect", "seed", "backfill", "constrain", "validate"]
FINALIZE = "finalize"  # closes the rollout window: run alone, by `runbook finalize`, once the application
                       # writes tenant_id itself
DISTRIBUTE = "distribute"  # shards by tenant_id with Citus, after finalize: run alone, by `runbook distribute`
ROLLBACK = "rollback"  # not part of a run's order: run alone, by `runbook rollback`


def default_env() -> str:
    return os.environ.get("RUNBOOK_ENV") or "local"


def operator() -> str:
    return os.environ.get("RUNBOOK_OPERATOR") or getpass.getuser()


class PhaseSession:
    def __init__(self, phase: str, env: str | None = None, *, dry_run: bool = False, run_id: str | None = None,
                 database_name: str | None = None, params: Params | None = None, log=print, read_only: bool = False):
        """`read_only`: a look beside a run (`runbook plan`): a dry run whose connections are read-only
        (default_transaction_read_only), and which takes neither single-runner lock, so a run in progress does
        not refuse it and it cannot change anything that run relies on."""
        if phase not in PHASES + [FINALIZE, DISTRIBUTE, ROLLBACK]:
            raise RunbookError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)} (and {FINALIZE}, {DISTRIBUTE}, "
                               f"{ROLLBACK})")
        self.phase = phase
        self.params = params or params_mod.load(env or default_env())
        self.env = self.params.env
        self.dry_run = bool(dry_run) or read_only
        self.run_id = run_id or None
        self.log = log
        self.schema = self.params.schema_
        self.ledger = Ledger(self.params.ledger_schema)
        self.started_at = datetime.now(timezone.utc)
        self.engine: Engine = database.make_engine(self.params, database_name, phase, self.run_id)
        if read_only:
            event.listen(self.engine, "connect", _read_only_session)
        self.control: Connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._phase_run: int | None = None
        self._closed = False
        try:
            self.identity = database.identity(self.control)
            database.check_expected_identity(self.params, self.identity)
            if self.identity.server_version_num < database.MIN_SERVER_VERSION:
                raise RunbookError(
                    f"the {self.env} server runs PostgreSQL {self.identity.server_version}; the runbook needs 13 or "
                    f"newer (fast column defaults, SET NOT NULL proven by a valid CHECK). Nothing was changed."
                )
            under_runner = self.run_id is not None and os.environ.get("RUNBOOK_RUN_ID") == self.run_id
            if under_runner:
                runner_watch.arm()  # a kernel dies with its runner
            if not under_runner and not read_only:
                database.try_advisory_lock(self.control, database.RUN_LOCK, "runbook run")
            if not read_only:
                database.try_advisory_lock(self.control, database.PHASE_LOCK, "runbook phase")
            # a cross_tenant `wins: parent` rule makes that foreign key its table's parent, for every phase
            self.params = conflicts.resolved(self.control, self.params)
            if not self.dry_run and self.ledger.exists(self.control):
                self._phase_run = self.ledger.start_phase(self.control, self.run_id, phase, self.dry_run)
            self._watch_cells()
        except BaseException:
            self.close()
            raise

    # -- what the notebook shows first
    def summary(self) -> pd.DataFrame:
        ident = self.identity
        rows = [
            ("env", self.env),
            ("phase", self.phase),
            ("dry run", "yes: nothing will be changed" if self.dry_run else "no: changes are applied"),
            ("database", ident.database),
            ("server", f"PostgreSQL {ident.server_version}"),
            ("connected as", ident.user),
            ("run id", self.run_id or "(interactive)"),
            ("operator", operator()),
        ]
        if getattr(self, "overrides", None):
            rows.append(("params overridden", json.dumps(self.overrides, sort_keys=True)))
        return pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting")

    def executor(self) -> Executor:
        journal = journal_end = None
        if not self.dry_run and self.ledger.exists(self.control):
            def journal(phase, table, action, statement, lock):
                return self.ledger.journal_start(self.control, self.run_id, phase, table, action, statement, lock)

            def journal_end(entry, outcome, attempts, error, cleared=None):
                self.ledger.journal_end(self.control, entry, outcome, attempts, error, cleared)
        return Executor(self.engine, self.params.locks, dry_run=self.dry_run, journal=journal,
                        journal_end=journal_end, log=self.log)

    def progress(self, label: str, total: int, every_s: float = 5.0) -> Progress:
        """Progress for long work in this phase: a live bar in a Jupyter kernel (whoever started it), milestone
        lines in the log either way (they survive in headless archives)."""
        return Progress(label, total, every_s=every_s, log=self.log)

    def ensure_ledger(self) -> None:
        """Create the ledger (inspect's only write) and record this phase in it, if not done yet."""
        if self.dry_run:
            return
        self.ledger.ensure(self.control)
        if self._phase_run is None:
            self._phase_run = self.ledger.start_phase(self.control, self.run_id, self.phase, self.dry_run)

    @property
    def phase_run_id(self) -> int | None:
        """This phase's row in the ledger's phase_runs (None in a dry run, or before the ledger exists)."""
        return self._phase_run

    def require_baseline(self) -> pd.DataFrame:
        """Phases that change tables refuse to start before 01_inspect has captured the baseline."""
        baseline = self.ledger.baseline(self.control)
        missing = sorted(set(self.params.tables) - set(baseline["table_name"]))
        if missing and not self.dry_run:
            raise RunbookError(
                f"no baseline for {', '.join(missing)}: run 01_inspect (not as a dry run) first; it captures the "
                f"row counts and fingerprints that 05_validate compares against. Nothing was changed."
            )
        return baseline

    # -- ending
    def finish(self, result: Any = None, summary: dict[str, Any] | None = None) -> Any:
        """Record the phase as succeeded and release the locks; returns `result` for display."""
        if self._phase_run is not None:
            self.ledger.finish_phase(self.control, self._phase_run, "succeeded", summary or {})
            self._phase_run = None
        self.close()
        return result

    def fail(self, reason: str) -> None:
        if self._phase_run is not None and not self._closed:
            try:
                self.ledger.finish_phase(self.control, self._phase_run, "failed", {"error": reason[:2000]})
            finally:
                self._phase_run = None

    def __enter__(self) -> "PhaseSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.release_locks()
        finally:
            try:
                self.control.close()
            finally:
                self.engine.dispose()

    def release_locks(self) -> list[int]:
        """Release the runbook advisory locks this session holds (a lost connection holds none)."""
        try:
            return database.release_runbook_locks(self.control)
        except SQLAlchemyError:
            return []

    def _watch_cells(self) -> None:
        """In a notebook, record a failing cell as a failed phase at once."""
        try:
            from IPython import get_ipython
        except ImportError:
            return
        shell = get_ipython()
        if shell is None:
            return

        def after_cell(result) -> None:
            error = result.error_in_exec or result.error_before_exec
            if error is not None and self._phase_run is not None:
                self.fail(f"{type(error).__name__}: {error}")

        shell.events.register("post_run_cell", after_cell)


def _read_only_session(dbapi_connection, _record) -> None:
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    dbapi_connection.execute("SET default_transaction_read_only = on")
    dbapi_connection.autocommit = autocommit


def open_phase(phase: str, env: str | None = None, dry_run: bool = False, run_id: str | None = None,
               overrides: dict[str, Any] | str | None = None) -> PhaseSession:
    """The first call of every notebook: also makes tables show whole statements and every plan row.

    `overrides` replaces params values for this session only, e.g. {"backfill": {"batch_size": 5000}} (or
    that as a JSON string, as `papermill -p overrides '…'` passes it); they are validated like the files and
    shown in the summary. Before anything connects, the parameters papermill injected are checked: an unknown
    name (a typo such as `dryrun`) or a wrong type stops the notebook here.
    """
    notebook_parameters.check_names(phase)
    notebook_parameters.check_types(dry_run, run_id, env)
    overrides = notebook_parameters.overrides_dict(overrides)
    pd.set_option("display.max_colwidth", 200)
    pd.set_option("display.max_rows", 500)
    pd.set_option("display.width", 200)
    loaded = params_mod.load(env or default_env())
    if overrides:
        loaded = params_mod.override(loaded, overrides)
    session = PhaseSession(phase, loaded.env, dry_run=dry_run, run_id=run_id, params=loaded)
    session.overrides = dict(overrides or {})
    return session
