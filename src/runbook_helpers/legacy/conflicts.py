"""Conflicts between tenants, found before anything changes: foreign keys whose two sides would land in
different tenants, and tenant_id values that name no tenant.

Where a row lands is what the backfill will give it (legacy/mapping.py, phases/backfill.py): its parent's
tenant (`parent`), else a tenant_id it already carries other than the System Tenant, else its org's
(`org_column`), else the System Tenant; without the legacy mapping, the tenant_id it carries, else the
System Tenant (so there are no conflicts unless existing tenant_id columns disagree). Before seed a
tenant is named by its source ('org 3', 'System Tenant', 'tenant 17' for an existing value); once seed has
recorded the mapping, by its id ('tenant 17'). Both sides of a key are compared in the same terms.

Per foreign key, params `cross_tenant.foreign_keys` say what wins: `parent` (the child row takes that
parent's tenant: resolved() makes the key the table's parent, so the mapping, the backfill, the rollout
trigger and validate all follow it), `child` (the child keeps its own tenant; the key stays a plain
foreign key, without a (tenant_id, …) twin, and is listed as an accepted cross-tenant reference), or
`stop` (the default): preflight fails while the key has conflicts. Every count is one set-based query
per key (plain reads), with a few sample keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from psycopg import sql
from sqlalchemy.engine import Connection

from .. import params as params_mod
from ..db import catalog
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..errors import RunbookError
from . import mapping

FOREIGN_KEY, NO_TENANT = "cross-tenant foreign key", "tenant_id names no tenant"
OK, ACCEPTED, FAIL = "ok", "accepted", "FAIL"
COLUMNS = ["kind", "object", "table", "references", "rows", "sample keys", "rule", "status", "fix"]


def params_key(fk: catalog.ForeignKey) -> str:
    return f"{fk.child}.{fk.name}"


def tenant_foreign_keys(conn: Connection, p) -> list[catalog.ForeignKey]:
    """The foreign keys between core tables that do not hold tenant_id themselves (a composite (tenant_id, …)
    key cannot join two tenants)."""
    return [fk for fk in catalog.foreign_keys(conn, p.schema_, p.tables) if TENANT_COLUMN not in fk.cols]


# --- the rules ------------------------------------------------------------------------------------

def resolved(conn: Connection, p):
    """The params with each `wins: parent` rule made its child table's parent (core_tables.<t>.parent), so
    every mechanism that follows a parent follows that one. Rules that cannot apply are left out here and
    reported by rule_problems()."""
    wanted = {k for k, r in p.cross_tenant.foreign_keys.items() if r.wins == "parent"}
    if not wanted:
        return p
    changes: dict[str, dict] = {}
    for fk in tenant_foreign_keys(conn, p):
        if params_key(fk) in wanted and _can_be_parent(conn, p, fk) is None and fk.child not in changes:
            current = p.core_tables[fk.child].parent
            if current is None or (current.table, current.column) != (fk.parent, fk.cols[0]):
                changes[fk.child] = {"parent": {"table": fk.parent, "column": fk.cols[0]}}
    return params_mod.override(p, {"core_tables": changes}) if changes else p


def _can_be_parent(conn: Connection, p, fk: catalog.ForeignKey) -> str | None:
    """Why this key cannot be its table's parent, or None."""
    if fk.child == fk.parent:
        return "it references its own table"
    if len(fk.cols) != 1:
        return f"it has {len(fk.cols)} columns; a parent is followed by one column"
    parent = catalog.table_state(conn, p.schema_, fk.parent)
    if [c for c in parent.pk_columns if c != TENANT_COLUMN] != fk.ref_cols:
        return f"it does not reference the primary key of {fk.parent}"
    return None


