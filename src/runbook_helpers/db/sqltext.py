"""Turn psycopg.sql compositions into statement text for a SQLAlchemy connection.

Identifiers are always quoted by psycopg (sql.Identifier); values are bound, or, where PostgreSQL takes
no parameters (DDL), quoted by the driver with sql.Literal. Nothing is concatenated by hand.
"""

from __future__ import annotations

from psycopg import sql
from sqlalchemy.engine import Connection


def render(conn: Connection | None, query: sql.Composable) -> str:
    raw = None
    if conn is not None:
        raw = conn.connection.driver_connection
    return query.as_string(raw)
