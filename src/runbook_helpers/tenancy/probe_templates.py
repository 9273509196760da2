"""A template row of the isolation suite's own making, for a table that has no row to copy.

The suite inserts its probe rows as copies of template rows with fresh keys (isolation.Suite.clone_sql). An empty
table has no row to copy, so its RLS would go unprobed: this module makes a template from the catalog instead, and
the table is probed like any other (in the same rolled-back transaction). A made template holds only the columns
that need a value: NOT NULL columns without a default, and key columns the copies make fresh (a fresh value starts
from the template's). Every other column takes its default or stays NULL. Foreign keys to tenant tables are the
suite's business (they point at the probe tenant's own probe rows, inserted parents first); a NOT NULL foreign key
to any other table points at one of that table's existing rows.

A value of the column's type is taken from a short list (an enum's first label, '{}' for arrays and jsonb, …), each
read back through the type's own input function, so a domain or a typmod refuses what it must. Every CHECK
constraint, and for a partitioned table the bounds of its partitions, is evaluated on the made row as PostgreSQL
deparses it; where it fails, the other values of the list are tried, the constraint's own literals among them.
Where none satisfies it, LookupError names the column and the constraint: the suite reports "cannot run: …".

The expressions evaluated here (CHECK constraints, partition bounds, column defaults, type names) are the catalog's
own text, never params; identifiers are quoted and values bound as everywhere else.
"""

from __future__ import annotations

import itertools
import re
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..db.names import TENANT_COLUMN

# What to try first for a column of each pg_type.typcategory (numeric, string, boolean, date/time, timespan, array,
# user-defined such as jsonb or uuid, network, geometric, range, bit string), then everything else in ANY_TYPE.
EPOCH = "2000-01-01 00:00:00+00"
FIRST_CHOICE = {"N": ["1"], "S": ["probe"], "B": ["true"], "D": [EPOCH, "00:00:00"], "T": ["1 day"], "A": ["{}"],
                "U": ["{}"], "I": ["127.0.0.1"], "G": ["(0,0)"], "R": ["empty"], "V": ["0"]}
ANY_TYPE = ["1", "0", "probe", "{}", "", "true", "false", EPOCH, "00:00:00", "1 day", "127.0.0.1", "(0,0)", "empty",
            str(uuid.UUID("00000000-0000-4000-8000-000000000001"))]
MAX_COMBINATIONS = 512   # value combinations tried at once for one constraint's columns
OMITTED = None           # a column the made row leaves out: its default, or NULL
STRING_LITERAL = re.compile(r"'((?:[^']|'')*)'")
NUMBER_LITERAL = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])")


@dataclass
class Constraint:
    """A condition every made row must meet: a CHECK constraint, or a partitioned table's partition bounds."""
    name: str
    expression: str      # as PostgreSQL deparses it: unqualified column names of the table
    columns: list[str]


CHECKS_SQL = """
SELECT c.conname, pg_get_expr(c.conbin, c.conrelid),
       ARRAY(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)
             ORDER BY a.attnum)::text[]
FROM pg_constraint c WHERE c.conrelid = %s AND c.contype = 'c' ORDER BY c.conname
"""
PARTITIONS_SQL = """
SELECT (SELECT count(*) FROM pg_partition_tree(%(oid)s::oid::regclass) t WHERE t.isleaf),
       (SELECT string_agg(coalesce('(' || pg_get_partition_constraintdef(t.relid) || ')', 'true'), ' OR '
                          ORDER BY t.relid)
          FROM pg_partition_tree(%(oid)s::oid::regclass) t WHERE t.isleaf),
       ARRAY(SELECT DISTINCT a.attname FROM pg_partition_tree(%(oid)s::oid::regclass) t
             JOIN pg_partitioned_table p ON p.partrelid = t.relid CROSS JOIN LATERAL unnest(p.partattrs::int2[]) k(n)
             JOIN pg_attribute a ON a.attrelid = t.relid AND a.attnum = k.n)::text[]
WHERE EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = %(oid)s::oid)
"""
OTHER_PARENTS_SQL = """
SELECT con.conname, pn.nspname, p.relname,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o)::text[],
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o)::text[]
FROM pg_constraint con JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.conrelid = %(oid)s AND con.contype = 'f' AND con.conparentid = 0
  AND NOT (pn.nspname = %(schema)s AND p.relname = ANY(%(tenant_tables)s))
ORDER BY con.conname
"""


