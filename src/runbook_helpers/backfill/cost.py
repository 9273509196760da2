"""What a backfill will cost before it runs: rows to rewrite, WAL, time, table growth, checkpoints forced.

The model, per table whose rows the batches rewrite (a fast default rewrites nothing: metadata only):

- **rows**: exact, from the counts the backfill plan makes anyway (NULL tenant_id, rows still to map).
- **tuple size** of the new row versions: the columns' average stored width from pg_stats (Σ avg_width ×
  (1 − null_frac)) plus the 24-byte tuple header, 8 bytes for the bigint tenant_id a rewritten row stores
  and 4 for its line pointer; without statistics (never analyzed), pg_relation_size / reltuples.
- **HOT**: an update stays on its page (no index entries, no growth) only while no index covers tenant_id
  and the page has room: the room per page is what fillfactor keeps free (100 − fillfactor %); free space
  left by deletes is not known without pgstattuple and is counted as none (so HOT comes out low, WAL and
  growth high). The share of HOT updates is that room over the space the page's rewritten rows need.
- **WAL records**: per rewritten row one heap update record (about 70 bytes of headers plus the new tuple's
  data; a HOT update logs only the changed bytes, about 80 bytes in all), for a row that moves to another
  page two lock records of its old version (108 bytes), and per index one insert record (about 45 bytes
  plus the index entry) for every non-HOT update; btree page splits log about a third of what an index grows.
- **full-page images**: the first change of a page after a checkpoint logs the whole page (block_size; no
  compression assumed, so wal_compression makes the estimate high). The batches walk the key order, so the
  heap (when its physical order follows the key: pg_stats.correlation ≥ 0.9) and every index led by the key
  or by a column in the same order are touched in one short window each: one image per page touched.
  Indexes in another order (a uuid, an org id) take entries all over, all run long: one image per page
  touched in each checkpoint cycle, so their share grows with the checkpoints the backfill forces.
  Pages the table grows by start empty: no image.
- **checkpoints**: PostgreSQL starts one each time max_wal_size / (1 + checkpoint_completion_target) of WAL
  is written, and at least every checkpoint_timeout; a WAL-forced one less than checkpoint_warning after the
  last logs "checkpoints are occurring too frequently".
- **time**: rows / rate, the rate measured on the target where the ledger holds the runbook's own earlier
  batches on this database, else bench B2's rate (the batched backfill of a 5M-row table with the params'
  defaults on 2 cores) scaled by the WAL records per row (a row's work grows with its width and its indexes;
  full-page images are left out, they are written whatever the rate).
  Not a dry UPDATE of one batch rolled back: most plans are shown before tenant_id exists (nothing to
  update yet), a dry run must change nothing, and even a rolled-back UPDATE leaves dead row versions and
  WAL on the application's table and holds its row locks; the estimate says which rate it used.
- **growth**: the heap grows by the non-HOT row versions (pages filled to fillfactor), each index by one
  entry per non-HOT update. VACUUM afterwards makes the dead versions' space reusable, but does not give it
  back to the file system (the table stays the larger size; later writes fill it).

Not modelled: the VACUUMs beside the batches (backfill.vacuum_every_share) and after them, wal_level = logical
(old key logged), wal_compression, hint-bit images of pages a read
touches first after a checkpoint (data checksums or wal_log_hints), btree bottom-up deletion. The hint-bit
images vary with where the checkpoints fall: on the 150k-row backfill below, with 2, 3 and 4 checkpoints
forced inside it, 15.7, 2.5 and 40.6 MB (XLOG/FPI_FOR_HINT); without one, a few pages.
Checked against the measured WAL of a real backfill of 150k rows (tests/test_cost.py): within 0.8x to 1.25x of
the table's own WAL records (pg_waldump; hint-bit images apart), evaluated with the checkpoints that fell
inside the run (other work starts them too), 0.5x to 2x of the server's (pg_current_wal_lsn; other databases
write too). Measured there: estimated 107.4 MB, the table's records 105.6 MB, the server's 107.7 MB; with 4
checkpoints inside, 128.8 MB estimated, 117.5 MB of records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..db.catalog import TableState
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render

TUPLE_HEADER = 24      # HeapTupleHeaderData (23) MAXALIGNed
LINE_POINTER = 4
PAGE_HEADER = 24
TENANT_BYTES = 8       # the bigint a rewritten row stores (a fast default's value lives in the catalog)
UPDATE_RECORD = 70     # XLogRecord + two block references + xl_heap_update + xl_heap_header, aligned
HOT_RECORD = 80        # the same on one page, the tuple logged as its changed bytes only
INDEX_RECORD = 45      # XLogRecord + block reference + xl_btree_insert, per index entry (plus the entry)
LOCK_RECORDS = 108     # a row moved to another page: its old version is locked first, logged as two 54-byte
                       # records (measured with pg_waldump on PostgreSQL 18)
SPLIT_SHARE = 1 / 3    # btree page splits log about a third of the bytes the index grows by (measured)
IN_ORDER = 0.9         # |pg_stats.correlation| from which a column's order is the table's physical order

# bench B2 (docs/BENCHMARKS.md): the batched backfill of 5M workflows rows with the params' defaults on
# 2 cores, 18,894 rows/s; B2_RECORD_BYTES_PER_ROW is this model's WAL per row for that table without the
# full-page images (2,444 bytes per row with them, 21 checkpoints forced), from the demo's workflows scaled
# to 5M rows.
B2_ROWS_PER_S = 18_894
B2_RECORD_BYTES_PER_ROW = 623


@dataclass
class Server:
    block_size: int
    max_wal_size: int            # bytes
    checkpoint_completion_target: float
    checkpoint_timeout_s: int
    checkpoint_warning_s: int
    full_page_writes: bool
    wal_compression: str

    @property
    def wal_per_checkpoint(self) -> float:
        """The WAL between two checkpoints PostgreSQL starts on WAL volume (CheckPointSegments)."""
        return self.max_wal_size / (1.0 + self.checkpoint_completion_target)


SERVER_SQL = text("""
SELECT current_setting('block_size')::int AS block_size,
       pg_size_bytes(current_setting('max_wal_size')) AS max_wal_size,
       current_setting('checkpoint_completion_target')::float8 AS cct,
       extract(epoch FROM current_setting('checkpoint_timeout')::interval)::int AS timeout_s,
       extract(epoch FROM current_setting('checkpoint_warning')::interval)::int AS warning_s,
       current_setting('full_page_writes') = 'on' AS fpw, current_setting('wal_compression') AS compression
