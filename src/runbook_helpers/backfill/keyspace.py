"""How batches walk a table: in key order over its key columns (compared as a row, so composite keys work),
or over ranges of heap pages where it has no key. Each space splits the table into parts, finds the upper
bound of the next batch with one index-ordered OFFSET query (keys are never loaded into memory), and
renders one batch's UPDATE for an assignment.
"""

from __future__ import annotations

from psycopg import sql
from sqlalchemy.engine import Connection

from ..db.catalog import TableState
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError
from .assignment import Assignment

COL = sql.Identifier(TENANT_COLUMN)
Key = list[str] | None  # key values as text (cast back with the column types); None = unbounded


class KeysetSpace:
    """Batches in key order over the key columns (compared as a row, so composite keys work)."""

    strategy = "keyset"

    def __init__(self, st: TableState, keys: list[str], key_types: list[str]):
        self.st, self.keys, self.types = st, keys, key_types

    def _row(self, alias: str | None = None) -> sql.Composable:
        cols = [sql.Identifier(alias, k) if alias else sql.Identifier(k) for k in self.keys]
        return sql.SQL("({})").format(sql.SQL(", ").join(cols))

    def _bound(self) -> sql.Composable:
        return sql.SQL("({})").format(sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(t)) for t in self.types))

    def _ordered(self, where: list[sql.Composable]) -> sql.Composed:
        # ORDER BY qualified table columns: an output column `id::text AS id` would sort as text
        clause = sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) + sql.SQL(" ") if where else sql.SQL("")
        return sql.SQL("SELECT {cols} FROM {t} AS t {where}ORDER BY {order} OFFSET %s LIMIT 1").format(
            cols=sql.SQL(", ").join(sql.SQL("t.{}::text AS {}").format(sql.Identifier(k), sql.Identifier(f"k{i}"))
                                    for i, k in enumerate(self.keys)),
            t=self.st.qualified, where=clause,
            order=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in self.keys))

    def split(self, conn: Connection, parts: int, estimated_rows: int) -> list[tuple[Key, Key]]:
        """Bounds of `parts` ranges holding about the same number of keys."""
        bounds: list[Key] = []
        for i in range(1, parts):
            row = conn.exec_driver_sql(render(conn, self._ordered([])), (int(i * estimated_rows / parts),)).first()
            if row is not None and (not bounds or list(row) != bounds[-1]):
                bounds.append(list(row))
        edges = [None, *bounds, None]
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def next_upper(self, conn: Connection, after: Key, limit: Key, size: int) -> tuple[Key, bool]:
        """The last key of the next batch of `size` keys after `after`, capped at `limit`. True when it is the
        part's last batch."""
        where, args = [], []
        if after is not None:
            where.append(sql.SQL("{} > {}").format(self._row("t"), self._bound()))
            args += after
        if limit is not None:
            where.append(sql.SQL("{} <= {}").format(self._row("t"), self._bound()))
            args += limit
        row = conn.exec_driver_sql(render(conn, self._ordered(where)), tuple(args + [size - 1])).first()
        if row is None:
            return limit, True
        return list(row), False

    def update(self, conn: Connection, lower: Key, upper: Key, assign: Assignment) -> tuple[str, list]:
        conds, args = [], []
        if lower is not None:
            conds.append(sql.SQL("{} > {}").format(self._row(), self._bound()))
            args += lower
        if upper is not None:
            conds.append(sql.SQL("{} <= {}").format(self._row(), self._bound()))
            args += upper
        return _update(conn, self.st, conds, assign), args


