"""What Citus asks of the end state before it distributes the tenant tables by tenant_id, read from the catalog
of plain PostgreSQL, and whether the server is a Citus coordinator.

The facts (issue 18, seen on Citus 13 with PostgreSQL 15, coordinator and two workers), which distribution
readiness reports and 07_distribute follows:
- every PRIMARY KEY and UNIQUE key of a distributed table must include the distribution column ("Distributed
  relations cannot have UNIQUE … constraints that do not include the partition column"): a composite key beside
  one without tenant_id does not make the table distributable;
- a table with triggers is refused ("cannot distribute relation … because it has triggers") unless
  citus.enable_unsafe_triggers;
- create_reference_table('tenants') turns every table connected to it by a foreign key into a Citus local table,
  after which colocate_with is refused: the foreign keys between tenant tables, to tenants and among the
  reference tables are dropped first and re-added NOT VALID, then VALIDATE, once every table is distributed;
- a table outside the spec that a tenant table references must become a reference table (a distributed table
  may reference only colocated distributed tables and reference tables);
- (issue 26) a foreign key whose columns hold the distribution column is refused with ON UPDATE CASCADE, SET NULL or
  SET DEFAULT; a partitioned table whose partitions are partitioned is refused ("distributing multi-level
  partitioned tables is not supported"), one level is distributed with its partitions; Citus opens its connections
  to the workers as the current user, so a NOLOGIN role's queries of distributed tables fail (roles reach the
  workers as dependencies of the distributed objects, with their attributes: ALTER ROLE … LOGIN on the coordinator
  first); create_reference_table takes every table connected to the new reference table by foreign keys, however
  indirectly, into the metadata as a Citus local table (autoconverted);
- an ALTER TABLE with ADD CONSTRAINT and other subcommands in one statement is refused ("cannot execute ADD
  CONSTRAINT command with other subcommands"); separate statements in one transaction are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..db.names import TENANT_COLUMN
from ..tenancy import rollout

SEED_TABLES = ("tenants", "users", "user_tenants")  # seed's tables: every tenant's rows, replicated


@dataclass(frozen=True)
class Server:
    citus_version: str | None
    coordinator: bool

    @property
    def refusal(self) -> str | None:
        """Why 07_distribute may not change this server, or None on a Citus coordinator."""
        if self.citus_version is None:
            return ("this server has no citus extension (SELECT extversion FROM pg_extension WHERE extname = "
                    "'citus' returns no row): 07_distribute distributes tables with Citus and runs only on a Citus "
                    "coordinator. Nothing was changed.")
        if not self.coordinator:
            return (f"this server runs Citus {self.citus_version} but is not the coordinator (citus_is_coordinator() "
                    f"is false): run 07_distribute against the coordinator. Nothing was changed.")
        return None


def server(conn: Connection) -> Server:
    version = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'citus'")).scalar()
    coordinator = False
    if version is not None:
        coordinator = bool(conn.execute(text(
            "SELECT CASE WHEN to_regproc('pg_catalog.citus_is_coordinator') IS NOT NULL "
            "THEN citus_is_coordinator() ELSE EXISTS (SELECT 1 FROM pg_dist_node WHERE groupid = 0) END")).scalar())
    return Server(version, coordinator)


@dataclass
class UniqueKey:
    """A primary key, unique constraint or unique index of a tenant table without tenant_id in it."""
    table: str
    name: str             # the constraint's name (the index's, for a unique index)
    kind: str             # primary key | unique constraint | unique index
    columns: list[str]
    partitioned: bool
    referenced_by: list[tuple[str, str]] = field(default_factory=list)  # (child table, foreign key) on its index
    definition: str = ""  # pg_get_constraintdef / pg_get_indexdef

    @property
    def tenant_columns(self) -> list[str]:
        return [TENANT_COLUMN] + self.columns


KEYS_SQL = text("""
SELECT c.relname AS table, coalesce(con.conname, ic.relname) AS name,
       CASE con.contype WHEN 'p' THEN 'primary key' WHEN 'u' THEN 'unique constraint' ELSE 'unique index' END AS kind,
       (SELECT array_agg(coalesce(a.attname, '(expression)') ORDER BY k.ord)
          FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
          LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) AS columns,
       c.relkind = 'p' AS partitioned,
       coalesce((SELECT array_agg(fc.relname || '.' || fk.conname ORDER BY fc.relname, fk.conname)
          FROM pg_constraint fk JOIN pg_class fc ON fc.oid = fk.conrelid
         WHERE fk.contype = 'f' AND fk.conindid = i.indexrelid AND fk.conparentid = 0), '{}') AS referenced_by,
       CASE WHEN con.oid IS NOT NULL THEN pg_get_constraintdef(con.oid) ELSE pg_get_indexdef(i.indexrelid) END
         AS definition
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class ic ON ic.oid = i.indexrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u')
WHERE n.nspname = :schema AND c.relname = ANY(:tables) AND i.indisunique AND NOT c.relispartition
  AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) k(attnum) JOIN pg_attribute a
                   ON a.attrelid = i.indrelid AND a.attnum = k.attnum WHERE a.attname = :col)
