"""The opt-in composite-key step, and the catalog reads distribution readiness (distribution/readiness.py) shares.

A sharded PostgreSQL co-locates rows by tenant_id, so every primary key, unique key and foreign key
between tenant tables must include it; shared tables become reference tables; ids must not run out. With distribution.composite_keys, constrain adds the composite keys
beside the ones the application relies on, online, and removes none:

  1. CREATE UNIQUE INDEX CONCURRENTLY on (tenant_id, <primary key>)       SHARE UPDATE EXCLUSIVE
  2. ADD CONSTRAINT <t>_tenant_id_<key>_unique UNIQUE USING INDEX          brief ACCESS EXCLUSIVE, no scan
     (1 and 2 also for each other unique key, or unique index, that a foreign key between tenant tables
     references: REFERENCES step (id, flow_id) to UNIQUE (id, flow_id) gets UNIQUE (tenant_id, id, flow_id))
  3. per foreign key between tenant tables: ADD … FOREIGN KEY (tenant_id, <cols>) REFERENCES
     parent (tenant_id, <key>) ON UPDATE CASCADE NOT VALID, then VALIDATE it     brief / no write block

Every foreign key between tenant tables gets its twin but an accepted cross-tenant reference and one whose
parent side holds tenant_id while its child side does not (twin_refusal says why and what to do; the lint and
the readiness report show it).

`PRIMARY KEY (id)`, every unique key and every original foreign key stay: the application's
`REFERENCES t(id)`, `ON CONFLICT (id)` and its id lookups keep working, and an id stays unique across
tenants. The composite foreign key closes a hole row level security leaves open (referential checks
bypass RLS, so with a plain foreign key a tenant can point a child row at another tenant's parent), and
its ON UPDATE CASCADE makes children follow a parent that moves to another tenant. Making the composite
key the primary key, and dropping the single-column foreign keys, is what a sharded deployment needs
next; the readiness report lists it as a later, explicit step. Names follow Drizzle's defaults, so the
application's schema can declare them as they are.
"""

from __future__ import annotations

from dataclasses import replace

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..db import catalog, partitions, violations
from ..db.ddl import (
    ACCESS_EXCLUSIVE_META,
    CONTINUES,
    UNDO_PHASE,
    Step,
    concurrent_index_steps,
    drop_foreign_key_lock,
    foreign_key_lock,
    on_table,
    validate_foreign_key_lock,
)
from ..db.names import TENANT_COLUMN, truncate

PHASE = "constrain"


def composite_fk_name(fk: catalog.ForeignKey) -> str:
    """Drizzle's default name: <table>_<columns>_<foreign table>_<foreign columns>_fk."""
    return truncate(f"{fk.child}_{TENANT_COLUMN}_{'_'.join(fk.cols)}_{fk.parent}_{TENANT_COLUMN}_"
                    f"{'_'.join(fk.ref_cols)}_fk")


def composite_unique_name(table: str, key: list[str]) -> str:
    """Drizzle's default name: <table>_<columns>_unique."""
    return truncate(f"{table}_{TENANT_COLUMN}_{'_'.join(key)}_unique")


def unique_constraints(conn: Connection, oid: int) -> dict[str, list[str]]:
    """The table's UNIQUE constraints: name -> columns."""
    rows = conn.execute(text(
        "SELECT con.conname, (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY "
        "k(attnum, ord) JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) "
        "FROM pg_constraint con WHERE con.conrelid = :oid AND con.contype = 'u'"), {"oid": oid}).all()
    return {name: list(cols) for name, cols in rows}


def covering(fk: catalog.ForeignKey, fks: list[catalog.ForeignKey]) -> catalog.ForeignKey | None:
    """The composite (tenant_id, …) foreign key beside a single-column one, if there is one."""
    return next((other for other in fks if other.child == fk.child and other.parent == fk.parent
                 and other.cols == [TENANT_COLUMN] + fk.cols and other.ref_cols == [TENANT_COLUMN] + fk.ref_cols), None)


def pk_name(conn: Connection, oid: int) -> str | None:
    return conn.execute(text("SELECT conname FROM pg_constraint WHERE conrelid = :oid AND contype = 'p'"),
                        {"oid": oid}).scalar()