class CtidSpace:
    """Batches over ranges of heap pages, for tables without a primary key (PostgreSQL 14+ scans a ctid range
    directly; on 13 each batch scans the table)."""

    strategy = "ctid"
    keys: list[str] = []

    def __init__(self, st: TableState):
        self.st = st
        self._rows_per_page: float | None = None

    def pages(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql("SELECT pg_relation_size(%s::oid) / current_setting('block_size')::int",
                                        (self.st.oid,)).scalar())

    def rows_per_page(self, conn: Connection) -> float:
        if self._rows_per_page is None:
            reltuples, relpages = conn.exec_driver_sql("SELECT reltuples, relpages FROM pg_class WHERE oid = %s::oid",
                                                       (self.st.oid,)).one()
            if reltuples > 0 and relpages > 0:
                self._rows_per_page = reltuples / relpages
            else:  # never analyzed: count the rows of the first pages instead
                sample = min(max(self.pages(conn), 1), 10)
                rows = conn.exec_driver_sql(render(conn, sql.SQL("SELECT count(*) FROM {} WHERE ctid < %s::tid").format(
                    self.st.qualified)), (f"({sample},0)",)).scalar()
                self._rows_per_page = max(1.0, rows / sample)
        return self._rows_per_page

    def split(self, conn: Connection, parts: int, estimated_rows: int) -> list[tuple[Key, Key]]:
        pages = self.pages(conn)
        edges: list[Key] = [None]
        for i in range(1, parts):
            edge = str(int(i * pages / parts))
            if edge != (edges[-1] or ["-1"])[0] and int(edge) > 0:
                edges.append([edge])
        edges.append(None)
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def next_upper(self, conn: Connection, after: Key, limit: Key, size: int) -> tuple[Key, bool]:
        start = int(after[0]) if after else 0
        end = start + max(1, int(size / self.rows_per_page(conn)))
        if limit is not None and end >= int(limit[0]):
            return limit, True
        if limit is None and end > self.pages(conn):
            return None, True
        return [str(end)], False

    def update(self, conn: Connection, lower: Key, upper: Key, assign: Assignment) -> tuple[str, list]:
        conds, args = [], []
        if lower is not None:
            conds.append(sql.SQL("ctid >= %s::tid"))
            args.append(f"({int(lower[0])},0)")
        if upper is not None:
            conds.append(sql.SQL("ctid < %s::tid"))
            args.append(f"({int(upper[0])},0)")
        return _update(conn, self.st, conds, assign), args


def _update(conn: Connection, st: TableState, conds: list[sql.Composable], assign: Assignment) -> str:
    """One batch's UPDATE: the key range, then the rows still pending, set to the assignment's value."""
    query = sql.SQL("UPDATE {} SET {} = {} WHERE {}").format(
        assign.target(st), COL, assign.value, sql.SQL(" AND ").join([*conds, assign.pending]))
    return render(conn, query)


def key_types(conn: Connection, st: TableState, keys: list[str]) -> list[str]:
    """The SQL types of the key columns the batches walk (the primary key's are known without a read)."""
    if keys == st.pk_columns:
        return list(st.pk_types)
    types = dict(conn.exec_driver_sql(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s "
        "AND attnum > 0 AND NOT attisdropped", (st.oid,)).all())
    missing = [k for k in keys if k not in types]
    if missing:
        raise RunbookError(f"{st.name}: key column(s) {', '.join(missing)} named in params do not exist; "
                           f"fix core_tables.{st.name}.key")
    return [types[k] for k in keys]


def space_for(conn: Connection, st: TableState, keys: list[str]) -> "KeysetSpace | CtidSpace":
    """Keyset batches over `keys`, or page ranges where there are none."""
    return KeysetSpace(st, keys, key_types(conn, st, keys)) if keys else CtidSpace(st)


def one_batch(conn: Connection, space: "KeysetSpace | CtidSpace", assign: Assignment) -> tuple[str, tuple[str, ...]]:
    """The UPDATE a batch in the middle of the table runs, with its bounds as %s placeholders, and what each
    placeholder holds (the first batch has no lower bound, the last none above)."""
    width = max(len(space.keys), 1)
    statement, _ = space.update(conn, ["0"] * width, ["0"] * width, assign)
    if space.keys:
        held = [f"the previous batch's last {k} (exclusive)" for k in space.keys] + \
               [f"this batch's last {k} (inclusive)" for k in space.keys]
    else:
        held = ["this batch's first heap page, as a ctid (inclusive)", "the page after its last, as a ctid (exclusive)"]
    return statement, tuple(held)