ORDER BY 1, (con.contype = 'p') DESC, 2
""")


def keys_without_tenant(conn: Connection, schema: str, tables: list[str]) -> list[UniqueKey]:
    """Every primary key, unique constraint and unique index of the tenant tables that lacks tenant_id: Citus
    refuses to distribute the table while one is there."""
    return [UniqueKey(r["table"], r["name"], r["kind"], list(r["columns"]), r["partitioned"],
                      [tuple(x.split(".", 1)) for x in r["referenced_by"]], r["definition"])
            for r in conn.execute(KEYS_SQL, {"schema": schema, "tables": tables, "col": TENANT_COLUMN}).mappings()]


@dataclass(frozen=True)
class Trigger:
    table: str
    name: str
    definition: str

    @property
    def rollout(self) -> bool:
        """One of the runbook's rollout triggers (06_finalize removes them)."""
        return self.name in (rollout.ASSIGN, rollout.CHILDREN, rollout.RECORD)


TRIGGERS_SQL = text("""
SELECT c.relname AS table, t.tgname AS name, pg_get_triggerdef(t.oid) AS definition
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :schema AND c.relname = ANY(:tables) AND NOT t.tgisinternal AND t.tgparentid = 0
ORDER BY 1, 2
""")


def triggers(conn: Connection, schema: str, tables: list[str]) -> list[Trigger]:
    """The user triggers on the tables (not the internal ones of foreign keys)."""
    return [Trigger(r["table"], r["name"], r["definition"])
            for r in conn.execute(TRIGGERS_SQL, {"schema": schema, "tables": tables}).mappings()]


@dataclass(frozen=True)
class Reference:
    """A foreign key, with its definition as PostgreSQL prints it (what is re-added after distribution)."""
    child: str
    name: str
    parent: str
    columns: list[str]
    definition: str
    validated: bool

    @property
    def key(self) -> str:
        return f"{self.child}.{self.name}"


REFERENCES_SQL = text("""
SELECT c.relname AS child, con.conname AS name, p.relname AS parent, con.convalidated AS validated,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS columns,
       pg_get_constraintdef(con.oid) AS definition, pn.nspname AS parent_schema
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND n.nspname = :schema AND c.relname = ANY(:tables)
ORDER BY 1, 2
""")


def references_from(conn: Connection, schema: str, tables: list[str]) -> list[Reference]:
    """Every foreign key whose child is one of `tables` (partitions' inherited copies left out)."""
    return [Reference(r["child"], r["name"], r["parent"] if r["parent_schema"] == schema else
                      f"{r['parent_schema']}.{r['parent']}", list(r["columns"]), r["definition"], r["validated"])
            for r in conn.execute(REFERENCES_SQL, {"schema": schema, "tables": tables}).mappings()]


REFERENCED_BY_SQL = text("""
SELECT c.relname AS child, con.conname AS name, p.relname AS parent
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace n ON n.oid = p.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND n.nspname = :schema AND p.relname = ANY(:tables)
  AND NOT (cn.nspname = :schema AND c.relname = ANY(:inside)) AND NOT c.relispartition
ORDER BY 1, 2
""")