def index_valid(conn: Connection, schema: str, name: str) -> bool | None:
    return conn.execute(text("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                             "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relname = :n"),
                        {"s": schema, "n": name}).scalar()


EXTERNAL_REFS_SQL = text("""
SELECT ch.relname AS child, con.conname
FROM pg_constraint con JOIN pg_class ch ON ch.oid = con.conrelid JOIN pg_namespace n ON n.oid = ch.relnamespace
WHERE con.contype = 'f' AND con.confrelid = :oid AND NOT (n.nspname = :schema AND ch.relname = ANY(:tables))
ORDER BY 1, 2
""")


def external_references(conn: Connection, schema: str, oid: int, tables: list[str]) -> list[str]:
    """Foreign keys from tables outside the spec that reference this table: they depend on its primary key,
    which therefore cannot be swapped for (tenant_id, ...) without dropping them."""
    return [f"{r.child}.{r.conname}" for r in conn.execute(
        EXTERNAL_REFS_SQL, {"oid": oid, "schema": schema, "tables": tables})]


def unique_index_steps(phase: str, conn: Connection, st, index: str, cols: list[str]) -> list[Step]:
    """A unique index on `cols` built CONCURRENTLY, unless a valid one of that name exists; an INVALID leftover
    of an interrupted build is dropped first, and a failed build drops what it left."""
    valid = index_valid(conn, st.schema, index)
    return concurrent_index_steps(
        phase, st.name, st.schema, index, None if valid else sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} ({})")
        .format(sql.Identifier(index), st.qualified, sql.SQL(", ").join(map(sql.Identifier, cols))),
        f"build the unique index on ({', '.join(cols)})", leftovers=[index] if valid is False else [],
        lock=on_table("SHARE UPDATE EXCLUSIVE", note=CONTINUES, relation=st.name))


def accepted_references(p) -> dict[str, str]:
    """Foreign keys params accept across tenants (cross_tenant.foreign_keys, wins: child), as
    "<child table>.<constraint>" -> reason: they stay plain foreign keys, without a (tenant_id, …) twin."""
    return {k: r.reason for k, r in p.cross_tenant.foreign_keys.items() if r.wins == "child"}


def twin_refusal(fk: catalog.ForeignKey) -> str | None:
    """Why no (tenant_id, …) twin can stand beside this foreign key, with what to do; None when one can.
    PostgreSQL takes a foreign key only to a whole unique key of plain columns (never to a partial or an
    expression index), so every key between tenant tables can be twinned but one whose parent side holds
    tenant_id while its child side does not: its twin would name tenant_id twice."""
    if TENANT_COLUMN not in fk.ref_cols or TENANT_COLUMN in fk.cols:
        return None
    return (f"no ({TENANT_COLUMN}, …) twin can be built: it references {fk.parent} ({', '.join(fk.ref_cols)}), "
            f"which holds {TENANT_COLUMN}, from ({', '.join(fk.cols)}), which is not {fk.child}'s own {TENANT_COLUMN}; "
            f"make it reference {fk.parent} from {fk.child}.{TENANT_COLUMN} (FOREIGN KEY ({TENANT_COLUMN}, …)), or "
            f"accept it in cross_tenant.foreign_keys ({fk.child}.{fk.name}: wins: child, with the reason)")


def twinned(fks: list[catalog.ForeignKey], tables, plain: dict[str, str] | None = None) -> list[catalog.ForeignKey]:
    """The foreign keys between tenant tables that get a (tenant_id, …) twin, whichever unique key of the parent
    they reference: all but those holding tenant_id already, the accepted cross-tenant references in `plain`
    and those twin_refusal() refuses (the readiness report and the lint list those)."""
    return [fk for fk in fks if TENANT_COLUMN not in fk.cols and fk.child in tables and fk.parent in tables
            and f"{fk.child}.{fk.name}" not in (plain or {}) and twin_refusal(fk) is None]