def made_template(conn: psycopg.Connection, oid: int, columns: list, schema: str, tenant_tables: list[str]
                  ) -> dict[str, str]:
    """A row for the empty table `oid` (its columns as isolation.Column), every value as text its type reads back.
    Runs as the migration role, before the probe transaction: it reads the catalog and evaluates expressions only,
    in savepoints. Raises LookupError naming the column where no value can be made."""
    constraints = checks(conn, oid) + partition_bounds(conn, oid)
    row: dict[str, str | None] = other_parents(conn, oid, columns, schema, tenant_tables)
    free = [c for c in columns if _is_free(c)]
    for col in free:
        if _wanted(col):
            value = next(iter(values_of(conn, col, [])), None)
            if value is None:
                raise LookupError(f'column "{col.name}" ({col.type}) is NOT NULL without a default, and no value '
                                  "of its type could be made")
            row[col.name] = value
    # only what the row chooses: one on the tenant or a foreign key alone (the runbook's own NOT NULL check on
    # tenant_id, read here as NULL) is the probe's and the parents' to meet, and the insert says if they do not
    chosen = [k for k in constraints if any(c.name in k.columns for c in free)]
    for constraint in chosen:
        row.update(satisfying(conn, constraint, columns, row, [c for c in free if c.name in constraint.columns]))
    broken = [k for k in chosen if holds(conn, k, columns, [row]) == []]
    if broken:
        raise LookupError(f"the values made for {_names(broken[0].columns)} together break {broken[0].name} "
                          f"({broken[0].expression})")
    return {name: value for name, value in row.items() if value is not OMITTED}


def _is_free(col) -> bool:
    """A column the made row chooses: not the tenant (the probe sets it), not a foreign key (its parent decides),
    not one a sequence, identity or uuid generator fills."""
    return col.name != TENANT_COLUMN and not col.in_fk and not col.has_default


def _wanted(col) -> bool:
    """A free column the row must give a value: NOT NULL without a default, or a key the copies make fresh from it."""
    return (not col.nullable and col.default_expr is None) or col.in_unique


def checks(conn: psycopg.Connection, oid: int) -> list[Constraint]:
    return [Constraint(*r) for r in conn.execute(CHECKS_SQL, (oid,)).fetchall()]


def partition_bounds(conn: psycopg.Connection, oid: int) -> list[Constraint]:
    """A partitioned table's row must land in one of its leaf partitions: the OR of their partition constraints (a
    DEFAULT partition's included, so it holds for anything the others refuse; none at all holds for nothing)."""
    found = conn.execute(PARTITIONS_SQL, {"oid": oid}).fetchone()
    if found is None:
        return []
    leaves, expression, keys = found
    return [Constraint("the bounds of its partitions", expression if leaves else "false", list(keys))]


def other_parents(conn: psycopg.Connection, oid: int, columns: list, schema: str, tenant_tables: list[str]
                  ) -> dict[str, str | None]:
    """Values for NOT NULL foreign keys to tables other than the tenant tables (a shared catalogue, the users): one
    existing row's key, read as the migration role. A nullable one stays NULL."""
    nullable = {c.name: c.nullable for c in columns}
    out: dict[str, str | None] = {}
    for name, parent_schema, parent, cols, ref_cols in conn.execute(
            OTHER_PARENTS_SQL, {"oid": oid, "schema": schema, "tenant_tables": tenant_tables}).fetchall():
        pairs = [(c, r) for c, r in zip(cols, ref_cols) if c != TENANT_COLUMN]
        if not pairs or all(nullable[c] for c, _ in pairs):
            continue
        key = conn.execute(sql.SQL("SELECT {} FROM {} LIMIT 1").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(r)) for _, r in pairs),
            sql.Identifier(parent_schema, parent))).fetchone()
        if key is None:
            raise LookupError(f'column "{pairs[0][0]}" is NOT NULL and references {parent} ({name}), which has no '
                              "row to point at")
        out.update({c: v for (c, _), v in zip(pairs, key)})
    return out


def values_of(conn: psycopg.Connection, col, extra: list[str], limit: int = 1) -> list[str]:
    """Up to `limit` values of the column's type, as the type prints them: the category's first choice, the enum's
    labels in order, `extra` (a constraint's literals), then anything the type's input function accepts."""
    tried = FIRST_CHOICE.get(col.category, []) + enum_labels(conn, col.type) + extra + ANY_TYPE
    out: list[str] = []
    for text in dict.fromkeys(tried):
        value = read_back(conn, text, col.type)
        if value is not None and value not in out:
            out.append(value)
            if len(out) == limit:
                break
    return out