def referenced_from_outside(conn: Connection, schema: str, tables: list[str], inside: list[str]) -> list[tuple]:
    """(child, foreign key, parent) for every foreign key from a table outside `inside` into one of `tables`."""
    return [(r["child"], r["name"], r["parent"]) for r in conn.execute(
        REFERENCED_BY_SQL, {"schema": schema, "tables": tables, "inside": inside}).mappings()]


def existing(conn: Connection, schema: str, tables) -> list[str]:
    return list(conn.execute(text("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                  "WHERE n.nspname = :s AND c.relname = ANY(:t) AND c.relkind IN ('r', 'p') "
                                  "ORDER BY array_position(:t, c.relname::text)"),
                             {"s": schema, "t": list(tables)}).scalars())


def reference_tables(conn: Connection, schema: str, p) -> list[str]:
    """What becomes a reference table (replicated to every node): seed's tenants, users and user_tenants, the
    shared tables, and the tables outside the spec that params name (distribution.reference_tables)."""
    wanted = list(dict.fromkeys([*SEED_TABLES, *p.shared_tables, *p.distribution.reference_tables]))
    return existing(conn, schema, [t for t in wanted if t not in p.tables])


def citus_tables(conn: Connection, schema: str) -> dict[str, str]:
    """Tables Citus already manages: name -> distributed | reference | local (empty without Citus)."""
    if conn.execute(text("SELECT to_regclass('pg_catalog.pg_dist_partition')")).scalar() is None:
        return {}
    rows = conn.execute(text(
        "SELECT c.relname, CASE WHEN d.partmethod = 'h' THEN 'distributed' WHEN d.repmodel = 't' THEN 'reference' "
        "ELSE 'local' END FROM pg_dist_partition d JOIN pg_class c ON c.oid = d.logicalrelid JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = :s"), {"s": schema}).all()
    return dict(rows)


def subcommands(statement: str) -> list[str]:
    """The subcommands of one ALTER TABLE statement (split at the commas outside parentheses and quotes)."""
    body = statement.strip().rstrip(";")
    out, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(body):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(body[start:i].strip())
            start = i + 1
    out.append(body[start:].strip())
    return out


def statements(script: str) -> list[str]:
    """The statements of a script (split at the semicolons outside quotes and dollar quotes)."""
    out, quote, start, i = [], None, 0, 0
    while i < len(script):
        ch = script[i]
        if quote:
            if script.startswith(quote, i):
                i += len(quote) - 1
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "$" and script.find("$", i + 1) > i:
            tag = script[i:script.find("$", i + 1) + 1]
            if tag[1:-1].isidentifier() or tag == "$$":
                quote = tag
                i += len(tag) - 1
        elif ch == ";":
            out.append(script[start:i].strip())
            start = i + 1
        i += 1
    out.append(script[start:].strip())
    return [s for s in out if s]


def refused_shape(statement: str) -> str | None:
    """Why Citus refuses this statement's shape, or None: an ALTER TABLE whose ADD CONSTRAINT shares the statement
    with other subcommands ("cannot execute ADD CONSTRAINT command with other subcommands")."""
    for one in statements(statement):
        if not one.upper().startswith("ALTER TABLE"):
            continue
        parts = subcommands(one)
        if len(parts) > 1 and any("ADD CONSTRAINT" in part.upper() for part in parts):
            return ("ADD CONSTRAINT with other subcommands in one ALTER TABLE: Citus refuses it; make each its own "
                    "statement in one transaction")
    return None


MULTI_LEVEL_SQL = text("""
SELECT p.relname AS table, array_agg(c.relname::text ORDER BY c.relname) AS partitioned_partitions
FROM pg_class p JOIN pg_namespace n ON n.oid = p.relnamespace
JOIN pg_inherits i ON i.inhparent = p.oid JOIN pg_class c ON c.oid = i.inhrelid
WHERE n.nspname = :schema AND p.relname = ANY(:tables) AND p.relkind = 'p' AND c.relkind = 'p'
GROUP BY p.relname ORDER BY 1
""")


