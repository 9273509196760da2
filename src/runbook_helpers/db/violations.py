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
               n: int = SAMPLES, join: sql.Composable | None = None) -> sql.Composed:
    """One row: how many rows of `table` (aliased x, with `join` after it) meet `condition`, and the first n as
    'key: shown columns'."""
    order = sql.SQL(", ").join(sql.Identifier("x", c) for c in key) if key else sql.SQL("x.ctid")
    source = sql.SQL("{} AS x").format(table) + (sql.SQL(" ") + join if join is not None else sql.SQL(""))
    return sql.SQL("SELECT (SELECT count(*) FROM {f} WHERE {c}), ARRAY(SELECT {s} FROM {f} WHERE {c} "
                   "ORDER BY {o} LIMIT {n})").format(f=source, c=condition, s=_sample(key, shown), o=order,
                                                     n=sql.Literal(n))


def foreign_key_violations(child: sql.Composable, cols: list[str], parent: sql.Composable, ref_cols: list[str],
                           key: list[str], n: int = SAMPLES) -> sql.Composed:
    """Rows of `child` whose (cols) match no (ref_cols) of `parent` (MATCH SIMPLE: a NULL column matches).

    A LEFT JOIN rather than NOT EXISTS: Citus plans a join with a local or reference table (and, where the key
    includes tenant_id, a colocated one), not a correlated subquery ("direct joins between distributed and local
    tables are not supported")."""
    join = sql.SQL("LEFT JOIN {p} AS p ON {j}").format(p=parent, j=sql.SQL(" AND ").join(
        sql.SQL("p.{} = x.{}").format(sql.Identifier(r), sql.Identifier(c)) for c, r in zip(cols, ref_cols)))
    condition = sql.SQL(" AND ").join(sql.SQL("x.{} IS NOT NULL").format(sql.Identifier(c)) for c in cols) + \
        sql.SQL(" AND p.{} IS NULL").format(sql.Identifier(ref_cols[0]))
    return rows_where(child, key, cols, condition, n, join)
