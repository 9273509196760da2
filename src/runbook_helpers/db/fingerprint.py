"""Row count and an order-independent fingerprint of a table's pre-existing columns.

The fingerprint is the sum, as numeric, of the first 64 bits of md5(row text) over all rows: it does not
depend on physical order, changes when any value of any listed column changes, and counts duplicates.
Row text depends on session settings (time zone, date style, float digits), so they are pinned here.
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


def fingerprint_query(schema: str, table: str, columns: list[str]) -> sql.Composed:
    row = sql.SQL(", ").join(sql.Identifier("t", c) for c in columns)
    return sql.SQL(
        "SELECT count(*), coalesce(sum(('x' || substr(md5(ROW({row})::text), 1, 16))::bit(64)::bigint::numeric), 0)::text "
        "FROM {table} AS t"
    ).format(row=row, table=sql.Identifier(schema, table))


def measure(engine: Engine, schema: str, table: str, columns: list[str]) -> tuple[int, str]:
    """(row count, fingerprint) read in one snapshot with pinned settings; changes nothing."""
    with engine.connect() as conn, conn.begin():
        for name, value in PINNED_SETTINGS.items():
            conn.exec_driver_sql("SELECT set_config(%s, %s, true)", (name, value))
        count, total = conn.exec_driver_sql(render(conn, fingerprint_query(schema, table, columns))).one()
    return int(count), f"{int(count)}:{total}"