def multi_level_partitioned(conn: Connection, schema: str, tables: list[str]) -> dict[str, list[str]]:
    """table -> its partitions that are partitioned themselves: Citus refuses to distribute such a table
    ("distributing multi-level partitioned tables is not supported"); one level of partitions it distributes."""
    return {r["table"]: list(r["partitioned_partitions"])
            for r in conn.execute(MULTI_LEVEL_SQL, {"schema": schema, "tables": tables}).mappings()}


@dataclass(frozen=True)
class Role:
    """A role that queries the distributed tables: Citus opens its connections to the workers as the current user,
    so the role must be able to log in (and the coordinator must be able to authenticate as it on every worker)."""
    name: str
    purpose: str          # "the application role (rls.app_role)" | "the legacy role (rls.legacy_role)"
    exists: bool
    can_login: bool


def querying_roles(conn: Connection, schema: str, tables: list[str], p) -> list[Role]:
    """The application role (when RLS is on) and the legacy role (when it may read a tenant table): each with whether
    it exists and can log in."""
    wanted = []
    if p.rls.enabled:
        wanted.append((p.rls.app_role, "the application role (rls.app_role)"))
    if p.rls.legacy_role:
        wanted.append((p.rls.legacy_role, "the legacy role (rls.legacy_role)"))
    out = []
    for name, purpose in wanted:
        row = conn.execute(text(
            "SELECT r.rolcanlogin, EXISTS (SELECT 1 FROM unnest(CAST(:tables AS text[])) t "
            "WHERE to_regclass(format('%I.%I', CAST(:schema AS text), t)) IS NOT NULL "
            "AND has_table_privilege(r.oid, to_regclass(format('%I.%I', CAST(:schema AS text), t)), 'SELECT')) "
            "FROM pg_roles r WHERE r.rolname = :name"), {"name": name, "schema": schema, "tables": tables}).first()
        if row is None:
            if purpose.startswith("the application"):  # 04_constrain creates it
                out.append(Role(name, purpose, False, False))
        elif row[1] or purpose.startswith("the application"):
            out.append(Role(name, purpose, True, bool(row[0])))
    return out


def multi_level_todo(table: str, partitioned: list[str]) -> str:
    return (f"Citus distributes a partitioned table with one level of partitions only: make {', '.join(partitioned)} "
            f"plain partitions of {table} (for each: CREATE TABLE … (LIKE it), INSERT … SELECT its rows, DETACH and drop "
            f"it, ATTACH the new table FOR VALUES of the old), or attach its sub-partitions to {table} directly with "
            f"bounds of {table}'s own partition key; then re-run")


def reference_reason(table: str, p) -> str:
    """Why 07 makes `table` a reference table."""
    if table in SEED_TABLES:
        return f"{table} is seed's table: every tenant's rows, read with each tenant's"
    if table in p.shared_tables:
        return f"{table} is a shared table (shared_tables): one catalogue for every tenant"
    return f"{table} is named in distribution.reference_tables: a tenant table references it"


def login_todo(role: Role) -> str:
    return (f"ALTER ROLE {role.name} LOGIN on the coordinator before 07_distribute (Citus copies the role to the workers "
            f"with the tables that depend on it, and propagates ALTER ROLE once it is there), and let the coordinator "
            f"authenticate as {role.name} on every worker (pg_dist_authinfo, a .pgpass entry of the coordinator's OS "
            f"user, or the workers' pg_hba.conf for the coordinator's address)")


CONNECTED_SQL = text("""
SELECT cn.nspname AS child_schema, c.relname AS child, con.conname AS name,
       pn.nspname AS parent_schema, p.relname AS parent
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND NOT c.relispartition AND NOT p.relispartition
ORDER BY 1, 2, 3
""")


