"""The runbook's own schema inside the target database: runs, phase runs, baseline (per table, and per row of a
table with a primary key: baseline_rows, so validate can list by key what changed before the record of the
application's writes opened), the baselines a completed 99_rollback retired (past_baselines), checkpoints, journal,
and the rollout window's record of the application's writes (capture_start, app_writes, rollout_assists,
capture_end; written by the rollout triggers, see tenancy/rollout.py); the backfill throttle's canary row
(its commit latency is the budget's signal) and the pace it chose per batch (backfill_pace, archived); the
core tables' sizes before backfill (table_sizes, for validate's before and after); what 07_distribute changed
(distribution_changes: the keys it swapped and the foreign keys it dropped, with their definitions, so a
resumed run re-adds them and 99_rollback knows it cannot undo them).

It lives next to the data it describes, so a resumed run on another machine finds the same checkpoints,
and the audit trail survives the laptop that ran it. Every table is created with IF NOT EXISTS;
the ledger is the only thing 01_inspect writes. Reads tolerate a missing ledger (dry runs create nothing).
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from psycopg import sql
from sqlalchemy.engine import Connection

from .catalog import relation_oid, schema_exists
from .sqltext import render

TABLES_SQL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.runs (
  run_id text PRIMARY KEY,
  env text NOT NULL,
  operator text NOT NULL,
  started_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  status text NOT NULL DEFAULT 'running',
  phases text[] NOT NULL DEFAULT '{{}}',
  dry_run boolean NOT NULL DEFAULT false,
  runbook_version text,
  git_commit text,
  manifest_sha256 text
);
CREATE TABLE IF NOT EXISTS {schema}.phase_runs (
  id bigserial PRIMARY KEY,
  run_id text,
  phase text NOT NULL,
  dry_run boolean NOT NULL DEFAULT false,
  started_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  status text NOT NULL DEFAULT 'running',
  summary jsonb
);
CREATE TABLE IF NOT EXISTS {schema}.baseline (
  table_name text PRIMARY KEY,
  row_count bigint NOT NULL,
  fingerprint text NOT NULL,
  columns text[] NOT NULL,
  captured_at timestamptz NOT NULL DEFAULT now(),
  run_id text
);
ALTER TABLE {schema}.baseline ADD COLUMN IF NOT EXISTS per_row boolean NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS {schema}.baseline_rows (
  table_name text NOT NULL,
  key jsonb NOT NULL,
  row_hash bigint NOT NULL,
  PRIMARY KEY (table_name, key)
);
CREATE TABLE IF NOT EXISTS {schema}.past_baselines (
  phase_run bigint NOT NULL,
  rollback_run_id text,
  archived_at timestamptz NOT NULL DEFAULT now(),
  table_name text NOT NULL,
  row_count bigint NOT NULL,
  fingerprint text NOT NULL,
  columns text[] NOT NULL,
  captured_at timestamptz NOT NULL,
  run_id text,
  PRIMARY KEY (phase_run, table_name)
);
CREATE TABLE IF NOT EXISTS {schema}.backfill_checkpoints (
  table_name text NOT NULL,
  part integer NOT NULL DEFAULT 0,
  strategy text NOT NULL,
  key_columns text[] NOT NULL,
  lower_key jsonb,
  upper_key jsonb,
  last_key jsonb,
  pass integer NOT NULL DEFAULT 1,
  rows_total bigint NOT NULL DEFAULT 0,
  rows_updated bigint NOT NULL DEFAULT 0,
  batches integer NOT NULL DEFAULT 0,
  started_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  PRIMARY KEY (table_name, part)
);
CREATE TABLE IF NOT EXISTS {schema}.statement_journal (
  id bigserial PRIMARY KEY,
  run_id text,
  phase text NOT NULL,
  table_name text,
  action text NOT NULL,
  statement text NOT NULL,
  lock_mode text NOT NULL,
  started_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  attempts integer NOT NULL DEFAULT 0,
  outcome text NOT NULL DEFAULT 'running',
  error text,
  cleared text
);
ALTER TABLE {schema}.statement_journal ADD COLUMN IF NOT EXISTS cleared text;
CREATE TABLE IF NOT EXISTS {schema}.capture_start (
  table_name text PRIMARY KEY,
  started_at timestamptz NOT NULL DEFAULT now(),
  snapshot pg_snapshot NOT NULL,
  columns text[] NOT NULL,
  key_columns text[] NOT NULL,
  rows_all bigint NOT NULL,
  digest_all numeric NOT NULL,
  rows_untouched bigint NOT NULL,
  digest_untouched numeric NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.capture_end (
  table_name text PRIMARY KEY,
  ended_at timestamptz NOT NULL DEFAULT now(),
  reconciled jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.app_writes (
  table_name text NOT NULL,
  key jsonb NOT NULL,
  first_op text NOT NULL,
  old_hash bigint,
  first_xid xid8 NOT NULL,
  first_at timestamptz NOT NULL DEFAULT now(),
  last_op text NOT NULL,
  last_at timestamptz NOT NULL DEFAULT now(),
  writes bigint NOT NULL DEFAULT 1,
  PRIMARY KEY (table_name, key)
);
CREATE TABLE IF NOT EXISTS {schema}.drizzle_records (
  tag text PRIMARY KEY,
  hash text NOT NULL,
  created_at bigint NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.table_sizes (
  table_name text PRIMARY KEY,
  heap_bytes bigint NOT NULL,
  index_bytes bigint NOT NULL,
  total_bytes bigint NOT NULL,
  measured_at timestamptz NOT NULL DEFAULT now(),
  run_id text
);
CREATE TABLE IF NOT EXISTS {schema}.rollout_assists (
  table_name text NOT NULL,
  key jsonb NOT NULL,
  first_at timestamptz NOT NULL DEFAULT now(),
  last_at timestamptz NOT NULL DEFAULT now(),
  times bigint NOT NULL DEFAULT 1,
  PRIMARY KEY (table_name, key)
);
CREATE TABLE IF NOT EXISTS {schema}.distribution_changes (
  kind text NOT NULL,
  table_name text NOT NULL,
  name text NOT NULL,
  definition text NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (kind, table_name, name)
);
CREATE TABLE IF NOT EXISTS {schema}.canary (
  id integer PRIMARY KEY,
  beats bigint NOT NULL DEFAULT 0,
  beat_at timestamptz
);
INSERT INTO {schema}.canary (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS {schema}.backfill_pace (
  run_id text,
  table_name text NOT NULL,
  batch integer NOT NULL,
  elapsed_s float8 NOT NULL,
  rows_done bigint NOT NULL,
  batch_rows bigint NOT NULL,
  batch_s float8 NOT NULL,
  batch_size integer NOT NULL,
  pace_ms float8 NOT NULL,
  canary_p99_ms float8,
  replica_lag_s float8,
  recorded_at timestamptz NOT NULL DEFAULT now()
)
"""


