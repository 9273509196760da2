"""Which rows a failed VALIDATE tripped over: a count and a few keys, read after the failure.

PostgreSQL's own message names the constraint only ("violates foreign key constraint …"); these queries
name the rows, bounded (one count, LIMIT n keys), so the error says what to fix.
"""

from __future__ import annotations

from psycopg import sql

SAMPLES = 5


def _sample(key: list[str], shown: list[str]) -> sql.Composable:
    def values(cols: list[str]) -> sql.Composable:
        return sql.SQL("concat_ws(', ', {})").format(sql.SQL(", ").join(
            sql.SQL("coalesce({}::text, 'NULL')").format(sql.Identifier("x", c)) for c in cols))
    head = sql.SQL("{} || ").format(sql.Literal(f"({', '.join(key)}) = (")) + values(key) + sql.SQL(" || ')'") \
        if key else sql.SQL("'ctid ' || x.ctid::text")
    return head + sql.SQL(" || {} || ").format(sql.Literal(f": {', '.join(shown)} = (")) + values(shown) + \
        sql.SQL(" || ')'")


def rows_where(table: sql.Composable, key: list[str], shown: list[str], condition: sql.Composable,
               n: int = SAMPLES) -> sql.Composed:
    """One row: how many rows of `table` (aliased x) meet `condition`, and the first n as 'key: shown columns'."""
    order = sql.SQL(", ").join(sql.Identifier("x", c) for c in key) if key else sql.SQL("x.ctid")
    return sql.SQL("SELECT (SELECT count(*) FROM {t} AS x WHERE {c}), ARRAY(SELECT {s} FROM {t} AS x WHERE {c} "
                   "ORDER BY {o} LIMIT {n})").format(t=table, c=condition, s=_sample(key, shown), o=order,
                                                     n=sql.Literal(n))


def foreign_key_violations(child: sql.Composable, cols: list[str], parent: sql.Composable, ref_cols: list[str],
                           key: list[str], n: int = SAMPLES) -> sql.Composed:
    """Rows of `child` whose (cols) match no (ref_cols) of `parent` (MATCH SIMPLE: a NULL column matches)."""
    condition = sql.SQL(" AND ").join(sql.SQL("x.{} IS NOT NULL").format(sql.Identifier(c)) for c in cols) + \
        sql.SQL(" AND NOT EXISTS (SELECT 1 FROM {p} AS p WHERE {j})").format(p=parent, j=sql.SQL(" AND ").join(
            sql.SQL("p.{} = x.{}").format(sql.Identifier(r), sql.Identifier(c)) for c, r in zip(cols, ref_cols)))
    return rows_where(child, key, cols, condition, n)
