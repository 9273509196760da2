"""The partitions of a declaratively partitioned core table (range, list or hash, sub-partitions and a
DEFAULT partition included), read from the catalog for each decision.

PostgreSQL keeps tenant_id, its NOT NULL and its triggers on the parent and hands them to every partition,
but the long work (VALIDATE scans, index builds, batched updates) must be done partition by partition, so
that each step holds its lock on one partition only. This module says which partitions there are, which
of them hold rows (the leaves), and what each one already has.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from . import catalog
from .catalog import TableState


@dataclass
class Partition:
    state: TableState
    parent: str        # the partitioned table it is a partition of (the core table or an intermediate level)
    level: int         # 1: a partition of the core table; 2: of one of those; ...
    leaf: bool         # holds rows (a plain table); False: partitioned itself (a sub-partitioned level)
    bound: str         # FOR VALUES … or DEFAULT

    @property
    def name(self) -> str:
        return self.state.name


TREE_SQL = text("""
SELECT c.relname AS name, p.relname AS parent, t.level, t.isleaf, pg_get_expr(c.relpartbound, c.oid) AS bound
FROM pg_partition_tree(CAST(:oid AS oid)::regclass) t
JOIN pg_class c ON c.oid = t.relid JOIN pg_class p ON p.oid = t.parentrelid
WHERE t.level > 0 AND c.relkind IN ('r', 'p')
ORDER BY t.level, c.relname
""")


def tree(conn: Connection, st: TableState, tenants_oid: int | None = None) -> list[Partition]:
    """Every partition of a partitioned table, level by level (empty for a plain table). Partitions live in
    the parent's schema (the runbook's spec names one schema)."""
    if not st.exists or not st.partitioned:
        return []
    rows = conn.execute(TREE_SQL, {"oid": st.oid}).mappings().all()
    states = catalog.table_states(conn, st.schema, [r["name"] for r in rows], tenants_oid)
    return [Partition(states[r["name"]], r["parent"], r["level"], r["isleaf"], r["bound"]) for r in rows]


def leaves(parts: list[Partition]) -> list[Partition]:
    return [p for p in parts if p.leaf]


def key_definition(conn: Connection, oid: int) -> str:
    """How the table is partitioned, e.g. RANGE (created_on)."""
    return conn.execute(text("SELECT pg_get_partkeydef(CAST(:oid AS oid))"), {"oid": oid}).scalar() or ""


ATTACHED_SQL = text("""
SELECT ci.relname FROM pg_class pi JOIN pg_namespace n ON n.oid = pi.relnamespace
JOIN pg_inherits inh ON inh.inhparent = pi.oid JOIN pg_class ci ON ci.oid = inh.inhrelid
JOIN pg_index i ON i.indexrelid = ci.oid
WHERE n.nspname = :schema AND pi.relname = :index AND i.indrelid = CAST(:oid AS oid)
""")


def attached_index(conn: Connection, schema: str, parent_index: str, partition: TableState) -> str | None:
    """The index of `partition` attached to `parent_index` (an index of its parent), if any."""
    if partition.oid is None:
        return None
    return conn.execute(ATTACHED_SQL, {"schema": schema, "index": parent_index, "oid": partition.oid}).scalar()


def index_state(conn: Connection, schema: str, name: str) -> bool | None:
    """Whether the index exists and is valid (None: no such index)."""
    return conn.execute(text("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                             "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relname = :n"),
                        {"s": schema, "n": name}).scalar()


def attached_constraint(conn: Connection, parent_oid: int, name: str, partition: TableState) -> str | None:
    """The constraint of `partition` that is the partition's part of the parent's constraint `name`."""
    if partition.oid is None:
        return None
    return conn.execute(text(
        "SELECT c.conname FROM pg_constraint c JOIN pg_constraint p ON p.oid = c.conparentid "
        "WHERE p.conrelid = CAST(:parent AS oid) AND p.conname = :name AND c.conrelid = CAST(:oid AS oid)"),
        {"parent": parent_oid, "name": name, "oid": partition.oid}).scalar()
