"""Distribution readiness: what Citus will refuse of the end state, read from the catalog of plain PostgreSQL, each
finding with what to do (distribution/citus.py lists the facts it follows; 07_distribute acts on them).

A row is ready when Citus takes the object as it is, or 07_distribute deals with it without a decision of yours;
not ready when something must change first: a key without tenant_id (a composite key beside it does not help), a
trigger, a foreign key to a table nobody said becomes a reference table, a foreign key across tenants, a
statement shape Citus refuses.
"""

from __future__ import annotations

import pandas as pd
from sqlalchemy.engine import Connection

from ..db import catalog, partitions
from ..db.names import TENANT_COLUMN
from ..tenancy import composite_keys
from . import citus, citus_keys, citus_tables

COLUMNS = ["check", "object", "finding", "ready", "what to do"]
SWAP = ("07_distribute makes it ({cols}) once distribution.application_keys_agreed (built CONCURRENTLY, swapped in "
        "separate statements in one transaction)")


def readiness(rb, planned=None) -> pd.DataFrame:
    """Each check with what was found, whether Citus takes it, and what to do. `planned`: the steps 07_distribute
    would run (phases pass them), checked for statement shapes Citus refuses."""
    rows: list[dict] = []
    p = rb.params

    def add(check: str, obj: str, finding: str, ready: bool, todo: str = "") -> None:
        rows.append({"check": check, "object": obj, "finding": finding, "ready": bool(ready), "what to do": todo})

    with rb.engine.connect() as conn:
        tables = citus.existing(conn, rb.schema, p.tables)
        fks = catalog.foreign_keys(conn, rb.schema, tables)
        plain = composite_keys.accepted_references(p)
        keys = {(k.table, k.name): k for k in citus.keys_without_tenant(conn, rb.schema, tables)}
        _tables(conn, rb, tables, keys, fks, plain, add)
        _unique_keys(p, tables, keys, fks, plain, add)
        _foreign_keys(fks, plain, keys, add)
        _triggers(conn, rb, tables, p, add)
        _references(conn, rb, tables, p, add)
        _partition_levels(conn, rb, tables, add)
        _roles(conn, rb, tables, p, add)
        for r in conn.execute(composite_keys.SEQUENCES_SQL, {"schema": rb.schema, "tables": p.tables}).mappings():
            add("sequences are bigint", f"{r['table']}.{r['sequence']}", r["type"], r["type"] == "bigint",
                "" if r["type"] == "bigint" else "ALTER SEQUENCE … AS bigint and the column to bigint")
        _shapes(conn, planned, add)
    return pd.DataFrame(rows, columns=COLUMNS)


def _swap_todo(key: citus.UniqueKey, tables, fks, plain) -> str:
    blocked = citus_keys.blockers(key, tables, fks, plain)
    return "; ".join(blocked) if blocked else SWAP.format(cols=", ".join(key.tenant_columns))


def _tables(conn: Connection, rb, tables, keys, fks, plain, add) -> None:
    tenants_oid = catalog.relation_oid(conn, rb.schema, "tenants")
    for name, st in catalog.table_states(conn, rb.schema, tables, tenants_oid).items():
        add("tenant_id is bigint", name, st.column_type or "absent (backfill adds it as bigint)",
            st.column_type in (None, "bigint"), "" if st.column_type in (None, "bigint") else
            "the distribution column must have one type in every colocated table: make it bigint")
        held = [] if TENANT_COLUMN in st.pk_columns or not st.pk_columns else \
            composite_keys.external_references(conn, rb.schema, st.oid, rb.params.tables)
        composite = [TENANT_COLUMN] + st.pk_columns in composite_keys.unique_constraints(conn, st.oid).values()
        pk = next((k for k in keys.values() if k.table == name and k.kind == "primary key"), None)
        add("primary key includes tenant_id", name, f"({', '.join(st.pk_columns) or 'none'})" + (
            f"; UNIQUE ({TENANT_COLUMN}, {', '.join(st.pk_columns)}) is in place: making it the primary key is "
            f"a later, explicit step (the application relies on the key as it is); Citus refuses the table while "
            f"the primary key lacks {TENANT_COLUMN}, the composite key beside it does not help" if composite else "") + (
            f"; referenced from outside the spec by {', '.join(held)}" if held else ""),
            TENANT_COLUMN in st.pk_columns,
            _swap_todo(pk, tables, fks, plain) if pk else ("" if st.pk_columns else
                                                           f"add a primary key that includes {TENANT_COLUMN}"))
        if st.partitioned:
            add("partitioned tables: composite keys hold the partition key", name,
                f"partitioned by {partitions.key_definition(conn, st.oid)}; " + (
                    f"UNIQUE ({TENANT_COLUMN}, {', '.join(st.pk_columns)}) holds every level's partition key (the "
                    f"primary key must), so it and the foreign keys to it can be built per partition and attached"
                    if st.pk_columns else "no primary key: PostgreSQL takes a unique key on a partitioned table "
                    "only with every partition key column in it; add one that includes them, then re-run"),
                bool(st.pk_columns))


