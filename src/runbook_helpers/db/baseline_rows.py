"""The baseline per row: what lets validate list by key the rows the application wrote between 01_inspect's
baseline and the opening of the record of its writes (the rollout triggers, tenancy/rollout.py).

01_inspect stores, for every core table with a primary key, each row's key and the hash of its pre-existing
columns (`baseline_rows`), in the same snapshot as the table's count and fingerprint, which are summed from
those very rows. Validate rebuilds the table as it was when the record opened, row by row: the rows the
application has not written since are as they are now (the live proof, db/reconcile.py, shows them unchanged),
the rows it has written are as their before-image in `app_writes` says (absent, where its first write was an
INSERT). Compared with the per-row baseline, by key, that gives every row inserted, updated or deleted before the
record opened. A table without a primary key has neither record nor per-row baseline: validate compares it with
the baseline's count and fingerprint, which any change fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql
from sqlalchemy.engine import Engine

from . import catalog
from .fingerprint import fingerprint_query, fingerprint_text, pin_settings, row_hash, row_key
from .sqltext import render

CHANGES = ("inserted", "updated", "deleted")
LISTED_KEYS = 10_000  # keys kept per table in the listing (the counts are always complete)


def capture(engine: Engine, ledger: str, st: catalog.TableState, columns: list[str],
            run_id: str | None) -> tuple[int, str, bool]:
    """(rows, fingerprint, stored now) of one table, read in one snapshot; with a primary key its rows' keys and
    hashes are stored too and the fingerprint is summed from them. The baseline row is inserted once: if one is
    there already (captured concurrently), nothing is stored."""
    rows_table = sql.Identifier(ledger, "baseline_rows")
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql(render(conn, pin_settings()))
        if st.pk_columns:
            conn.exec_driver_sql(render(conn, sql.SQL("DELETE FROM {} WHERE table_name = %s").format(rows_table)),
                                 (st.name,))  # left by a capture that was not stored
            conn.exec_driver_sql(render(conn, sql.SQL(
                "INSERT INTO {rows} (table_name, key, row_hash) SELECT %s, {key}, {h} FROM {t} AS t").format(
                rows=rows_table, key=row_key("t", st.pk_columns), h=row_hash("t", columns), t=st.qualified)),
                (st.name,))
            count, total = conn.exec_driver_sql(render(conn, sql.SQL(
                "SELECT count(*), coalesce(sum(row_hash::numeric), 0)::text FROM {} WHERE table_name = %s").format(
                rows_table)), (st.name,)).one()
        else:
            count, total = conn.exec_driver_sql(render(conn, fingerprint_query(st.schema, st.name, columns))).one()
        fp = fingerprint_text(count, total)
        stored = conn.exec_driver_sql(render(conn, sql.SQL(
            "INSERT INTO {} (table_name, row_count, fingerprint, columns, run_id, per_row) VALUES (%s, %s, %s, %s, "
            "%s, %s) ON CONFLICT (table_name) DO NOTHING").format(sql.Identifier(ledger, "baseline"))),
            (st.name, int(count), fp, columns, run_id, bool(st.pk_columns))).rowcount == 1
        if not stored:
            conn.rollback()
    return int(count), fp, stored


@dataclass
class BeforeRecord:
    """What changed between the baseline and the opening of the record, by key; `reason`: why it cannot be
    listed by key (then counts and keys are empty)."""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANGES, 0))
    keys: list[dict] = field(default_factory=list)   # {"key": …, "change": …}, at most LISTED_KEYS
    reason: str | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return ", ".join(f"{n:,} {c}" for c, n in self.counts.items() if n) or "none"


def _listing_sql(ledger: str, st: catalog.TableState, columns: list[str]) -> sql.Composed:
    log, base = sql.Identifier(ledger, "app_writes"), sql.Identifier(ledger, "baseline_rows")
    return sql.SQL(
        "WITH w AS (SELECT key, old_hash FROM {log} WHERE table_name = %(t)s), "
        "r AS (SELECT x.key, x.h FROM (SELECT {key} AS key, {h} AS h FROM {t} AS t) AS x "
        "WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.key = x.key) "
        "UNION ALL SELECT key, old_hash FROM w WHERE old_hash IS NOT NULL), "
        "b AS (SELECT key, row_hash FROM {base} WHERE table_name = %(t)s) "
        "SELECT coalesce(b.key, r.key)::text AS key, CASE WHEN b.key IS NULL THEN 'inserted' WHEN r.key IS NULL "
        "THEN 'deleted' ELSE 'updated' END AS change FROM b FULL JOIN r ON r.key = b.key "
        "WHERE b.key IS NULL OR r.key IS NULL OR b.row_hash <> r.h ORDER BY 2, 1").format(
        log=log, key=row_key("t", st.pk_columns), h=row_hash("t", columns), t=st.qualified, base=base)


def before_record(engine: Engine, ledger: str, st: catalog.TableState, baseline_columns: list[str],
                  record_columns: list[str], per_row: bool) -> BeforeRecord:
    """Every row inserted, updated or deleted between the baseline and the opening of the record, by key (the
    record must be open: call it while the rollout triggers record, i.e. before 06_finalize). `per_row`: the
    baseline kept the table's rows."""
    if not per_row:
        return BeforeRecord(reason=f"the baseline of {st.name} has no per-row record (captured by a version of the "
                                   f"runbook that kept none)")
    if list(baseline_columns) != list(record_columns):
        return BeforeRecord(reason=f"the columns of {st.name} changed between the baseline "
                                   f"({', '.join(baseline_columns)}) and the record ({', '.join(record_columns)})")
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql(render(conn, pin_settings()))
        out = BeforeRecord()
        for row in conn.exec_driver_sql(render(conn, _listing_sql(ledger, st, list(record_columns))),
                                        {"t": st.name}).mappings():
            out.counts[row["change"]] += 1
            if len(out.keys) < LISTED_KEYS:
                out.keys.append({"key": row["key"], "change": row["change"]})
    return out