def rule_problems(conn: Connection, p) -> list[str]:
    """Rules in params that name no foreign key between tenant tables, or cannot hold."""
    rules = p.cross_tenant.foreign_keys
    fks = {params_key(fk): fk for fk in tenant_foreign_keys(conn, p)}
    out = [f"{key}: no such foreign key between core tables (01_inspect lists them)" for key in rules if key not in fks]
    parents: dict[str, list[str]] = {}
    for key, rule in rules.items():
        fk = fks.get(key)
        if fk is None:
            continue
        if rule.wins == "parent":
            why = _can_be_parent(conn, p, fk)
            if why:
                out.append(f"{key}: wins: parent cannot apply: {why}")
            parents.setdefault(fk.child, []).append(key)
        spec = p.core_tables[fk.child].parent
        if rule.wins == "child" and spec is not None and mapping.enabled(p) and \
                (spec.table, [spec.column]) == (fk.parent, fk.cols):
            out.append(f"{key}: wins: child, but this key is core_tables.{fk.child}.parent, which the row follows; "
                       f"remove the parent (the row then takes its own org's tenant) or the rule")
    out += [f"{', '.join(keys)}: a {child} row follows one parent; give wins: parent to one of them"
            for child, keys in parents.items() if len(keys) > 1]
    return out


# --- where a row lands ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Terms:
    """How tenants are named in one analysis (see the module docstring)."""
    legacy: bool
    system_id: int | None
    mapped: bool        # seed has recorded org -> tenant
    has_column: dict[str, bool]
    actual: bool = False  # the tenant_id rows carry now (constrain: the backfill has run and moves nothing more)

    def system(self) -> sql.Composable:
        return sql.Literal(f"tenant {self.system_id}") if self.mapped else sql.Literal("System Tenant")

    def existing(self, value: sql.Composable) -> sql.Composable:
        if self.system_id is not None and not self.mapped:
            return sql.SQL("CASE WHEN {v} = {sid} THEN 'System Tenant' ELSE 'tenant ' || {v} END").format(
                v=value, sid=sql.Literal(self.system_id))
        return sql.SQL("'tenant ' || {}").format(value)


def _landing(conn: Connection, p, terms: _Terms, table: str, row: sql.Identifier, depth: int = 0) -> sql.Composable:
    """The tenant a row of `table` ends in, named as text."""
    spec = p.core_tables[table]
    mapped = terms.legacy and (spec.org_column or spec.parent)
    parts: list[sql.Composable] = []
    if terms.actual:
        if terms.has_column[table]:
            parts.append(terms.existing(sql.SQL("{}.{}").format(row, sql.Identifier(TENANT_COLUMN))))
        return sql.SQL("COALESCE({})").format(sql.SQL(", ").join(parts + [terms.system()]))
    if terms.legacy and spec.parent is not None:
        alias = sql.Identifier(f"land{depth}")
        parts.append(sql.SQL("(SELECT {land} FROM {pt} AS {a} WHERE {a}.{pk} = {row}.{col})").format(
            land=_landing(conn, p, terms, spec.parent.table, alias, depth + 1),
            pt=sql.Identifier(p.schema_, spec.parent.table), a=alias,
            pk=sql.Identifier(mapping.parent_key(conn, p, spec.parent.table)), row=row,
            col=sql.Identifier(spec.parent.column)))
    if terms.has_column[table]:
        own = sql.SQL("{}.{}").format(row, sql.Identifier(TENANT_COLUMN))
        if mapped and terms.system_id is not None:  # a mapped row on the System Tenant moves to its org
            own = sql.SQL("NULLIF({}, {})").format(own, sql.Literal(terms.system_id))
        parts.append(terms.existing(own))
    if terms.legacy and spec.org_column:
        oc = sql.SQL("{}.{}").format(row, sql.Identifier(spec.org_column))
        parts.append(sql.SQL("(SELECT 'tenant ' || m.tenant_id FROM {ot} AS m WHERE m.org_id = {oc})").format(
            ot=mapping.ledger_table(p, "org_tenants"), oc=oc) if terms.mapped else
            sql.SQL("(SELECT 'org ' || {ok} FROM {org} AS o WHERE {ok} = {oc})").format(
                ok=mapping.org_key("o", p), org=mapping.org_table(p), oc=oc))
    parts.append(terms.system())
    return sql.SQL("COALESCE({})").format(sql.SQL(", ").join(parts))


def _terms(conn: Connection, p, actual: bool = False) -> _Terms:
    legacy = mapping.enabled(p)
    system_id = catalog.system_tenant_id(conn, p.schema_, p.system_tenant.uuid) \
        if catalog.relation_oid(conn, p.schema_, "tenants") is not None else None
    return _Terms(legacy, system_id, legacy and system_id is not None and mapping.map_tables_exist(conn, p),
                  {t: st.has_column for t, st in catalog.table_states(conn, p.schema_, p.tables).items()}, actual)