def _unique_keys(p, tables, keys, fks, plain, add) -> None:
    accepted = {a.object: a.reason for a in p.rls.lint_accept if a.rule == "unique keys include tenant_id"}
    for key in keys.values():
        if key.kind == "primary key":
            continue
        obj = f"{key.table}.{key.name}"
        todo = _swap_todo(key, tables, fks, plain)
        if obj in accepted:
            todo = (f"the lint accepts it (rls.lint_accept: {accepted[obj]}), but Citus cannot keep a unique key "
                    f"without {TENANT_COLUMN}: the acceptance does not carry over to a distributed table; " + todo)
        add("unique keys include tenant_id", obj, f"({', '.join(key.columns)}), a {key.kind}; Citus refuses the table "
            f"while it lacks {TENANT_COLUMN}", False, todo)


def _foreign_keys(fks, plain, keys, add) -> None:
    for fk in fks:
        if fk.parent == "tenants":
            continue
        twin = None if TENANT_COLUMN in fk.cols else composite_keys.covering(fk, fks)
        reason = plain.get(f"{fk.child}.{fk.name}") if twin is None else None
        if TENANT_COLUMN in fk.cols:
            todo = "07_distribute drops it before create_reference_table and re-adds it NOT VALID, then VALIDATE"
        elif twin:
            todo = f"07_distribute drops it with the key change of {fk.parent} ({twin.name} keeps enforcing it)"
        elif reason:
            todo = (f"Citus cannot keep a foreign key across tenants between colocated tables: drop it, or make "
                    f"{fk.parent} a table outside the spec that becomes a reference table")
        else:
            todo = composite_keys.twin_refusal(fk) or (
                "turn on distribution.composite_keys and re-run 04_constrain: it adds the (tenant_id, …) twin")
        add("foreign keys between tenant tables include tenant_id", f"{fk.child}.{fk.name}",
            f"({', '.join(fk.cols)}) -> {fk.parent}" + (
                f"; {twin.name} enforces it with tenant_id: dropping this one is a later, explicit step"
                if twin else "") + (
                f"; an accepted cross-tenant reference (cross_tenant.foreign_keys: wins: child): {reason}; "
                f"it stays a plain foreign key, which a sharded deployment cannot co-locate" if reason else ""),
            TENANT_COLUMN in fk.cols, todo)


def _triggers(conn: Connection, rb, tables, p, add) -> None:
    for trig in citus.triggers(conn, rb.schema, tables):
        obj = f"{trig.table}.{trig.name}"
        if trig.rollout:
            add("no triggers on tenant tables", obj, "the runbook's rollout trigger (the rollout window is open); Citus "
                "refuses to distribute a table with triggers", False,
                "06_finalize removes it once the application writes tenant_id itself; 07_distribute waits for that")
        elif p.distribution.triggers == "enable_unsafe":
            add("no triggers on tenant tables", obj, f"the application's trigger: {trig.definition}", True,
                "distribution.triggers: enable_unsafe: 07_distribute distributes the table with "
                "citus.enable_unsafe_triggers = on, and Citus creates the trigger on every shard (safe for a trigger "
                "that only changes NEW; not for one that reads or writes other tables)")
        else:
            add("no triggers on tenant tables", obj, f"the application's trigger: {trig.definition}; Citus refuses to "
                f"distribute a table with triggers unless citus.enable_unsafe_triggers", False,
                "set distribution.triggers: enable_unsafe (Citus then creates it on every shard: safe for a trigger "
                "that only changes NEW, as an updated_at trigger does), or drop the trigger")


