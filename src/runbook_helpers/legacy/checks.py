"""What the legacy mapping could not decide, and the proof that it lost nothing.

ambiguities(): one row per case a person should look at, by kind — read from the legacy data alone, so
02_seed can show it before anything is written and the archive keeps it as legacy_ambiguities.csv.
The listing holds ids, never emails or names.

conservation(): validate's checks — every row is counted under exactly one existing tenant; each row carries the tenant its org (or its parent) says, recomputed here from the
legacy data rather than read back from the backfill; each legacy (user, org) pair has exactly one
membership with its mapped role; each legacy user is migrated or listed; child rows share their parent's
tenant on every foreign key between core tables.
"""

from __future__ import annotations

import pandas as pd
from psycopg import sql
from sqlalchemy.engine import Connection

from ..db import catalog
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from . import mapping
from .seed import email_taken, user_candidates

COLUMNS = ["kind", "table", "key", "org_id", "detail"]
DUPLICATE_EMAIL = "duplicate email (not migrated)"
CONFLICTING_ROLES = "user in several orgs with conflicting roles"
NO_ROLE = "membership without a role"
ORG_GONE = "row whose org no longer exists"
ARRAY_NO_ORG = "org id in user.org_ids that matches no org"
PARENT_ELSEWHERE = "child whose parent maps to a different tenant"
KINDS = [DUPLICATE_EMAIL, CONFLICTING_ROLES, NO_ROLE, ORG_GONE, ARRAY_NO_ORG, PARENT_ELSEWHERE]


def _rows(conn: Connection, query: sql.Composable) -> list[tuple]:
    return conn.exec_driver_sql(render(conn, query)).all()


def _key(conn: Connection, p, table: str, row: str) -> tuple[sql.Composable, sql.Composable]:
    """A row's key as text, and the ORDER BY for it (ctid for a table without a primary key)."""
    st = catalog.table_state(conn, p.schema_, table)
    cols = st.pk_columns
    if not cols:
        return sql.SQL("{}.ctid::text").format(sql.Identifier(row)), sql.SQL("{}.ctid").format(sql.Identifier(row))
    key = sql.SQL("concat_ws(',', {})").format(sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(row, c)) for c in cols))
    return key, sql.SQL(", ").join(sql.Identifier(row, c) for c in cols)