def keys_to_twin(states: dict, fks: list[catalog.ForeignKey]) -> dict[str, list[list[str]]]:
    """Per tenant table, the keys that get UNIQUE (tenant_id, <key>) beside them: its primary key (every tenant
    table's), then each other unique key a twinned foreign key references, in its index's column order (the
    order 07_distribute gives that key when it swaps it to (tenant_id, …), so the two are seen as one)."""
    out: dict[str, list[list[str]]] = {
        name: [st.pk_columns] if st.exists and st.pk_columns and TENANT_COLUMN not in st.pk_columns else []
        for name, st in states.items()}
    for fk in fks:
        if fk.ref_key not in out[fk.parent]:
            out[fk.parent].append(fk.ref_key)
    return out


def unique_twin_steps(conn: Connection, st, key: list[str], stays: str) -> list[Step]:
    """UNIQUE (tenant_id, <key>) beside `key`, unless it is there: the unique index CONCURRENTLY, then the
    constraint USING it (per partition and attached, on a partitioned table). `stays`: what the why says stays."""
    cols = [TENANT_COLUMN] + key
    if cols in unique_constraints(conn, st.oid).values():
        return []
    if st.partitioned:
        return partitioned_unique_steps(conn, st, key)
    unique = composite_unique_name(st.name, key)
    return unique_index_steps(PHASE, conn, st, unique, cols) + [
        Step(PHASE, st.name, f"add UNIQUE ({', '.join(cols)}) using that index",
             sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}").format(
                 st.qualified, sql.Identifier(unique), sql.Identifier(unique)),
             ACCESS_EXCLUSIVE_META, f"catalog change only: the index is built; {stays}")]


def steps(conn: Connection, schema: str, tables: list[str], recorded: frozenset[str] = frozenset(),
          plain: dict[str, str] | None = None) -> list[Step]:
    """What remains to give every tenant table UNIQUE (tenant_id, <key>) and every foreign key between tenant
    tables its (tenant_id, …) twin, from the catalog: a key referencing another unique key than the primary key
    gets UNIQUE (tenant_id, <that key>) on its parent to reference. Keys in `plain` (accepted cross-tenant
    references) get none; a failed VALIDATE of a twin drops it again unless it is in `recorded` (there before
    the migration): NOT VALID, it would refuse the application's new cross-tenant rows while the phase is stopped."""
    tenants_oid = catalog.relation_oid(conn, schema, "tenants")
    states = catalog.table_states(conn, schema, tables, tenants_oid)
    trees = {t: partitions.tree(conn, st) for t, st in states.items()}
    leaves = {t: partitions.leaves(tree) for t, tree in trees.items()}
    every = {t: tuple(p.name for p in tree) for t, tree in trees.items()}  # what a recursing ALTER TABLE locks
    fks = catalog.foreign_keys(conn, schema, tables + [p.name for parts in leaves.values() for p in parts])
    twins = twinned(fks, states, plain)
    out: list[Step] = []
    for name, keys in keys_to_twin(states, twins).items():
        for key in keys:
            out += unique_twin_steps(conn, states[name], key, "the primary key stays" if key == states[name].pk_columns
                                     else f"the unique key on ({', '.join(key)}) stays")
    for fk in twins:
        if states[fk.child].partitioned:
            out += partitioned_fk_steps(schema, fk, leaves[fk.child], fks, every[fk.child], every[fk.parent])
        else:
            out += fk_twin_steps(schema, fk, fks, states, every[fk.parent], recorded)
    return out