class Ledger:
    """Access to the ledger schema through one connection (autocommit, so entries survive failures)."""

    def __init__(self, schema: str):
        self.schema = schema

    def _t(self, name: str) -> sql.Composed:
        return sql.Identifier(self.schema, name)

    def _q(self, conn: Connection, template: str, **names: str) -> str:
        return render(conn, sql.SQL(template).format(**{k: self._t(v) for k, v in names.items()}))

    def exists(self, conn: Connection) -> bool:
        return relation_oid(conn, self.schema, "statement_journal") is not None

    def ensure(self, conn: Connection) -> None:
        """Create the ledger schema and tables if missing (idempotent)."""
        from sqlalchemy.exc import DBAPIError

        from ..errors import RunbookError

        script = sql.SQL(TABLES_SQL).format(schema=sql.Identifier(self.schema))
        statements = render(conn, script).split(";\n")
        if schema_exists(conn, self.schema):  # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even then
            statements = statements[1:]
        try:
            for statement in statements:
                conn.exec_driver_sql(statement)
        except DBAPIError as exc:
            reason = getattr(getattr(exc.orig, "diag", None), "message_primary", None) or str(exc.orig)
            raise RunbookError(
                f"cannot create the runbook's ledger schema {self.schema!r}: {reason}; grant CREATE on the database "
                f"to the migration user, or create the schema for it (ledger_schema in params names it)") from None

    # -- runs and phases
    def start_run(self, conn: Connection, run_id: str, env: str, operator: str, phases: list[str],
                  dry_run: bool, version: str, commit: str | None) -> None:
        conn.exec_driver_sql(self._q(conn, "INSERT INTO {t} (run_id, env, operator, phases, dry_run, runbook_version, "
                                           "git_commit) VALUES (%s, %s, %s, %s, %s, %s, %s)", t="runs"),
                             (run_id, env, operator, phases, dry_run, version, commit))

    def finish_run(self, conn: Connection, run_id: str, status: str, manifest_sha256: str | None) -> None:
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET finished_at = now(), status = %s, manifest_sha256 = %s "
                                           "WHERE run_id = %s", t="runs"), (status, manifest_sha256, run_id))

    def start_phase(self, conn: Connection, run_id: str | None, phase: str, dry_run: bool) -> int:
        return conn.exec_driver_sql(self._q(conn, "INSERT INTO {t} (run_id, phase, dry_run) VALUES (%s, %s, %s) "
                                                  "RETURNING id", t="phase_runs"), (run_id, phase, dry_run)).scalar()

    def finish_phase(self, conn: Connection, phase_run: int, status: str, summary: dict[str, Any]) -> None:
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET finished_at = now(), status = %s, summary = %s::jsonb "
                                           "WHERE id = %s", t="phase_runs"),
                             (status, json.dumps(summary, default=str), phase_run))

    def fail_open_phases(self, conn: Connection, run_id: str) -> None:
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET finished_at = now(), status = 'failed' "
                                           "WHERE run_id = %s AND status = 'running'", t="phase_runs"), (run_id,))

    def open_runs(self, conn: Connection, env: str) -> list[dict[str, Any]]:
        """Runs of `env` the ledger still has as 'running' (their runner is live, or it died)."""
        if not self.exists(conn):
            return []
        rows = conn.exec_driver_sql(self._q(conn, "SELECT * FROM {t} WHERE env = %s AND status = 'running' "
                                                  "ORDER BY started_at", t="runs"), (env,)).mappings().all()
        return [dict(r) for r in rows]

    def run_manifests(self, conn: Connection, env: str) -> list[tuple[str, str, str | None]]:
        """(run id, status, manifest sha256) of every run of `env`, oldest first."""
        return [tuple(r) for r in conn.exec_driver_sql(self._q(conn, "SELECT run_id, status, manifest_sha256 FROM {t} "
                                                                     "WHERE env = %s ORDER BY started_at", t="runs"),
                                                       (env,)).all()]

    def reached(self, conn: Connection, run_id: str) -> dict[str, Any]:
        """How far a run got, from its phase runs and statement journal: the phases it finished, the phase and
        statement it was in."""
        phases = conn.exec_driver_sql(self._q(conn, "SELECT phase, status, started_at, finished_at FROM {t} "
                                                    "WHERE run_id = %s ORDER BY id", t="phase_runs"),
                                      (run_id,)).mappings().all()
        open_statements = conn.exec_driver_sql(
            self._q(conn, "SELECT id, phase, table_name, action, statement, lock_mode, started_at, attempts FROM {t} "
                          "WHERE run_id = %s AND outcome = 'running' ORDER BY id", t="statement_journal"),
            (run_id,)).mappings().all()
        return {"phases": [dict(p) for p in phases], "open_statements": [dict(s) for s in open_statements]}

    def close_died_run(self, conn: Connection, run_id: str, status: str, manifest_sha256: str | None) -> None:
        """Mark a run whose runner died, with its open phase runs and journal entries, as `status`."""
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET finished_at = clock_timestamp(), outcome = %s, "
                                           "error = 'the runner died while this statement ran' "
                                           "WHERE run_id = %s AND outcome = 'running'", t="statement_journal"),
                             (status, run_id))
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET finished_at = clock_timestamp(), status = %s "
                                           "WHERE run_id = %s AND status = 'running'", t="phase_runs"),
                             (status, run_id))
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET finished_at = clock_timestamp(), status = %s, "
                                           "manifest_sha256 = %s WHERE run_id = %s AND status = 'running'", t="runs"),
                             (status, manifest_sha256, run_id))

    # -- baseline
    def baseline(self, conn: Connection) -> pd.DataFrame:
        """Per table: count, fingerprint, columns, when, and whether its rows were kept too (`per_row`)."""
        cols = ["table_name", "row_count", "fingerprint", "columns", "captured_at", "run_id", "per_row"]
        if not self.exists(conn):
            return pd.DataFrame(columns=cols)
        rows = conn.exec_driver_sql(self._q(conn, "SELECT table_name, row_count, fingerprint, columns, captured_at, "
                                                  "run_id, per_row FROM {t} ORDER BY table_name", t="baseline")).all()
        return pd.DataFrame(rows, columns=cols)

    def forget_baseline(self, conn: Connection) -> int:
        """Delete the baseline (`runbook baseline reset`), its per-row part too; returns the tables it held."""
        if relation_oid(conn, self.schema, "baseline_rows") is not None:
            conn.exec_driver_sql(self._q(conn, "DELETE FROM {t}", t="baseline_rows"))
        return conn.exec_driver_sql(self._q(conn, "DELETE FROM {t}", t="baseline")).rowcount

    def archive_baseline(self, conn: Connection, phase_run: int, run_id: str | None) -> int:
        """Move the baseline into past_baselines under the rollback that retired it (its phase run and run id), and
        drop its per-row part; the next 01_inspect captures a fresh one. Returns the tables moved. Call it inside
        one transaction: both or neither (the ledger ensured first: one of an older version lacks past_baselines)."""
        moved = conn.exec_driver_sql(self._q(
            conn, "INSERT INTO {past} (phase_run, rollback_run_id, table_name, row_count, fingerprint, columns, "
                  "captured_at, run_id) SELECT %s, %s, table_name, row_count, fingerprint, columns, captured_at, run_id "
                  "FROM {t}", past="past_baselines", t="baseline"), (phase_run, run_id)).rowcount
        self.forget_baseline(conn)
        return moved

    def past_baselines(self, conn: Connection) -> pd.DataFrame:
        cols = ["phase_run", "rollback_run_id", "archived_at", "table_name", "row_count", "fingerprint", "columns",
                "captured_at", "run_id"]
        if relation_oid(conn, self.schema, "past_baselines") is None:
            return pd.DataFrame(columns=cols)
        rows = conn.exec_driver_sql(self._q(conn, "SELECT " + ", ".join(cols) + " FROM {t} ORDER BY archived_at, "
                                                  "table_name", t="past_baselines")).all()
        return pd.DataFrame(rows, columns=cols)

    # -- sizes before backfill: recorded once, at the start of its first run, never overwritten
    def record_sizes(self, conn: Connection, table: str, heap: int, indexes: int, total: int,
                     run_id: str | None) -> bool:
        result = conn.exec_driver_sql(self._q(conn, "INSERT INTO {t} (table_name, heap_bytes, index_bytes, total_bytes, "
                                                    "run_id) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (table_name) DO "
                                                    "NOTHING", t="table_sizes"), (table, heap, indexes, total, run_id))
        return result.rowcount == 1

    def sizes(self, conn: Connection) -> pd.DataFrame:
        cols = ["table_name", "heap_bytes", "index_bytes", "total_bytes", "measured_at", "run_id"]
        if not self.exists(conn) or relation_oid(conn, self.schema, "table_sizes") is None:
            return pd.DataFrame(columns=cols)
        rows = conn.exec_driver_sql(self._q(conn, "SELECT table_name, heap_bytes, index_bytes, total_bytes, measured_at, "
                                                  "run_id FROM {t} ORDER BY table_name", t="table_sizes")).all()
        return pd.DataFrame(rows, columns=cols)

    # -- backfill checkpoints: one row per part (a worker's key range) of a table
    def parts(self, conn: Connection, table: str) -> list[dict[str, Any]]:
        if not self.exists(conn):
            return []
        rows = conn.exec_driver_sql(self._q(conn, "SELECT * FROM {t} WHERE table_name = %s ORDER BY part",
                                            t="backfill_checkpoints"), (table,)).mappings().all()
        return [dict(r) for r in rows]

    def checkpoint(self, conn: Connection, table: str) -> dict[str, Any] | None:
        """A table's checkpoint summed over its parts (None before its first batch)."""
        parts = self.parts(conn, table)
        if not parts:
            return None
        return {
            "table_name": table, "strategy": parts[0]["strategy"], "key_columns": parts[0]["key_columns"],
            "parts": len(parts), "pass": max(p["pass"] for p in parts),
            "rows_total": parts[0]["rows_total"], "rows_updated": sum(p["rows_updated"] for p in parts),
            "batches": sum(p["batches"] for p in parts), "last_keys": [p["last_key"] for p in parts],
            "finished_at": None if any(p["finished_at"] is None for p in parts) else max(p["finished_at"] for p in parts),
        }

    def checkpoints(self, conn: Connection) -> pd.DataFrame:
        if not self.exists(conn):
            return pd.DataFrame()
        return pd.DataFrame(conn.exec_driver_sql(self._q(conn, "SELECT * FROM {t} ORDER BY table_name, part",
                                                         t="backfill_checkpoints")).mappings().all())

    def create_parts(self, conn: Connection, table: str, strategy: str, key_columns: list[str],
                     bounds: list[tuple[list[str] | None, list[str] | None]], rows_total: int, first_pass: int = 1) -> None:
        conn.exec_driver_sql(self._q(conn, "DELETE FROM {t} WHERE table_name = %s", t="backfill_checkpoints"), (table,))
        for part, (lower, upper) in enumerate(bounds):
            conn.exec_driver_sql(self._q(conn, "INSERT INTO {t} (table_name, part, strategy, key_columns, lower_key, "
                                               "upper_key, pass, rows_total) VALUES (%s, %s, %s, %s, %s::jsonb, "
                                               "%s::jsonb, %s, %s)", t="backfill_checkpoints"),
                                 (table, part, strategy, key_columns, json.dumps(lower), json.dumps(upper),
                                  first_pass, rows_total))

    def advance_checkpoint(self, conn: Connection, table: str, part: int, last_key: list[str] | None, rows: int) -> None:
        """Called inside the batch's own transaction, so the checkpoint commits with the rows it describes."""
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET last_key = %s::jsonb, rows_updated = rows_updated + %s, "
                                           "batches = batches + 1, updated_at = clock_timestamp() "
                                           "WHERE table_name = %s AND part = %s", t="backfill_checkpoints"),
                             (json.dumps(last_key), rows, table, part))

    PACE_COLUMNS = ["table_name", "batch", "elapsed_s", "rows_done", "batch_rows", "batch_s", "batch_size", "pace_ms",
                    "canary_p99_ms", "replica_lag_s"]

    def record_pace(self, conn: Connection, run_id: str | None, rows: list[dict]) -> None:
        """The throttle's signal and choice per batch of one table (the progress history), for the archive."""
        if not rows:
            return
        cols = self.PACE_COLUMNS
        statement = self._q(conn, "INSERT INTO {t} (run_id, " + ", ".join(cols) + ") VALUES (%s" + ", %s" * len(cols)
                            + ")", t="backfill_pace")
        conn.exec_driver_sql(statement, [(run_id, *(r.get(c) for c in cols)) for r in rows])

    def pace(self, conn: Connection, run_id: str | None) -> pd.DataFrame:
        """What record_pace stored for one run (None: the interactive sessions')."""
        cols = ["run_id"] + self.PACE_COLUMNS
        if relation_oid(conn, self.schema, "backfill_pace") is None:
            return pd.DataFrame(columns=cols)
        rows = conn.exec_driver_sql(self._q(conn, "SELECT " + ", ".join(cols) + " FROM {t} WHERE run_id IS NOT DISTINCT "
                                                  "FROM %s ORDER BY recorded_at, table_name, batch", t="backfill_pace"),
                                    (run_id,)).all()
        return pd.DataFrame(rows, columns=cols)

    def finish_part(self, conn: Connection, table: str, part: int) -> None:
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET finished_at = clock_timestamp(), updated_at = clock_timestamp() "
                                           "WHERE table_name = %s AND part = %s", t="backfill_checkpoints"), (table, part))

    def next_pass(self, conn: Connection, table: str, rows_total: int) -> None:
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET last_key = NULL, finished_at = NULL, pass = pass + 1, "
                                           "rows_total = rows_total + %s, updated_at = clock_timestamp() "
                                           "WHERE table_name = %s", t="backfill_checkpoints"), (rows_total, table))

    # -- statement journal
    def journal_start(self, conn: Connection, run_id: str | None, phase: str, table: str | None, action: str,
                      statement: str, lock_mode: str) -> int:
        return conn.exec_driver_sql(self._q(conn, "INSERT INTO {t} (run_id, phase, table_name, action, statement, lock_mode) "
                                                  "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id", t="statement_journal"),
                                    (run_id, phase, table, action, statement, lock_mode)).scalar()

    def journal_end(self, conn: Connection, entry: int, outcome: str, attempts: int, error: str | None = None,
                    cleared: str | None = None) -> None:
        """`cleared`: what the ladder did to the table before trying (autovacuum cancelled or waited for, long
        transactions named), so the audit record shows who was interrupted and why the step waited."""
        conn.exec_driver_sql(self._q(conn, "UPDATE {t} SET finished_at = clock_timestamp(), outcome = %s, attempts = %s, "
                                           "error = %s, cleared = %s WHERE id = %s", t="statement_journal"),
                             (outcome, attempts, error, cleared, entry))

    def journal(self, conn: Connection, run_id: str | None = None) -> pd.DataFrame:
        if not self.exists(conn):
            return pd.DataFrame()
        query = "SELECT * FROM {t}" + (" WHERE run_id = %s" if run_id else "") + " ORDER BY id"
        return pd.DataFrame(conn.exec_driver_sql(self._q(conn, query, t="statement_journal"),
                                                 (run_id,) if run_id else ()).mappings().all())

    def runs(self, conn: Connection) -> pd.DataFrame:
        if not self.exists(conn):
            return pd.DataFrame()
        return pd.DataFrame(conn.exec_driver_sql(self._q(conn, "SELECT * FROM {t} ORDER BY started_at",
                                                         t="runs")).mappings().all())
