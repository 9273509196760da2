"""Row count and an order-independent fingerprint of a table's pre-existing columns.

The fingerprint is the sum, as numeric, of each row's hash: the first 64 bits of md5(row text) as a
bigint. It does not depend on physical order, changes when any value of any listed column changes, and
counts duplicates. Row text depends on session settings (time zone, date style, float digits), so they
are pinned here, and the rollout trigger that hashes rows the application writes pins the same ones.
The same row hash and row key serve the live reconciliation (phases/validate.py): a sum over the rows
the application did not write, checked against the one taken when the rollout window opened.
"""

from __future__ import annotations

from psycopg import sql
from sqlalchemy.engine import Engine

from .sqltext import render

PINNED_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}


def _record(record: str | sql.Composable) -> sql.Composable:
    if isinstance(record, sql.Composable):
        return record
    return sql.SQL(record) if record in ("OLD", "NEW") else sql.Identifier(record)


def row_hash(record: str | sql.Composable, columns: list[str]) -> sql.Composed:
    """The 64-bit hash of one row's listed columns; `record` is a table alias (or reference), or a trigger's
    OLD/NEW."""
    row = sql.SQL(", ").join(sql.SQL("{}.{}").format(_record(record), sql.Identifier(c)) for c in columns)
    return sql.SQL("('x' || substr(md5(ROW({})::text), 1, 16))::bit(64)::bigint").format(row)


def row_key(record: str | sql.Composable, key_columns: list[str]) -> sql.Composed:
    """A row's key as the jsonb array of its key columns' text (the form the ledger stores keys in)."""
    parts = sql.SQL(", ").join(sql.SQL("{}.{}::text").format(_record(record), sql.Identifier(c)) for c in key_columns)
    return sql.SQL("json_build_array({})::jsonb").format(parts)


def pin_settings() -> sql.Composed:
    """SET LOCAL of every pinned setting, for a transaction that hashes rows."""
    return sql.SQL("; ").join(sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v))
                              for k, v in PINNED_SETTINGS.items())


def fingerprint_query(schema: str, table: str, columns: list[str]) -> sql.Composed:
    return sql.SQL("SELECT count(*), coalesce(sum({h}::numeric), 0)::text FROM {table} AS t").format(
        h=row_hash("t", columns), table=sql.Identifier(schema, table))


def measure(engine: Engine, schema: str, table: str, columns: list[str]) -> tuple[int, str]:
    """(row count, fingerprint) read in one snapshot with pinned settings; changes nothing."""
    with engine.connect() as conn, conn.begin():
        for name, value in PINNED_SETTINGS.items():
            conn.exec_driver_sql("SELECT set_config(%s, %s, true)", (name, value))
        count, total = conn.exec_driver_sql(render(conn, fingerprint_query(schema, table, columns))).one()
    return int(count), fingerprint_text(count, total)


def fingerprint_text(count, total) -> str:
    return f"{int(count)}:{total}"