def fk_twin_steps(schema: str, fk: catalog.ForeignKey, fks: list[catalog.ForeignKey], states: dict,
                  parent_parts: tuple[str, ...], recorded: frozenset[str]) -> list[Step]:
    """The (tenant_id, …) twin of a foreign key whose child is not partitioned: NOT VALID (no scan), then VALIDATE
    (no write blocked), each unless the catalog has it already."""
    existing = covering(fk, fks)
    composite = existing.name if existing else composite_fk_name(fk)
    child = sql.Identifier(schema, fk.child)
    out: list[Step] = []
    if existing is None:
        out.append(Step(PHASE, fk.child, f"add {composite} NOT VALID",
                        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}){} NOT VALID").format(
                            child, sql.Identifier(composite),
                            sql.SQL(", ").join(map(sql.Identifier, [TENANT_COLUMN] + fk.cols)),
                            sql.Identifier(schema, fk.parent),
                            sql.SQL(", ").join(map(sql.Identifier, [TENANT_COLUMN] + fk.ref_cols)),
                            fk.actions(on_update="c")),
                        foreign_key_lock(fk.parent, parent_partitions=parent_parts),
                        f"NOT VALID skips the scan; new writes are checked at once; "
                        f"{fk.name} stays beside it"))
    if existing is None or not existing.validated:
        twin = [TENANT_COLUMN] + fk.cols
        out.append(Step(PHASE, fk.child, f"validate {composite}",
                        sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(child, sql.Identifier(composite)),
                        validate_foreign_key_lock(fk.parent), "scans without blocking reads or writes", long_scan=True,
                        diagnose=violations.foreign_key_violations(
                            child, twin, sql.Identifier(schema, fk.parent), [TENANT_COLUMN] + fk.ref_cols,
                            states[fk.child].pk_columns),
                        on_error=None if composite in recorded else sql.SQL(
                            "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(child, sql.Identifier(composite))))
    return out


def partitioned_unique_steps(conn: Connection, st, key: list[str]) -> list[Step]:
    """UNIQUE (tenant_id, <key>) on a partitioned table (the key includes the partition key, as PostgreSQL
    requires of every unique key there): per leaf partition the unique index CONCURRENTLY and the
    constraint USING it, then the constraint on the table, which PostgreSQL builds by attaching each
    partition's (no scan; ADD … USING INDEX is not available on a partitioned table itself)."""
    cols = [TENANT_COLUMN] + key
    unique = composite_unique_name(st.name, key)
    out: list[Step] = []
    tree = partitions.tree(conn, st)
    for leaf in partitions.leaves(tree):
        ls = leaf.state
        if partitions.attached_constraint(conn, catalog.relation_oid(conn, st.schema, leaf.parent), unique, ls) \
                or cols in unique_constraints(conn, ls.oid).values():
            continue
        name = composite_unique_name(ls.name, key)
        out += [replace(s, table=st.name) for s in unique_index_steps(PHASE, conn, ls, name, cols)]
        out.append(Step(PHASE, st.name, f"add UNIQUE ({', '.join(cols)}) to partition {ls.name} using that index",
                        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}").format(
                            ls.qualified, sql.Identifier(name), sql.Identifier(name)),
                        on_table("ACCESS EXCLUSIVE", brief=True, relation=ls.name),
                        "catalog change only: the index is built"))
    out.append(Step(PHASE, st.name, f"add UNIQUE ({', '.join(cols)}) to the table",
                    sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE ({})").format(
                        st.qualified, sql.Identifier(unique), sql.SQL(", ").join(map(sql.Identifier, cols))),
                    on_table("ACCESS EXCLUSIVE", brief=True, scope="and its partitions",
                             spread=tuple(p.name for p in tree)),
                    "every partition's unique index is built: PostgreSQL attaches them and builds nothing"))
    return out