""")


def server(conn: Connection) -> Server:
    r = conn.execute(SERVER_SQL).mappings().one()
    return Server(r["block_size"], int(r["max_wal_size"]), r["cct"], r["timeout_s"], r["warning_s"], r["fpw"],
                  r["compression"])


@dataclass
class Index:
    name: str
    bytes: int
    in_order: bool        # takes entries in the backfill's key order
    covers_tenant: bool


@dataclass
class Shape:
    """One relation the batches update (a table, or a leaf partition)."""
    name: str
    heap_bytes: int
    live_rows: float
    fillfactor: int
    tuple_bytes: float    # a new row version, with its line pointer
    width_from: str       # pg_stats | pg_relation_size / reltuples
    heap_in_order: bool
    indexes: list[Index] = field(default_factory=list)


HEAP_SQL = text("""
SELECT pg_relation_size(c.oid) AS heap_bytes, c.reltuples,
       coalesce((SELECT o.option_value::int FROM pg_options_to_table(c.reloptions) o
                 WHERE o.option_name = 'fillfactor'), 100) AS fillfactor
FROM pg_class c WHERE c.oid = CAST(:oid AS oid)
""")

WIDTH_SQL = text("""
SELECT count(*) AS with_stats, coalesce(sum(s.avg_width * (1 - s.null_frac)), 0) AS width
FROM pg_stats s WHERE s.schemaname = :schema AND s.tablename = :name AND NOT s.inherited AND s.attname <> :tenant
""")

CORRELATION_SQL = text("""
SELECT s.correlation FROM pg_stats s
WHERE s.schemaname = :schema AND s.tablename = :name AND s.attname = :column AND NOT s.inherited
""")

INDEXES_SQL = text("""
SELECT ic.relname AS name, pg_relation_size(i.indexrelid) AS bytes,
       (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0]) AS first_column,
       EXISTS (SELECT 1 FROM unnest(i.indkey) k(attnum) JOIN pg_attribute a ON a.attrelid = i.indrelid
               AND a.attnum = k.attnum WHERE a.attname = :tenant) AS covers_tenant,
       i.indexprs IS NOT NULL OR i.indpred IS NOT NULL AS expression
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = CAST(:oid AS oid) AND i.indisready
ORDER BY ic.relname
""")


def _correlation(conn: Connection, st: TableState, column: str | None) -> float | None:
    if column is None:
        return None
    value = conn.execute(CORRELATION_SQL, {"schema": st.schema, "name": st.name, "column": column}).scalar()
    return None if value is None else float(value)


def shape(conn: Connection, st: TableState, key: list[str], block_size: int) -> Shape:
    """What the model needs of one relation, from the catalog and pg_stats (reads only)."""
    heap = conn.execute(HEAP_SQL, {"oid": st.oid}).mappings().one()
    live = max(float(heap["reltuples"]), 0.0)
    pages = heap["heap_bytes"] / block_size
    others = [c for c in st.columns if c != TENANT_COLUMN]
    width = conn.execute(WIDTH_SQL, {"schema": st.schema, "name": st.name, "tenant": TENANT_COLUMN}).mappings().one()
    if others and width["with_stats"] >= len(others):
        tuple_bytes, source = TUPLE_HEADER + float(width["width"]) + TENANT_BYTES + LINE_POINTER, "pg_stats"
    elif live > 0:
        tuple_bytes = (heap["heap_bytes"] - pages * PAGE_HEADER) / live + TENANT_BYTES
        source = "pg_relation_size / reltuples"
    else:  # never analyzed and empty: the smallest row a table can have
        tuple_bytes, source = TUPLE_HEADER + TENANT_BYTES + LINE_POINTER, "no statistics"
    first = key[0] if key else None
    key_corr = _correlation(conn, st, first)
    heap_in_order = first is None or (key_corr is not None and abs(key_corr) >= IN_ORDER)
    indexes = []
    for r in conn.execute(INDEXES_SQL, {"oid": st.oid, "tenant": TENANT_COLUMN}).mappings():
        corr = None if r["expression"] else _correlation(conn, st, r["first_column"])
        in_order = (first is not None and r["first_column"] == first and not r["expression"]) or (
            heap_in_order and corr is not None and abs(corr) >= IN_ORDER)
        indexes.append(Index(r["name"], int(r["bytes"]), in_order, bool(r["covers_tenant"])))
    return Shape(st.name, int(heap["heap_bytes"]), live, int(heap["fillfactor"]), tuple_bytes, source,
                 heap_in_order, indexes)


@dataclass
class Cost:
    rows: int
    hot_share: float
    wal_bytes: float
    fpi_bytes: float
    heap_growth: float
    index_growth: float
    width_from: str

    def __add__(self, other: "Cost") -> "Cost":
        rows = self.rows + other.rows
        hot = (self.hot_share * self.rows + other.hot_share * other.rows) / rows if rows else 0.0
        sources = " / ".join(dict.fromkeys(s for s in (self.width_from, other.width_from) if s))
        return Cost(rows, hot, self.wal_bytes + other.wal_bytes, self.fpi_bytes + other.fpi_bytes,
                    self.heap_growth + other.heap_growth, self.index_growth + other.index_growth, sources)


NOTHING = Cost(0, 0.0, 0.0, 0.0, 0.0, 0.0, "")


def _touched(pages: float, changes: float) -> float:
    """Distinct pages hit by `changes` changes spread over `pages` pages."""
    if pages <= 0 or changes <= 0:
        return 0.0
    return pages * (1.0 - math.exp(-changes / pages))


def estimate(s: Shape, rows: int, srv: Server, cycles: float = 1.0) -> Cost:
    """The cost of rewriting `rows` rows of `s`, with `cycles` checkpoint cycles over the run (1: none
    forced; see checkpoints())."""
    if rows <= 0:
        return NOTHING
    bs = srv.block_size
    pages = max(1.0, s.heap_bytes / bs)
    live = max(s.live_rows, float(rows))
    room = bs * (100 - s.fillfactor) / 100.0  # per page: what fillfactor keeps free for updates
    per_page = rows / pages
    hot_possible = not any(ix.covers_tenant for ix in s.indexes)
    hot_share = min(1.0, room / (s.tuple_bytes * per_page)) if hot_possible else 0.0
    moved = rows * (1.0 - hot_share)
    data = s.tuple_bytes - LINE_POINTER - TUPLE_HEADER
    wal = moved * (UPDATE_RECORD + LOCK_RECORDS + data) + rows * hot_share * HOT_RECORD
    usable = bs * s.fillfactor / 100.0 - PAGE_HEADER
    heap_growth = math.ceil(moved * s.tuple_bytes / usable) * bs if moved else 0.0
    fpi_pages = (_touched(pages, rows) if s.heap_in_order else cycles * _touched(pages, rows / cycles))
    index_growth = 0.0
    for ix in s.indexes:
        entry = ix.bytes / live if live else 16.0
        wal += moved * (INDEX_RECORD + entry)
        grown = moved * entry
        index_growth += grown
        wal += grown * SPLIT_SHARE
        ix_pages = max(1.0, ix.bytes / bs)
        fpi_pages += _touched(ix_pages, moved) if ix.in_order else cycles * _touched(ix_pages, moved / cycles)
    fpi = fpi_pages * bs if srv.full_page_writes else 0.0
    return Cost(rows, hot_share, wal + fpi, fpi, heap_growth, index_growth, s.width_from)


def checkpoints(wal_bytes: float, seconds: float | None, srv: Server) -> int:
    """Checkpoints the backfill's WAL (and its duration) will start."""
    by_wal = int(wal_bytes // srv.wal_per_checkpoint)
    by_time = int(seconds // srv.checkpoint_timeout_s) if seconds and srv.checkpoint_timeout_s else 0
    return max(by_wal, by_time)


def estimate_run(shapes: list[tuple[Shape, int]], srv: Server, rate: "Rate",
                 checkpoints_seen: int | None = None) -> tuple[list[Cost], int]:
    """Every table's cost with the checkpoints the whole run forces (pages of indexes out of key order take
    one image per checkpoint cycle, so the count and the WAL are solved together: a few rounds settle it).
    `checkpoints_seen`, when known (checkpoints other work starts meanwhile count too), replaces the solved count."""
    if checkpoints_seen is not None:
        return [estimate(s, rows, srv, checkpoints_seen + 1.0) for s, rows in shapes], checkpoints_seen
    cycles = 1.0
    for _ in range(4):
        costs = [estimate(s, rows, srv, cycles) for s, rows in shapes]
        total = sum(c.wal_bytes for c in costs)
        forced = checkpoints(total, sum(rate.seconds(c) for c in costs), srv)
        if forced + 1 == cycles:
            break
        cycles = forced + 1.0
    return costs, forced


@dataclass
class Rate:
    rows_per_s: float
    record_bytes_per_row: float | None   # the WAL records per row it was measured at (None: rows/s as it is)
    source: str

    def seconds(self, c: Cost) -> float:
        if not c.rows:
            return 0.0
        if self.record_bytes_per_row:  # the same record bytes per second at another row width
            return (c.wal_bytes - c.fpi_bytes) / (self.rows_per_s * self.record_bytes_per_row)
        return c.rows / self.rows_per_s


MEASURED_SQL = """
SELECT sum(rows_updated) AS rows, sum(extract(epoch FROM updated_at - started_at)) AS seconds
FROM {t} WHERE rows_updated > 0 AND updated_at > started_at
"""


def rate(conn: Connection, ledger_table, min_rows: int = 10_000) -> Rate:
    """The backfill's rate on this database: its own batches so far (the ledger's checkpoints), else B2's."""
    if ledger_table is not None:
        r = conn.exec_driver_sql(render(conn, sql.SQL(MEASURED_SQL).format(t=ledger_table))).mappings().one()
        if r["rows"] and r["rows"] >= min_rows and r["seconds"]:
            per_s = float(r["rows"]) / float(r["seconds"])
            return Rate(per_s, None, f"measured here: {int(r['rows']):,} rows of earlier batches at {per_s:,.0f} rows/s")
    return Rate(B2_ROWS_PER_S, B2_RECORD_BYTES_PER_ROW,
                f"bench B2's rate (2 cores, not measured here): {B2_ROWS_PER_S:,} rows/s at {B2_RECORD_BYTES_PER_ROW} "
                f"bytes of WAL records per row, scaled by this table's")
