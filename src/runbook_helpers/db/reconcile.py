"""Validate on a live database: every row the application did not write is proven unchanged, and what it
did write is counted and listed, without a quiet window.

Why this mechanism: a count and fingerprint against a baseline taken at inspect only proves anything if
nobody writes in between, which a live system never grants; per-row baselines would cost a copy of every
key. Instead the rollout triggers (tenancy/rollout.py), installed before the runbook touches any row,
record the key of every row the application writes, with the hash of its pre-existing columns as it was
before that first write. When they go in, one statement (tenancy/rollout.capture_statement) hashes every
row and records the snapshot it read in: `rows_untouched`/`digest_untouched` over the rows not yet in
the record. At validate, in one snapshot:

    actual   = count and sum of hashes now, over rows whose key is not in the record
    expected = the capture's untouched count and sum, minus the rows first written after the capture's
               snapshot (entries whose writer that snapshot could not see) with their before-image hashes

A runbook change to any pre-existing column of a row the application never wrote, or a lost row, makes
them differ (and a change to a row the application wrote later still shows, through its before-image).
The runbook writes only tenant_id, which is not hashed, and its own sessions are not recorded. Writes
between inspect's baseline and the opening of the record are the application's by construction (the runbook
touches no core row before the capture): they are listed by key against the per-row baseline
(db/baseline_rows.py), or said plainly why they cannot be.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
from psycopg import sql
from sqlalchemy.engine import Connection, Engine

from . import baseline_rows, catalog
from .fingerprint import fingerprint_text, pin_settings, row_hash, row_key
from .sqltext import render

CHANGES = ("inserted", "updated", "deleted", "inserted, then deleted")
WRITE_COLUMNS = ["table", "window", "key", "change", "first_at", "last_at", "writes"]
RECORDED, BEFORE = "recorded", "before the record opened"


@dataclass
class Reconciled:
    table: str
    started_at: object
    expected_rows: int
    actual_rows: int
    expected_digest: str
    actual_digest: str
    rows_at_start: int
    digest_at_start: str
    changes: dict[str, int]
    before_record: dict | None = None  # baseline_rows.BeforeRecord as a dict (None: closed before it was kept)

    @property
    def passed(self) -> bool:
        return self.expected_rows == self.actual_rows and self.expected_digest == self.actual_digest


def as_record(proof: Reconciled) -> dict:
    out = dict(vars(proof))
    out["started_at"] = str(proof.started_at)
    return out


def closed(conn: Connection, ledger: str, table: str) -> Reconciled | None:
    """The last reconciliation, stored when 06_finalize closed the window (None while it is open)."""
    if catalog.relation_oid(conn, ledger, "capture_end") is None:
        return None
    query = sql.SQL("SELECT reconciled FROM {} WHERE table_name = %s").format(sql.Identifier(ledger, "capture_end"))
    row = conn.exec_driver_sql(render(conn, query), (table,)).first()
    return Reconciled(**row[0]) if row else None


def started(conn: Connection, ledger: str, table: str) -> dict | None:
    if catalog.relation_oid(conn, ledger, "capture_start") is None:
        return None
    query = sql.SQL("SELECT * FROM {} WHERE table_name = %s").format(sql.Identifier(ledger, "capture_start"))
    row = conn.exec_driver_sql(render(conn, query), (table,)).mappings().first()
    return dict(row) if row else None


def key_match(alias: str, key_columns: list[str], key_types: list[str], key_json: sql.Composable) -> sql.Composed:
    """The row of `alias` whose key the jsonb array `key_json` holds, in a form the primary key index serves."""
    return sql.SQL(" AND ").join(sql.SQL("{}.{} = ({} ->> {})::{}").format(
        sql.Identifier(alias), sql.Identifier(c), key_json, sql.Literal(i), sql.SQL(t))
        for i, (c, t) in enumerate(zip(key_columns, key_types)))


def _change_sql(st: catalog.TableState, ledger: str) -> sql.Composed:
    """Each recorded write and whether its row is there now: a LEFT JOIN of the ledger (a local table) with the
    core table on its primary key (one row at most), not a correlated subquery, which Citus cannot plan between a
    local and a distributed table."""
    present = sql.SQL("t.{} IS NOT NULL").format(sql.Identifier(st.pk_columns[0]))
    return sql.SQL(
        "SELECT w.key::text AS key, CASE WHEN w.old_hash IS NULL THEN CASE WHEN {p} THEN 'inserted' "
        "ELSE 'inserted, then deleted' END ELSE CASE WHEN {p} THEN 'updated' ELSE 'deleted' END END AS change, "
        "w.first_at, w.last_at, w.writes FROM {log} AS w LEFT JOIN {t} AS t ON {match} "
        "WHERE w.table_name = %s ORDER BY w.first_at, w.key").format(
        p=present, log=sql.Identifier(ledger, "app_writes"), t=st.qualified,
        match=key_match("t", st.pk_columns, st.pk_types, sql.SQL("w.key")))


def reconcile(engine: Engine, ledger: str, st: catalog.TableState) -> Reconciled | None:
    """The proof for one table (None when its record never opened: no primary key, or before backfill); once
    06_finalize has closed the window, the proof it stored then."""
    with engine.connect() as conn:
        final = closed(conn, ledger, st.name)
    if final is not None:
        return final
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql(render(conn, pin_settings()))
        start = started(conn, ledger, st.name)
        if start is None:
            return None
        log = sql.Identifier(ledger, "app_writes")
        later = conn.exec_driver_sql(render(conn, sql.SQL(
            "SELECT count(*), coalesce(sum(old_hash::numeric), 0) FROM {log} WHERE table_name = %s "
            "AND old_hash IS NOT NULL AND NOT pg_visible_in_snapshot(first_xid, %s::pg_snapshot)").format(log=log)),
            (st.name, start["snapshot"])).one()
        cols = list(start["columns"])
        actual = conn.exec_driver_sql(render(conn, sql.SQL(
            "SELECT count(*), coalesce(sum({h}::numeric), 0) FROM {t} AS t LEFT JOIN {log} AS w "
            "ON w.table_name = %s AND w.key = {key} WHERE w.key IS NULL").format(
            h=row_hash("t", cols), t=st.qualified, log=log, key=row_key("t", list(start["key_columns"])))),
            (st.name,)).one()
        changes = dict.fromkeys(CHANGES, 0)
        for row in conn.exec_driver_sql(render(conn, _change_sql(st, ledger)), (st.name,)).mappings():
            changes[row["change"]] += 1
    expected_rows = int(start["rows_untouched"]) - int(later[0])
    expected_sum = start["digest_untouched"] - later[1]
    return Reconciled(st.name, start["started_at"], expected_rows, int(actual[0]),
                      fingerprint_text(expected_rows, expected_sum), fingerprint_text(actual[0], actual[1]),
                      int(start["rows_all"]), fingerprint_text(start["rows_all"], start["digest_all"]), changes,
                      asdict(_before_record(engine, ledger, st, list(start["columns"]))))


def _before_record(engine: Engine, ledger: str, st: catalog.TableState, columns: list[str]) -> baseline_rows.BeforeRecord:
    with engine.connect() as conn:
        base = conn.exec_driver_sql(render(conn, sql.SQL("SELECT * FROM {} WHERE table_name = %s").format(
            sql.Identifier(ledger, "baseline"))), (st.name,)).mappings().first()
    if base is None:
        return baseline_rows.BeforeRecord(reason=f"no baseline of {st.name} was captured")
    return baseline_rows.before_record(engine, ledger, st, list(base["columns"]), columns, bool(base.get("per_row")))


def writes(engine: Engine, ledger: str, st: catalog.TableState, proof: Reconciled | None = None) -> pd.DataFrame:
    """Every row the application wrote since the record opened: key, what happened to it, when (keys only); with
    the table's `proof`, first the rows it wrote between the baseline and the record's opening (window "before the
    record opened"; keys and changes only, at most baseline_rows.LISTED_KEYS)."""
    early = (proof.before_record or {}).get("keys", []) if proof is not None else []
    rows = [{"table": st.name, "window": BEFORE, **k} for k in early]
    with engine.connect() as conn:
        if catalog.relation_oid(conn, ledger, "app_writes") is not None and st.pk_columns:
            rows += [{"table": st.name, "window": RECORDED, **r} for r in
                     conn.exec_driver_sql(render(conn, _change_sql(st, ledger)), (st.name,)).mappings()]
    return pd.DataFrame(rows, columns=WRITE_COLUMNS)