def ambiguities(rb) -> pd.DataFrame:
    """Every case the mapping did not guess, one row each (empty when legacy.enabled is false)."""
    p = rb.params
    if not mapping.enabled(p):
        return pd.DataFrame(columns=COLUMNS)
    s = p.schema_
    out: list[dict] = []

    def add(kind: str, table: str, rows: list[tuple]) -> None:
        out.extend({"kind": kind, "table": table, "key": str(k), "org_id": o, "detail": d} for k, o, d in rows)

    with rb.engine.connect() as conn:
        mapping.check_legacy_tables(conn, p)
        users_exist = catalog.relation_oid(conn, s, "users") is not None
        taken = sql.SQL(" OR ") + email_taken(p, "c") if users_exist else sql.SQL("")
        add(DUPLICATE_EMAIL, mapping.users_label(p), _rows(conn, sql.SQL(
            "SELECT c.id, NULL::bigint, CASE WHEN c.n > 1 THEN 'same normalised email as legacy user ' || c.first_id "
            "|| ', which is migrated; not merged' ELSE 'normalised email already used by another users row' END "
            "FROM ({cand}) c WHERE c.n > 1{taken} ORDER BY c.id").format(cand=user_candidates(p), taken=taken)))

        pairs = mapping.pairs_cte(p)
        add(CONFLICTING_ROLES, mapping.memberships_label(p), _rows(conn, sql.SQL(
            "WITH {pairs} SELECT 'user ' || user_id || ' in org ' || org_id, org_id, "
            "sources || ' -> ' || role || ' (the least privileged)' FROM pairs "
            "WHERE org_exists AND cardinality(roles) > 1 ORDER BY user_id, org_id").format(pairs=pairs)))
        add(NO_ROLE, mapping.memberships_label(p), _rows(conn, sql.SQL(
            "WITH {pairs} SELECT 'user ' || user_id || ' in org ' || org_id, org_id, "
            "'neither org_user nor role_ids names a role -> ' || {least} FROM pairs "
            "WHERE org_exists AND roles IS NULL ORDER BY user_id, org_id").format(
            pairs=pairs, least=sql.Literal(mapping.least_role(p)))))
        for m in (m for m in mapping.source(p).memberships if m.arrays):
            add(ARRAY_NO_ORG, m.table, _rows(conn, sql.SQL(
                "SELECT 'user ' || u.{uk}, a.org_id, 'no membership is created for it' "
                "FROM {table} u CROSS JOIN LATERAL unnest(u.{orgs}) AS a(org_id) "
                "WHERE a.org_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {org} o WHERE {key} = a.org_id) "
                "ORDER BY u.{uk}, a.org_id").format(uk=sql.Identifier(m.user), table=sql.Identifier(s, m.table),
                                                    orgs=sql.Identifier(m.tenant), org=mapping.org_table(p),
                                                    key=mapping.org_key("o", p))))

        for table, spec in mapping.mapped_tables(p).items():
            if not spec.org_column:
                continue
            key, order = _key(conn, p, table, "x")
            t, oc = sql.Identifier(s, table), sql.Identifier("x", spec.org_column)
            no_parent = sql.SQL("")
            if spec.parent is not None:
                parent_pk = mapping.parent_key(conn, p, spec.parent.table)
                no_parent = sql.SQL(" AND NOT EXISTS (SELECT 1 FROM {pt} pr WHERE pr.{pk} = x.{col})").format(
                    pt=sql.Identifier(s, spec.parent.table), pk=sql.Identifier(parent_pk),
                    col=sql.Identifier(spec.parent.column))
            add(ORG_GONE, table, _rows(conn, sql.SQL(
                "SELECT {key}, {oc}, 'goes to the System Tenant' FROM {t} x WHERE {oc} IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM {org} o WHERE {okey} = {oc}){no_parent} ORDER BY {order}").format(
                key=key, oc=oc, t=t, org=mapping.org_table(p), okey=mapping.org_key("o", p), no_parent=no_parent,
                order=order)))
            if spec.parent is None:
                continue
            parent_row = sql.Identifier("pr")
            parent_org = mapping.effective_org(conn, p, spec.parent.table, parent_row)
            own_org = sql.SQL("(SELECT {okey} FROM {org} o WHERE {okey} = {oc})").format(
                okey=mapping.org_key("o", p), org=mapping.org_table(p), oc=oc)
            add(PARENT_ELSEWHERE, table, _rows(conn, sql.SQL(
                "SELECT {key}, {oc}, {ptable} || ' ' || pr.{pk} || ' belongs to ' || CASE WHEN e.po IS NULL "
                "THEN 'the System Tenant' ELSE 'org ' || e.po END || '; the row follows its parent' "
                "FROM {t} x JOIN {pt} pr ON pr.{pk} = x.{col} CROSS JOIN LATERAL (SELECT {parent_org} AS po) e "
                "WHERE {oc} IS NOT NULL AND {own_org} IS DISTINCT FROM e.po ORDER BY {order}").format(
                key=key, oc=oc, ptable=sql.Literal(spec.parent.table), pk=sql.Identifier(parent_pk), t=t, pt=sql.Identifier(s, spec.parent.table),
                col=sql.Identifier(spec.parent.column), parent_org=parent_org, own_org=own_org, order=order)))
    frame = pd.DataFrame(out, columns=COLUMNS)
    if all(o is None or isinstance(o, int) for o in frame["org_id"]):
        frame["org_id"] = frame["org_id"].astype("Int64")
    else:  # text or uuid keys: shown as they are written
        frame["org_id"] = frame["org_id"].map(lambda o: None if o is None else str(o))
    return frame