def _key_text(row: str, cols: list[str]) -> sql.Composable:
    if not cols:
        return sql.SQL("{}.ctid::text").format(sql.Identifier(row))
    return sql.SQL("concat_ws(',', {})").format(sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(row, c)) for c in cols))


def _count_and_samples(conn: Connection, base: sql.Composable, order: sql.Composable, n: int) -> tuple[int, list[str]]:
    """One statement and one scan: how many rows `base` (a SELECT with a `sample` column) returns, and the first
    n samples (the count rides along as a window over the whole result; no rows: none)."""
    query = sql.SQL("SELECT x.sample, count(*) OVER () FROM ({base}) AS x ORDER BY {order} LIMIT {n}").format(
        base=base, order=order, n=sql.Literal(n))
    rows = conn.exec_driver_sql(render(conn, query)).all()
    return (int(rows[0][1]) if rows else 0), [r[0] for r in rows]


def foreign_key_conflicts(conn: Connection, p, fk: catalog.ForeignKey, terms: _Terms | None = None
                          ) -> tuple[int, list[str]]:
    """Rows of fk.child whose referenced fk.parent row lands in another tenant: count and sample keys."""
    terms = terms or _terms(conn, p)
    child_key = catalog.table_state(conn, p.schema_, fk.child).pk_columns
    join = sql.SQL(" AND ").join(sql.SQL("pr.{} = ch.{}").format(sql.Identifier(r), sql.Identifier(c))
                                 for c, r in zip(fk.cols, fk.ref_cols))
    order_cols = [f"k{i}" for i in range(len(child_key))] or ["k_ctid"]
    keys = sql.SQL(", ").join(sql.SQL("ch.{} AS {}").format(sql.Identifier(c), sql.Identifier(a))
                              for c, a in zip(child_key, order_cols)) if child_key else sql.SQL("ch.ctid AS k_ctid")
    base = sql.SQL(
        "SELECT {keys}, {child} || ' ' || {ckey} || ' (' || l.a || ') -> ' || {parent} || ' ' || {pkey} || ' (' || l.b "
        "|| ')' AS sample FROM {ct} AS ch JOIN {pt} AS pr ON {join} "
        "CROSS JOIN LATERAL (SELECT {la} AS a, {lb} AS b) AS l WHERE l.a IS DISTINCT FROM l.b").format(
        keys=keys, child=sql.Literal(fk.child), ckey=_key_text("ch", child_key), parent=sql.Literal(fk.parent),
        pkey=_key_text("ch", fk.cols), ct=sql.Identifier(p.schema_, fk.child), pt=sql.Identifier(p.schema_, fk.parent),
        join=join, la=_landing(conn, p, terms, fk.child, sql.Identifier("ch")),
        lb=_landing(conn, p, terms, fk.parent, sql.Identifier("pr")))
    order = sql.SQL(", ").join(sql.Identifier("x", a) for a in order_cols)
    return _count_and_samples(conn, base, order, p.cross_tenant.sample_keys)


def unknown_tenants(conn: Connection, p, table: str) -> tuple[int, list[str]]:
    """Rows whose tenant_id is set but names no row of tenants (every set value, before tenants exists)."""
    st = catalog.table_state(conn, p.schema_, table)
    col = sql.Identifier("x", TENANT_COLUMN)
    missing = sql.SQL(" AND NOT EXISTS (SELECT 1 FROM {} AS tn WHERE tn.id = {})").format(
        sql.Identifier(p.schema_, "tenants"), col) if catalog.relation_oid(conn, p.schema_, "tenants") else sql.SQL("")
    order_cols = [f"k{i}" for i in range(len(st.pk_columns))] or ["k_ctid"]
    keys = sql.SQL(", ").join(sql.SQL("x.{} AS {}").format(sql.Identifier(c), sql.Identifier(a))
                              for c, a in zip(st.pk_columns, order_cols)) if st.pk_columns else sql.SQL("x.ctid AS k_ctid")
    base = sql.SQL("SELECT {keys}, {t} || ' ' || {key} || ' (tenant_id ' || {col} || ')' AS sample FROM {qt} AS x "
                   "WHERE {col} IS NOT NULL{missing}").format(
        keys=keys, t=sql.Literal(table), key=_key_text("x", st.pk_columns), col=col, qt=st.qualified, missing=missing)
    order = sql.SQL(", ").join(sql.Identifier("x", a) for a in order_cols)
    return _count_and_samples(conn, base, order, p.cross_tenant.sample_keys)