def partitioned_fk_steps(schema: str, fk: catalog.ForeignKey, leaves: list, fks: list[catalog.ForeignKey],
                         every: tuple[str, ...] = (), parent_parts: tuple[str, ...] = ()) -> list[Step]:
    """The (tenant_id, …) twin of a foreign key whose child is partitioned: per leaf partition NOT VALID, then
    VALIDATE, then on the table without NOT VALID, which attaches the partitions' (no scan). PostgreSQL before
    18 cannot add a NOT VALID foreign key to a partitioned table."""
    composite = composite_fk_name(fk)
    existing = covering(fk, fks)
    if existing is not None and existing.validated:
        return []
    out: list[Step] = []
    cols = sql.SQL(", ").join(map(sql.Identifier, [TENANT_COLUMN] + fk.cols))
    refs = sql.SQL("{} ({})").format(sql.Identifier(schema, fk.parent),
                                     sql.SQL(", ").join(map(sql.Identifier, [TENANT_COLUMN] + fk.ref_cols)))
    for leaf in leaves:
        mine = replace(fk, child=leaf.name, name=composite_fk_name(replace(fk, child=leaf.name)))
        have = covering(mine, fks)
        child = sql.Identifier(schema, leaf.name)
        if have is None:
            out.append(Step(PHASE, fk.child, f"add {mine.name} NOT VALID to partition {leaf.name}",
                            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {}{} NOT VALID").format(
                                child, sql.Identifier(mine.name), cols, refs, fk.actions(on_update="c")),
                            foreign_key_lock(fk.parent, relation=leaf.name, parent_partitions=parent_parts),
                            "NOT VALID skips the scan; new writes are checked at once"))
        if have is None or not have.validated:
            out.append(Step(PHASE, fk.child, f"validate {(have or mine).name} on partition {leaf.name}",
                            sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                                child, sql.Identifier((have or mine).name)),
                            validate_foreign_key_lock(fk.parent, relation=leaf.name),
                            "scans one partition without blocking it", long_scan=True))
    if existing is None:
        out.append(Step(PHASE, fk.child, f"add {composite} to the table",
                        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {}{}").format(
                            sql.Identifier(schema, fk.child), sql.Identifier(composite), cols, refs,
                            fk.actions(on_update="c")),
                        on_table("SHARE ROW EXCLUSIVE", (fk.parent, "ACCESS EXCLUSIVE"),
                                 *((p, "SHARE ROW EXCLUSIVE") for p in parent_parts), brief=True,
                                 scope="and its partitions", spread=every),
                        f"every partition's key is validated: PostgreSQL attaches them and scans nothing; {fk.name} "
                        f"stays beside it"))
    else:
        out.append(Step(PHASE, fk.child, f"validate {composite}",
                        sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                            sql.Identifier(schema, fk.child), sql.Identifier(composite)),
                        validate_foreign_key_lock(fk.parent, scope="and its partitions", note="no scan", spread=every),
                        "every partition's key is validated already"))
    return out


def undo_steps(conn: Connection, schema: str, states: dict, before: dict[str, dict]) -> list[Step]:
    """Back to the keys of before (`before`: each table's recorded constraints): the (tenant_id, …) foreign
    keys and unique keys the composite-key step added are dropped, children first; an original foreign key
    between tenant tables that is missing comes back NOT VALID, then VALIDATE."""
    out: list[Step] = []
    recorded = {c["conname"] for t in states for c in before[t]["constraints"]}
    current_fks = {fk.name: fk for fk in catalog.foreign_keys(conn, schema, list(states))}
    for fk in current_fks.values():
        if TENANT_COLUMN in fk.cols and fk.name not in recorded:
            out.append(Step(UNDO_PHASE, fk.child, f"drop {fk.name}", sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(schema, fk.child), sql.Identifier(fk.name)), drop_foreign_key_lock(fk.parent),
                "catalog change only"))
    for name, st in states.items():
        if st.oid is None:
            continue
        for unique, cols in unique_constraints(conn, st.oid).items():
            if TENANT_COLUMN in cols and unique not in recorded:
                out.append(Step(UNDO_PHASE, name, f"drop {unique}", sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    st.qualified, sql.Identifier(unique)), ACCESS_EXCLUSIVE_META, "catalog change only; its index goes "
                    "with it"))
    for name, st in states.items():
        for con in before[name]["constraints"]:
            if con["contype"] != "f" or con["conname"] in current_fks:
                continue
            parent = next((t for t in states if f" REFERENCES {t}(" in con["definition"]), None)
            if parent is None:
                continue
            out.append(Step(UNDO_PHASE, name, f"restore {con['conname']} NOT VALID",
                            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(
                                st.qualified, sql.Identifier(con["conname"]), sql.SQL(con["definition"])),
                            foreign_key_lock(parent), "NOT VALID skips the scan"))
            out.append(Step(UNDO_PHASE, name, f"validate {con['conname']}",
                            sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(st.qualified,
                                                                                   sql.Identifier(con["conname"])),
                            validate_foreign_key_lock(parent), "scans without blocking reads or writes",
                            long_scan=True))
    return out


SEQUENCES_SQL = text("""
SELECT c.relname AS table, s.relname AS sequence, format_type(q.seqtypid, NULL) AS type
FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_sequence q ON q.seqrelid = s.oid
WHERE d.deptype IN ('a', 'i') AND n.nspname = :schema AND c.relname = ANY(:tables)
ORDER BY 1, 2
""")