def ambiguity_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Cases per kind (every kind listed, zero where there are none): deterministic, for nbval."""
    counts = frame.groupby(["kind", "table"]).size().rename("cases").reset_index()
    missing = [{"kind": k, "table": "", "cases": 0} for k in KINDS if k not in set(counts["kind"])]
    out = pd.concat([counts, pd.DataFrame(missing, columns=["kind", "table", "cases"])], ignore_index=True)
    out["order"] = out["kind"].map({k: i for i, k in enumerate(KINDS)})
    return out.sort_values(["order", "table"]).drop(columns="order").reset_index(drop=True)


def examples(frame: pd.DataFrame, per_kind: int = 3) -> pd.DataFrame:
    """The first few cases of each kind (the archive's CSV has them all)."""
    return frame.groupby("kind", sort=False).head(per_kind).reset_index(drop=True)


def write_csv(frame: pd.DataFrame, path) -> None:
    frame.to_csv(path, index=False)


# --- validate -------------------------------------------------------------------------------------

def tenant_counts(rb) -> pd.DataFrame:
    """Rows per table and tenant (tenant name and uuid), for the chart and the per-tenant sums."""
    p = rb.params
    parts = []
    with rb.engine.connect() as conn:
        for table in p.tables:
            st = catalog.table_state(conn, p.schema_, table)
            if not st.has_column:
                continue
            parts.append(sql.SQL("SELECT {name} AS table_name, x.{c} AS tenant_id, count(*) AS rows FROM {t} x "
                                 "GROUP BY x.{c}").format(name=sql.Literal(table), c=sql.Identifier(TENANT_COLUMN),
                                                          t=st.qualified))
        if not parts or catalog.relation_oid(conn, p.schema_, "tenants") is None:
            return pd.DataFrame(columns=["table", "tenant", "tenant_id", "rows"])
        query = sql.SQL("SELECT c.table_name, coalesce(tn.name, '(no such tenant)'), c.tenant_id, c.rows "
                        "FROM ({u}) c LEFT JOIN {tenants} tn ON tn.id = c.tenant_id "
                        "ORDER BY c.table_name, c.rows DESC, c.tenant_id").format(
            u=sql.SQL(" UNION ALL ").join(parts), tenants=sql.Identifier(p.schema_, "tenants"))
        rows = _rows(conn, query)
    return pd.DataFrame(rows, columns=["table", "tenant", "tenant_id", "rows"])


def conservation(rb, baseline: pd.DataFrame, system_id: int | None) -> list[tuple[str, str, object, object]]:
    """(check, table, expected, actual) rows for validate."""
    p = rb.params
    if not mapping.enabled(p) or system_id is None:
        return []
    out: list[tuple[str, str, object, object]] = []
    s = p.schema_
    counts = tenant_counts(rb)
    with rb.engine.connect() as conn:
        maps = mapping.map_tables_exist(conn, p)
        for table in p.tables:
            if table not in baseline.index:
                continue
            mine = counts[counts["table"] == table]
            known = int(mine.loc[mine["tenant"] != "(no such tenant)", "rows"].sum())
            # the application may write meanwhile: every row of the table now, each under one existing tenant
            out.append(("rows per tenant add up to the table's rows", table, int(mine["rows"].sum()), known))
        org_count = int(conn.exec_driver_sql(render(conn, sql.SQL("SELECT count(*) FROM {}").format(
            mapping.org_table(p)))).scalar())
        if not maps:
            out.append(("each legacy org has its tenant", mapping.tenants_label(p), org_count, "mapping not in the ledger"))
            return out
        ot, um = mapping.ledger_table(p, "org_tenants"), mapping.ledger_table(p, "user_map")
        tenants = sql.Identifier(s, "tenants")
        out.append(("each legacy org has its tenant", mapping.tenants_label(p), org_count, int(conn.exec_driver_sql(
            render(conn, sql.SQL(
                "SELECT count(*) FROM {org} o JOIN {ot} m ON m.org_id = {key} JOIN {tenants} t ON t.id = m.tenant_id "
                "AND t.uuid = {uuid}").format(org=mapping.org_table(p), key=mapping.org_key("o", p), ot=ot,
                                              tenants=tenants, uuid=mapping.org_tenant_uuid(p)))).scalar())))
        for table, spec in mapping.mapped_tables(p).items():
            wrong = conn.exec_driver_sql(render(conn, mapping.misplaced_rows_query(conn, p, table, system_id))).scalar()
            out.append(("rows carry the tenant of their org (recomputed from legacy data)", table, 0, int(wrong)))

        pairs = mapping.pairs_cte(p)
        ut = sql.Identifier(s, "user_tenants")
        expected, exact = conn.exec_driver_sql(render(conn, sql.SQL(
            "WITH {pairs} SELECT count(*), count(*) FILTER (WHERE (SELECT count(*) FROM {ut} x "
            "  WHERE x.user_id = um.user_id AND x.tenant_id = ot.tenant_id AND x.role = pr.role) = 1) "
            "FROM pairs pr JOIN {um} um ON um.legacy_user_id = pr.user_id JOIN {ot} ot ON ot.org_id = pr.org_id").format(
            pairs=pairs, ut=ut, um=um, ot=ot))).one()
        out.append(("each legacy (user, org) pair has exactly one membership, with its mapped role", "user_tenants",
                    int(expected), int(exact)))
        extra = conn.exec_driver_sql(render(conn, sql.SQL(
            "WITH {pairs} SELECT count(*) FROM {ut} x JOIN {ot} ot ON ot.tenant_id = x.tenant_id "
            "WHERE NOT EXISTS (SELECT 1 FROM pairs pr JOIN {um} um ON um.legacy_user_id = pr.user_id "
            "  WHERE um.user_id = x.user_id AND pr.org_id = ot.org_id)").format(pairs=pairs, ut=ut, ot=ot, um=um))).scalar()
        out.append(("memberships of org tenants without a legacy pair", "user_tenants", 0, int(extra)))
        legacy_users, accounted = conn.exec_driver_sql(render(conn, sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE EXISTS (SELECT 1 FROM {um} m JOIN {users} us ON us.id = m.user_id "
            "  AND us.uuid = c.uuid WHERE m.legacy_user_id = c.id) OR ((c.n > 1 OR {taken}) AND NOT EXISTS "
            "  (SELECT 1 FROM {um} m WHERE m.legacy_user_id = c.id))) FROM ({cand}) c").format(
            um=um, users=sql.Identifier(s, "users"), cand=user_candidates(p), taken=email_taken(p, "c")))).one()
        out.append(("each legacy user is migrated or listed as a duplicate", mapping.users_label(p), int(legacy_users),
                    int(accounted)))
        seen: set[tuple] = set()
        for fk in catalog.foreign_keys(conn, s, p.tables):
            cols = [(c, r) for c, r in zip(fk.cols, fk.ref_cols) if c != TENANT_COLUMN]
            if not cols or fk.child == fk.parent or (fk.child, fk.parent, tuple(cols)) in seen:
                continue
            if p.cross_tenant.rule(fk.child, fk.name) == "child":
                continue  # accepted across tenants (cross_tenant.foreign_keys): the lint lists it with its reason
            seen.add((fk.child, fk.parent, tuple(cols)))
            if not all(catalog.table_state(conn, s, t).has_column for t in (fk.child, fk.parent)):
                continue  # validate already fails on the missing tenant_id
            # children whose parent is not in their own tenant: a join on tenant_id and the key (colocated once
            # Citus distributes both by tenant_id; a join on the key alone needs a repartition join there). The
            # foreign key keeps every parent present, so this counts exactly the children under another tenant.
            join = sql.SQL(" AND ").join(sql.SQL("pr.{} = ch.{}").format(sql.Identifier(r), sql.Identifier(c))
                                         for c, r in cols)
            present = sql.SQL(" AND ").join(sql.SQL("ch.{} IS NOT NULL").format(sql.Identifier(c)) for c, _ in cols)
            differ = conn.exec_driver_sql(render(conn, sql.SQL(
                "SELECT count(*) FROM {child} ch LEFT JOIN {parent} pr ON pr.{c} = ch.{c} AND {join} "
                "WHERE {present} AND pr.{ref} IS NULL").format(
                child=sql.Identifier(s, fk.child), parent=sql.Identifier(s, fk.parent), join=join, present=present,
                c=sql.Identifier(TENANT_COLUMN), ref=sql.Identifier(cols[0][1])))).scalar()
            out.append((f"child rows carry their parent's tenant ({fk.parent} via {', '.join(c for c, _ in cols)})",
                        fk.child, 0, int(differ)))
    return out
