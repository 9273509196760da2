"""`runbook run|finalize|distribute|rollback|demo|demo-db|db|plan|notebooks|drizzle|baseline|audit`: the command line of the runbook.

Every RunbookError is printed as `runbook: error: …` on stderr with exit status 2, never a traceback:
those errors say what was wrong and what to do. A failed phase exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import params as params_mod
from .errors import RunbookError


def _env_arg(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--env", default=default, required=default is None,
                        help="environment: the name of a file in params/ (local, ci, staging, prod)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runbook", description="Migrate a single-tenant PostgreSQL database "
                                     "to shared-schema multi-tenancy, online, resumable and proven.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the phase notebooks in order and archive the run")
    _env_arg(run)
    run.add_argument("--phases", help="comma-separated subset, e.g. inspect,seed (always run in order)")
    run.add_argument("--dry-run", action="store_true", help="show every plan, change nothing")
    run.add_argument("--yes", action="store_true", help="confirm a run on an env that requires it (prod)")
    run.add_argument("--cell-timeout", type=int, default=None, help="seconds a notebook cell may run")

    rollback = sub.add_parser("rollback", help="undo constrain, backfill and seed (99_rollback), archived like a run")
    _env_arg(rollback)
    rollback.add_argument("--dry-run", action="store_true", help="show the rollback plan, change nothing")
    rollback.add_argument("--force", action="store_true",
                          help="roll back even though rows belong to tenants other than the System Tenant")
    rollback.add_argument("--yes", action="store_true", help="confirm on an env that requires it (prod)")

    finalize = sub.add_parser("finalize", help="close the rollout window (06_finalize) once the application writes "
                              "tenant_id itself, archived like a run")
    _env_arg(finalize)
    finalize.add_argument("--since", help="count the writes that still needed the rollout trigger from this time on "
                          "(ISO 8601 with a time zone: when the tenant-aware release went out); default: the whole window")
    finalize.add_argument("--dry-run", action="store_true", help="show the counts and the plan, change nothing")
    finalize.add_argument("--force", action="store_true",
                          help="close the window although recent writes still needed the trigger")
    finalize.add_argument("--yes", action="store_true", help="confirm on an env that requires it (prod)")

    distribute = sub.add_parser("distribute", help="shard the tenant tables by tenant_id with Citus (07_distribute), "
                                "after finalize, on a Citus coordinator only; archived like a run")
    _env_arg(distribute)
    distribute.add_argument("--dry-run", action="store_true", help="show the plan and what stops it, change nothing "
                            "(on any server)")
    distribute.add_argument("--yes", action="store_true", help="confirm on an env that requires it (prod)")

    demo = sub.add_parser("demo", help="fresh demo database, then the whole runbook on it")
    _env_arg(demo, "local")
    demo.add_argument("--rows", type=int, default=None, help="rows in workflows (default from params)")

    demo_db = sub.add_parser("demo-db", help="drop and rebuild the legacy demo database")
    _env_arg(demo_db)
    demo_db.add_argument("--rows", type=int, default=None, help="rows in workflows (default from params)")

    db = sub.add_parser("db", help="manage the env's embedded PostgreSQL server")
    db.add_argument("action", choices=["start", "stop", "status", "url", "reset"])
    _env_arg(db)

    plan = sub.add_parser("plan", help="print what seed, backfill and constrain would do (read-only: changes "
                          "nothing, and runs beside a run in progress)")
    _env_arg(plan)
    plan.add_argument("--format", choices=["table", "sql", "json"], default="table",
                      help="table: for reading in a terminal (and what backfill's batches will cost); sql: every "
                           "statement as it will run, each after a comment with its phase, table, lock and why, for "
                           "a reviewer or a migration linter (e.g. squawk); json: a list of objects")

    notebooks = sub.add_parser("notebooks", help="re-execute the committed notebooks on a fresh demo database")
    _env_arg(notebooks, "ci")

    drizzle = sub.add_parser("drizzle", help="the hand-over to the application's Drizzle project: `schema` prints "
                             "what its schema.ts declares now (and the diff of drizzle.schema_file), `record` marks "
                             "migrations whose end state the runbook produced as applied")
    drizzle.add_argument("action", choices=["schema", "record"])
    drizzle.add_argument("tags", nargs="*", help="record: the journal tags, e.g. 0002_tenancy_end_state")
    drizzle.add_argument("--dry-run", action="store_true", help="record: list what would be recorded, change nothing")
    _env_arg(drizzle)

    baseline = sub.add_parser("baseline", help="reset: forget the pre-migration baseline and schema snapshot (on a "
                              "database that is not migrated, e.g. after a rollback), so the next inspect captures "
                              "them anew; archived like a run")
    baseline.add_argument("action", choices=["reset"])
    baseline.add_argument("--yes", action="store_true", help="confirm on an env that requires it (prod)")
    _env_arg(baseline)

    audit = sub.add_parser("audit", help="list archived runs, or verify one against its manifest and the chain")
    audit.add_argument("action", choices=["list", "verify"])
    audit.add_argument("run", nargs="?", help="verify: the run folder's name, its run id, or its path (default: "
                       "every run of the env, and the ledger against the archive)")
    _env_arg(audit)
    return parser


def _demo_db(env: str, rows: int | None, command: str = "demo-db") -> None:
    """Drop and rebuild the env's demo database: only on an embedded server, and only a database that
    demo-db created (demo.build refuses any other), so a real database is never touched."""
    from . import demo
    from .db.database import server_for

    params = params_mod.load(env)
    if not params.database.embedded:
        raise RunbookError(f"params/{env}.yaml: database.embedded is false: its database (from "
                           f"${params.database.dsn_env}) may be a real one, and `runbook {command}` drops and recreates "
                           f"the database; it runs on embedded envs only (local, ci). Nothing was changed")
    server = server_for(params)
    server.start()
    demo.build(server.url(), params.database.name, system_uuid=str(params.system_tenant.uuid),
               system_name=params.system_tenant.name, rows=rows or params.demo.rows, seed=params.demo.seed)


def _db(action: str, env: str) -> int:
    from .db.database import server_for

    if action == "reset":
        _demo_db(env, None, "db reset")
        return 0
    params = params_mod.load(env)
    server = server_for(params)
    if action == "start":
        status, note = server.start()
        print(f"{status.describe()} ({note})")
        print(server.url(params.database.name))
    elif action == "stop":
        print(server.stop())
    elif action == "status":
        status = server.status()
        print(status.describe())
        if status.running:
            print(server.url(params.database.name))
        return 0 if status.running else 3
    elif action == "url":
        server.start()
        print(server.url(params.database.name))
    return 0


def _plan(env: str, fmt: str = "table") -> int:
    import pandas as pd

    from .db import plan_text
    from .phases import inspect
    from .run.session import PhaseSession

    rb = PhaseSession("inspect", env, read_only=True, log=lambda *_: None)  # beside a run: no lock, no write
    try:
        frame = inspect.full_plan(rb)
        cost = inspect.cost(rb) if fmt == "table" else None
        where = f"{rb.identity.database} on PostgreSQL {rb.identity.server_version}"
        first_try_ms = min(rb.params.locks.first_lock_timeout_ms, rb.params.locks.lock_timeout_ms)
    finally:
        rb.close()
    if fmt == "json":
        sys.stdout.write(plan_text.to_json(frame))
        return 0
    if fmt == "sql":
        sys.stdout.write(plan_text.to_sql(frame, header=(
            f"runbook plan --env {env}: what seed, backfill and constrain will run on {where}, in order, as of now "
            f"(each phase re-reads the catalog before it runs). Statements run one by one, each in its own "
            f"transaction (CONCURRENTLY and VACUUM outside any), never as one script. A batched UPDATE runs once "
            f"per batch; $n are its key-range bounds, bound per batch."), lock_timeout_ms=first_try_ms))
        return 0
    with pd.option_context("display.max_colwidth", 120, "display.width", 200, "display.max_rows", 500):
        print(frame[["phase", "table", "action", "lock", "statement"]].to_string(index=False))
        print(f"\nwhat backfill's batches will cost:\n{cost!r}")
    return 0


def _refuse_without_citus(env: str) -> None:
    """`runbook distribute` on a server that is not a Citus coordinator: refused before anything runs."""
    from .db import database
    from .distribution import citus

    engine = database.make_engine(params_mod.load(env), phase="runner")
    try:
        with engine.connect() as conn:
            refusal = citus.server(conn).refusal
    finally:
        engine.dispose()
    if refusal:
        raise RunbookError(refusal + " (`runbook distribute --dry-run` shows the plan on any server)")


def _notebooks(env: str) -> int:
    from .run import notebook_outputs

    _demo_db(env, None, "notebooks")
    notebook_outputs.refresh(env)
    return 0


def _drizzle(action: str, env: str, tags: list[str], dry_run: bool) -> int:
    from . import drizzle, drizzle_schema
    from .run.session import PhaseSession

    rb = PhaseSession("validate", env, dry_run=True if action == "schema" else dry_run, log=lambda *_: None)
    try:
        if action == "schema":
            handover = drizzle_schema.build(rb)
            print(drizzle_schema.markdown(handover))
            changes = drizzle_schema.diff(rb.params, handover)
            if changes:
                print(f"## The diff for {rb.params.drizzle.schema_file}\n\n```diff\n{changes}```")
            return 0
        if not tags:
            raise RunbookError("drizzle record needs the tags of the migrations to record, e.g. 0002_tenancy_end_state")
        frame = drizzle.record(rb, drizzle.record_plan(rb, tags))
        print(frame.to_string(index=False) if len(frame) else "nothing to record: every tag named is recorded already")
        return 0
    finally:
        rb.close()


def _audit_ledger(params):
    """The env's control connection for the audit (None, with a note, when the database cannot be reached: the
    archive alone is still checked)."""
    from .db import database
    if params.database.embedded and not database.server_for(params).status().running:
        print(f"ledger not checked: the {params.env} embedded server is not running "
              f"(`runbook db start --env {params.env}`)", file=sys.stderr)
        return None, None
    try:
        engine = database.make_engine(params, phase="audit")
        return engine, engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    except RunbookError as exc:
        print(f"ledger not checked: {exc}", file=sys.stderr)
        return None, None


def _audit(action: str, env: str, run: str | None) -> int:
    from .run import accounting, archive

    params = params_mod.load(env)
    engine, control = _audit_ledger(params)
    try:
        if control is not None:  # runs whose runner died are closed first, so they are listed and chained
            accounting.close_died_runs(control, params, f"runbook audit {action}")
        gaps = accounting.gaps(control, params)
    finally:
        if control is not None:
            control.close()
            engine.dispose()
    if action == "verify":
        folders = [archive.find_run(params.archive.dir, env, run)] if run else \
            [Path(r["folder"]) for r in archive.list_runs(params.archive.dir, env)]
        bad = False
        for folder in folders:
            problems = archive.verify(folder)
            if problems:
                bad = True
                print(f"{folder.name}: TAMPERED OR INCOMPLETE")
                for p in problems:
                    print(f"  - {p}")
            else:
                print(f"{folder.name}: every file matches its manifest, and the manifest its predecessor in the chain")
        if gaps:
            print(f"env {env}: GAPS IN THE AUDIT TRAIL")
            for g in gaps:
                print(f"  - {g}")
        return 1 if bad or gaps else 0
    runs = archive.list_runs(params.archive.dir, env)
    if not runs:
        print(f"no archived runs for env {env}")
    for r in runs:
        print(f"{r['run']}  {r['status']:<11}  {'dry run ' if r['dry_run'] else ''}{r['phases']}  by {r['operator']}")
    for g in gaps:
        print(f"gap: {g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            from .run import runner
            result = runner.run(args.env, args.phases, dry_run=args.dry_run, yes=args.yes,
                                cell_timeout_s=args.cell_timeout)
            return 0 if result.ok else (130 if result.status == "interrupted" else 1)
        if args.command == "rollback":
            from .run import runner
            result = runner.run(args.env, "rollback", dry_run=args.dry_run, yes=args.yes, force=args.force)
            return 0 if result.ok else (130 if result.status == "interrupted" else 1)
        if args.command == "finalize":
            from .phases.finalize import parse_since
            from .run import runner
            parse_since(args.since)  # a bad time fails here, before anything runs
            result = runner.run(args.env, "finalize", dry_run=args.dry_run, yes=args.yes, force=args.force,
                                since=args.since)
            return 0 if result.ok else (130 if result.status == "interrupted" else 1)
        if args.command == "distribute":
            from .run import runner
            if not args.dry_run:
                _refuse_without_citus(args.env)  # before anything runs, the ledger included
            result = runner.run(args.env, "distribute", dry_run=args.dry_run, yes=args.yes)
            return 0 if result.ok else (130 if result.status == "interrupted" else 1)
        if args.command == "demo":
            from .run import runner
            _demo_db(args.env, args.rows, "demo")
            return 0 if runner.run(args.env).ok else 1
        if args.command == "demo-db":
            params_mod.load(args.env)
            _demo_db(args.env, args.rows)
            return 0
        if args.command == "db":
            return _db(args.action, args.env)
        if args.command == "plan":
            return _plan(args.env, args.format)
        if args.command == "notebooks":
            return _notebooks(args.env)
        if args.command == "drizzle":
            return _drizzle(args.action, args.env, args.tags, args.dry_run)
        if args.command == "baseline":
            from .run import baseline
            baseline.reset(args.env, yes=args.yes)
            return 0
        if args.command == "audit":
            return _audit(args.action, args.env, args.run)
    except RunbookError as exc:
        print(f"runbook: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("runbook: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: its traceback, but never with any part of a DSN or password in it
        print(scrubbed_traceback(exc, getattr(args, "env", None)), file=sys.stderr)
        return 1
    return 2


def scrubbed_traceback(exc: BaseException, env: str | None) -> str:
    """The traceback of an unexpected error, with every secret of the env's connection (and every piece of
    its DSN, which may be malformed) replaced by ***."""
    import os
    import traceback

    from .db import database, secrets

    text = "".join(traceback.format_exception(exc))
    found: list[str] = []
    dsn_vars = [name for name in os.environ if name.endswith("_DSN")]
    try:
        params = params_mod.load(env) if env else None
        if params is not None and not params.database.embedded:
            dsn_vars.insert(0, params.database.dsn_env)
            found += database.known_secrets(params)
    except Exception:  # noqa: BLE001 - the DSN may be what is broken; its pieces are scrubbed below
        pass
    for name in dict.fromkeys(dsn_vars):
        value = os.environ.get(name, "")
        if value:
            found += [value, *secrets.fragments(value)]
    found += [os.environ[v] for v in ("PGPASSWORD", "PGSSLPASSWORD") if os.environ.get(v)]
    return "runbook: internal error (a bug; secrets scrubbed):\n" + database.scrub(text, found)


if __name__ == "__main__":
    sys.exit(main())