def _references(conn: Connection, rb, tables, p, add) -> None:
    reference = citus.reference_tables(conn, rb.schema, p)
    inside = set(tables) | set(reference)
    for t in reference:
        check = "shared tables as reference tables" if t in p.shared_tables else "reference tables"
        add(check, t, "candidate reference table (replicated to every node)" if t in p.shared_tables else
            "becomes a reference table (create_reference_table: replicated to every node)", True,
            "07_distribute runs create_reference_table after dropping the foreign keys that connect it")
    refs = citus.references_from(conn, rb.schema, tables + reference)
    for fk in refs:
        if fk.parent in inside:
            continue
        where = "tenant table" if fk.child in tables else "reference table"
        add("foreign keys to tables outside the spec", fk.key, f"({', '.join(fk.columns)}) -> {fk.parent}: a "
            f"{where} references a table that is neither a tenant table nor a reference table", False,
            f"name {fk.parent} in distribution.reference_tables (it becomes a reference table, replicated to every "
            f"node), or drop the foreign key")
    for fk in refs:
        if fk.child in reference and fk.parent in tables:
            add("reference tables reference no tenant table", fk.key, f"({', '.join(fk.columns)}) -> {fk.parent}",
                False, "Citus cannot: make the child a tenant table (core_tables) or drop the foreign key")
    for child, name, parent in citus.referenced_from_outside(conn, rb.schema, reference, sorted(inside)):
        add("tables outside the spec that reference a reference table", f"{child}.{name}", f"-> {parent}", True,
            f"Citus makes {child} a Citus local table (it stays on the coordinator) when {parent} becomes a "
            f"reference table")
    for table, (root, why) in citus.becoming_local(conn, rb.schema, reference, sorted(inside)).items():
        add("tables that become Citus local tables", table, f"{why}: create_reference_table('{root}') takes every "
            f"table connected to it by foreign keys into Citus's metadata as a Citus local table", True,
            f"nothing: it stays whole on the coordinator (queries joining it with distributed tables are limited); "
            f"07_distribute's plan names it at {root}'s step")
    for fk in refs:
        definition, dropped = citus_tables.distributed_definition(fk.definition)
        if dropped and fk.child in inside and fk.parent in inside:
            add("foreign keys holding tenant_id have no ON UPDATE action", fk.key, f"({', '.join(fk.columns)}) -> "
                f"{fk.parent} {dropped}: Citus refuses it on a key that holds the distribution column (\"SET NULL, "
                f"SET DEFAULT or CASCADE is not supported in ON UPDATE operation when distribution key included in the "
                f"foreign constraint\")", True,
                f"nothing: 07_distribute re-adds it without {dropped} (NO ACTION): a distributed row's {TENANT_COLUMN} "
                f"cannot change, so nothing is left to cascade")
    for fk in refs:
        if fk.child in inside and fk.parent in inside and citus_tables.delete_sets_null(fk.definition):
            add("foreign keys holding tenant_id set no columns ON DELETE", fk.key, f"({', '.join(fk.columns)}) -> "
                f"{fk.parent}: ON DELETE SET NULL or SET DEFAULT; Citus refuses it on a key that holds the distribution "
                f"column, and 07_distribute refuses to start while it stands", False, citus_tables.SET_NULL_TODO)
    cycle = [f for f in citus.references_from(conn, rb.schema, tables + reference)
             if f.child in inside and f.parent in inside and not _dropped_with_a_key(f, tables)]
    for fk in cycle:
        add("order of distribution: foreign keys dropped and re-added", fk.key, f"({', '.join(fk.columns)}) -> "
            f"{fk.parent}: create_reference_table('tenants') turns every table connected to it by a foreign key into "
            f"a Citus local table, after which colocate_with is refused", True,
            "07_distribute drops it first, creates the reference tables, distributes the tenant tables colocated, "
            "then re-adds it NOT VALID and validates it")
    add("order of distribution", "(plan)", "1. keys to (tenant_id, …) (the application agrees); 2. drop "
        f"{len(cycle)} foreign keys; 3. create_reference_table: {', '.join(reference) or 'none'}; "
        f"4. create_distributed_table by tenant_id, colocated: {', '.join(tables)}; 5. re-add the foreign keys "
        f"NOT VALID, then VALIDATE", True, "07_distribute on the Citus coordinator, after 06_finalize")


def _partition_levels(conn: Connection, rb, tables, add) -> None:
    for table, parts in citus.multi_level_partitioned(conn, rb.schema, tables).items():
        add("partitioned tables have one level of partitions", table, f"{', '.join(parts)} "
            f"{'is' if len(parts) == 1 else 'are'} partitioned too: Citus refuses the table (\"distributing "
            f"multi-level partitioned tables is not supported\")", False, citus.multi_level_todo(table, parts))


def _roles(conn: Connection, rb, tables, p, add) -> None:
    for role in citus.querying_roles(conn, rb.schema, tables, p):
        if role.exists:
            finding = (f"{role.purpose}: " + ("can log in" if role.can_login else
                       "NOLOGIN: Citus opens its connections to the workers as the current user, so its queries of "
                       "the distributed tables would fail (07_distribute refuses on a coordinator until it can)"))
        else:
            finding = (f"{role.purpose}: not created yet; 04_constrain creates it NOLOGIN, and Citus opens its "
                       f"connections to the workers as the current user (07_distribute refuses on a coordinator "
                       f"until it can log in)")
        add("roles that query distributed tables can log in", role.name, finding, role.can_login,
            "" if role.can_login else citus.login_todo(role))


def _dropped_with_a_key(fk: citus.Reference, tables) -> bool:
    """A single-column foreign key between tenant tables: it goes with its parent's key change."""
    return fk.child in tables and fk.parent in tables and TENANT_COLUMN not in fk.columns


def _shapes(conn: Connection, planned, add) -> None:
    if planned is None:
        return
    from ..db.sqltext import render
    bad = [(s, citus.refused_shape(render(conn, s.statement))) for s in planned]
    bad = [(s, why) for s, why in bad if why]
    for step, why in bad:
        add("statement shapes Citus accepts", f"{step.table}: {step.action}", render(conn, step.statement), False, why)
    if not bad:
        add("statement shapes Citus accepts", "07_distribute's plan", f"{len(planned)} statements; every ADD "
            f"CONSTRAINT is alone in its ALTER TABLE (swaps are separate statements in one transaction)", True)
