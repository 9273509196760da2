"""A table's size on disk: heap, indexes and in all (a partitioned table: its partitions summed).

Read with pg_relation_size (the main fork: the rows), pg_indexes_size and pg_total_relation_size (with
TOAST, free space and visibility maps): catalog functions that read no rows and take no lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

SIZES_SQL = text("""
SELECT coalesce(sum(pg_relation_size(t.relid)), 0)::bigint AS heap,
       coalesce(sum(pg_indexes_size(t.relid)), 0)::bigint AS indexes,
       coalesce(sum(pg_total_relation_size(t.relid)), 0)::bigint AS total
FROM (SELECT relid FROM pg_partition_tree(CAST(:oid AS oid)::regclass) UNION SELECT CAST(:oid AS oid)) t
JOIN pg_class c ON c.oid = t.relid
WHERE c.relkind IN ('r', 'p')  -- a plain table is no partition tree: itself
""")


@dataclass
class Sizes:
    heap: int
    indexes: int
    total: int


def measure(conn: Connection, oid: int) -> Sizes:
    """The sizes of the table `oid` and, when it is partitioned, of every partition below it."""
    r = conn.execute(SIZES_SQL, {"oid": oid}).mappings().one()
    return Sizes(int(r["heap"]), int(r["indexes"]), int(r["total"]))


def readable(n: float) -> str:
    """Bytes as a person reads them (B, kB, MB, GB, TB), for inspect's listings."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