# --- the report -----------------------------------------------------------------------------------

def _fix_for(fk: catalog.ForeignKey, env: str) -> str:
    return (f"decide what wins in params/{env}.yaml: cross_tenant.foreign_keys: {{{params_key(fk)}: {{wins: parent}}}} "
            f"(the {fk.child} row takes its {fk.parent}'s tenant) or {{wins: child, reason: ...}} (it keeps its own; "
            f"the key stays a plain foreign key across tenants), or correct the data")


def report(rb, actual: bool = False) -> pd.DataFrame:
    """One row per foreign key between tenant tables and per core table with tenant_id: what would cross
    tenants, how many rows, a few keys, the rule, and ok / accepted / FAIL with what to do. `actual`: compare
    the tenant_id the rows carry now instead of where the backfill would put them (constrain's preflight)."""
    p = rb.params
    rows: list[dict] = []
    with rb.engine.connect() as conn:
        present = [t for t in p.tables if catalog.relation_oid(conn, p.schema_, t) is not None]
        if len(present) < len(p.tables):
            return pd.DataFrame(columns=COLUMNS)  # preflight reports the missing tables
        terms = _terms(conn, p, actual)
        for fk in tenant_foreign_keys(conn, p):
            count, samples = foreign_key_conflicts(conn, p, fk, terms)
            rule = p.cross_tenant.rule(fk.child, fk.name)
            status = OK if count == 0 else (ACCEPTED if rule == "child" else FAIL)
            rows.append({"kind": FOREIGN_KEY, "object": params_key(fk), "table": fk.child,
                         "references": f"{fk.parent} ({', '.join(fk.cols)})", "rows": count,
                         "sample keys": "; ".join(samples), "rule": rule, "status": status,
                         "fix": _fix_for(fk, p.env) if status == FAIL else (
                             p.cross_tenant.accepted(fk.child, fk.name) or "")})
        for table in p.tables:
            if not terms.has_column[table]:
                continue
            count, samples = unknown_tenants(conn, p, table)
            rows.append({"kind": NO_TENANT, "object": f"{table}.{TENANT_COLUMN}", "table": table, "references": "tenants",
                         "rows": count, "sample keys": "; ".join(samples), "rule": "", "status": FAIL if count else OK,
                         "fix": "point these rows at an existing tenant, or set tenant_id NULL so the backfill gives "
                                "them the tenant their data implies, then re-run 01_inspect" if count else ""})
    return pd.DataFrame(rows, columns=COLUMNS)


def failures(rb, actual: bool = False) -> list[str]:
    """One line per unresolved conflict or broken rule (empty: nothing stops the migration)."""
    with rb.engine.connect() as conn:
        out = [f"cross_tenant.foreign_keys.{line}" for line in rule_problems(conn, rb.params)]
    frame = report(rb, actual)
    for r in frame[frame["status"] == FAIL].to_dict("records"):
        what = (f"{r['object']} -> {r['references']}: {r['rows']:,} rows would reference a row of another tenant"
                if r["kind"] == FOREIGN_KEY else f"{r['object']}: {r['rows']:,} rows name no tenant")
        out.append(f"{what} (e.g. {r['sample keys']}); {r['fix']}")
    return out


def require_resolved(rb, actual: bool = False) -> None:
    """The preflight of every phase that changes tables: raise, with nothing changed, while a conflict has
    no rule or a tenant_id names no tenant."""
    problems = failures(rb, actual)
    if problems:
        raise RunbookError("conflicts between tenants (see 01_inspect's conflict report):\n"
                           + "\n".join(f"  - {line}" for line in problems) + "\nNothing was changed.")


def write_csv(frame: pd.DataFrame, path) -> None:
    frame.to_csv(path, index=False)