def becoming_local(conn: Connection, schema: str, reference: list[str], inside: list[str]) -> dict[str, tuple[str, str]]:
    """The tables that create_reference_table turns into Citus local tables (they stay on the coordinator):
    table -> (the reference table whose creation takes it, why). Citus takes into its metadata every table connected
    to a reference table by foreign keys, in either direction and through any number of tables (the foreign keys
    among the tables 07 distributes or makes reference tables are dropped first, so only tables outside those are
    reached). Names outside `schema` are qualified."""
    def name(s: str, t: str) -> str:
        return t if s == schema else f"{s}.{t}"
    edges = [(name(r["child_schema"], r["child"]), r["name"], name(r["parent_schema"], r["parent"]))
             for r in conn.execute(CONNECTED_SQL).mappings()]
    taken = set(inside)
    found: dict[str, tuple[str, str]] = {}
    for root in reference:  # in the order 07 creates them: the first to reach a table takes it
        frontier = [root]
        while frontier:
            at = frontier.pop(0)
            for child, fk, parent in edges:
                if at not in (child, parent):
                    continue
                other = parent if at == child else child
                if other in taken or other in found:
                    continue
                found[other] = (root, f"{other} references {at} ({fk})" if other == child
                                else f"{at} references {other} ({fk})")
                frontier.append(other)
    return found


@dataclass(frozen=True)
class RedundantKey:
    """A UNIQUE constraint with the very columns of the table's primary key (or of another of its keys, or unique
    indexes) once 07's key swaps are done: 04_constrain's composite UNIQUE (tenant_id, id) beside a primary key that
    became (tenant_id, id), or its UNIQUE (tenant_id, …) beside another unique key that became (tenant_id, …). 07
    drops it, after the foreign keys that use its index (they come back on the kept key's)."""
    table: str
    name: str
    columns: list[str]
    definition: str
    kept: str              # the key that stays with the same columns
    used_by: list[str]     # "child.foreign key" using its index


REDUNDANT_SQL = text("""
SELECT c.relname AS table, con.conname AS name, con.contype::text AS type, pg_get_constraintdef(con.oid) AS definition,
       (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS columns,
       coalesce((SELECT array_agg(fc.relname || '.' || fk.conname ORDER BY fc.relname, fk.conname)
          FROM pg_constraint fk JOIN pg_class fc ON fc.oid = fk.conrelid
         WHERE fk.contype = 'f' AND fk.conindid = con.conindid AND fk.conparentid = 0), '{}') AS used_by
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :schema AND c.relname = ANY(:tables) AND con.contype IN ('p', 'u') AND con.conparentid = 0
UNION ALL
-- unique indexes that are no constraint (whole, of plain columns): kept where a UNIQUE constraint duplicates one
SELECT c.relname, ic.relname, 'i', pg_get_indexdef(i.indexrelid),
       (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum WHERE k.ord <= i.indnkeyatts),
       '{}'
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE n.nspname = :schema AND c.relname = ANY(:tables) AND i.indisunique AND i.indpred IS NULL
  AND i.indexprs IS NULL AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid
                                         AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x'))
""")


def redundant_keys(conn: Connection, schema: str, tables: list[str], swapping: list[UniqueKey],
                   swapped: frozenset[tuple[str, str]] = frozenset()) -> list[RedundantKey]:
    """The UNIQUE constraints that duplicate the primary key or another key of their table (a unique index
    included) once the keys in `swapping` are (tenant_id, …): the one kept is the primary key, else a key being
    swapped or that 07 swapped before (`swapped`: (table, key) from the ledger), else the first by name."""
    after = {(k.table, k.name): k.tenant_columns for k in swapping}
    mine = set(after) | set(swapped)
    out, seen = [], {}
    rows = sorted(conn.execute(REDUNDANT_SQL, {"schema": schema, "tables": tables}).mappings(),
                  key=lambda r: (r["table"], r["type"] != "p", (r["table"], r["name"]) not in mine, r["name"]))
    for r in rows:
        cols = tuple(after.get((r["table"], r["name"]), list(r["columns"])))
        first = seen.setdefault((r["table"], cols), r["name"])
        if first != r["name"] and r["type"] == "u":
            out.append(RedundantKey(r["table"], r["name"], list(cols), r["definition"], first, list(r["used_by"])))
    return out