def enum_labels(conn: psycopg.Connection, type_name: str) -> list[str]:
    """An enum's labels in their order (the first is the one a made row takes); [] for any other type."""
    return [r[0] for r in conn.execute(
        "SELECT e.enumlabel FROM pg_enum e WHERE e.enumtypid = %s::regtype ORDER BY e.enumsortorder",
        (type_name,)).fetchall()]


def read_back(conn: psycopg.Connection, text: str, type_name: str) -> str | None:
    """The text as the type prints it after reading it (a varchar(n) cut to n, a date without its time), or None where
    the type refuses it; in a savepoint, so a refusal leaves the transaction usable."""
    try:
        with conn.transaction():
            return conn.execute(sql.SQL("SELECT ({}::{})::text").format(
                sql.Literal(text), sql.SQL(type_name))).fetchone()[0]
    except psycopg.Error:
        return None


def literals(expression: str) -> list[str]:
    """The constraint's own literals, and each number's neighbours (a bound may be exclusive): what a CHECK such as
    `kind IN ('bug', 'feature')` or `priority BETWEEN 10 AND 20` is likely to accept."""
    found = [m.replace("''", "'") for m in STRING_LITERAL.findall(expression)]
    for number in NUMBER_LITERAL.findall(expression):
        found += [number] + ([] if "." in number else [str(int(number) + 1), str(int(number) - 1)])
    return found


def satisfying(conn: psycopg.Connection, constraint: Constraint, columns: list, row: dict[str, str | None],
               free: list) -> dict[str, str | None]:
    """The row's values of the constraint's free columns, changed only where the constraint fails: the first
    combination of candidates (the current value first, then leaving it out where allowed, then values of the type)
    that satisfies it. Raises LookupError naming the columns where none does."""
    if not free or holds(conn, constraint, columns, [row]) != []:
        return {}  # holds, could not be evaluated (the insert will say), or nothing here to choose
    extra = literals(constraint.expression)
    per_column = max(2, int(MAX_COMBINATIONS ** (1 / len(free))))
    options = [list(dict.fromkeys([row.get(c.name, OMITTED)] + ([] if _wanted(c) else [OMITTED])
                                  + values_of(conn, c, extra, limit=per_column)))[:per_column] for c in free]
    combos = [dict(zip((c.name for c in free), values)) for values in itertools.product(*options)]
    first = holds(conn, constraint, columns, [{**row, **combo} for combo in combos])
    if not first:
        raise LookupError(f"no value of {_names([c.name for c in free])} ({', '.join(c.type for c in free)}) "
                          f"satisfies {constraint.name} ({constraint.expression})")
    return combos[first[0]]


def holds(conn: psycopg.Connection, constraint: Constraint, columns: list, rows: list[dict[str, str | None]]
          ) -> list[int] | None:
    """The positions of the rows that satisfy the constraint (it is not false: NULL passes a CHECK), in order; None
    where it cannot be evaluated here (it reads a generated column, say): then the insert decides."""
    names = ["probe #"] + [c.name for c in columns]
    values = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join([sql.Literal(i)] + [_value(c, row) for c in columns]))
        for i, row in enumerate(rows))
    query = sql.SQL("SELECT {n} FROM (VALUES {v}) AS probe({cols}) WHERE ({e}) IS NOT FALSE ORDER BY {n}").format(
        n=sql.Identifier("probe #"), v=values, cols=sql.SQL(", ").join(map(sql.Identifier, names)),
        e=sql.SQL(constraint.expression))
    try:
        with conn.transaction():
            return [r[0] for r in conn.execute(query).fetchall()]
    except psycopg.Error:
        return None


def _value(col, row: dict[str, str | None]) -> sql.Composable:
    """The column's value in the made row as the insert will give it: the chosen value, else its default (a
    generator's, which would draw a value, and the tenant's, which the probe sets, read as NULL), else NULL."""
    value: Any = row.get(col.name, OMITTED)
    if value is not OMITTED:
        return sql.SQL("{}::{}").format(sql.Literal(value), sql.SQL(col.type))
    if col.default_expr is not None and not col.has_default and col.name != TENANT_COLUMN:
        return sql.SQL("({})::{}").format(sql.SQL(col.default_expr), sql.SQL(col.type))
    return sql.SQL("NULL::{}").format(sql.SQL(col.type))


def _names(columns: list[str]) -> str:
    quoted = ", ".join(f'"{c}"' for c in columns)
    return ("column " if len(columns) == 1 else "columns ") + quoted
