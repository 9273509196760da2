"""The tenancy lint: catalog rules that decide whether tenant isolation can actually hold.

Shown in 01_inspect (what is still to do), enforced in 05_validate (every finding must pass or be
accepted in params with a reason), and written as JSON into the run's archive. Each row: rule, object,
finding, status (pass | FAIL | accepted | advisory), and the reason when accepted or advisory.
An environment with row level security off (`rls.enabled: false`) gets the lint as advice: its
findings are shown and archived but do not fail validate, since nothing there claims isolation yet.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..db import catalog
from ..db.names import TENANT_COLUMN
from . import distribution, rls

COLUMNS = ["rule", "object", "finding", "status", "reason"]
PASS, FAIL, ACCEPTED, ADVISORY = "pass", "FAIL", "accepted", "advisory"

FAIL_OPEN = [
    (re.compile(r"\bis\s+null\s*\)*\s*or\b", re.I), "`… IS NULL OR …` lets a session without a tenant see every row"),
    (re.compile(r"^\s*\(?\s*true\s*\)?\s*$", re.I), "a constant true expression checks nothing"),
]
BARE_CAST = re.compile(r"current_setting\([^)]*\)\)?\s*::\s*(bigint|integer|int8|int4|numeric)", re.I)


def _expr_problems(expr: str | None, setting: str) -> list[str]:
    if expr is None:
        return []
    found = [why for pattern, why in FAIL_OPEN if pattern.search(expr)]
    if BARE_CAST.search(expr) and "nullif" not in expr.lower():
        found.append("a bare cast of current_setting() errors on '' (a reverted SET LOCAL) instead of failing closed")
    if setting not in expr and not found:
        found.append(f"does not read the tenant setting {setting}")
    return found


VIEWS_SQL = text("""
SELECT DISTINCT v.oid::regclass::text AS view, c.relname AS table,
       coalesce((SELECT option_value FROM pg_options_to_table(v.reloptions) WHERE option_name = 'security_invoker'),
                'false') AS security_invoker
FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE d.classid = 'pg_rewrite'::regclass AND n.nspname = :schema AND c.relname = ANY(:tables) AND v.oid <> c.oid
ORDER BY 1
""")

DEFINER_SQL = text("""
SELECT p.oid::regprocedure::text AS function, coalesce(array_to_string(p.proconfig, ','), '') AS config,
       p.prosrc
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
""")

BYPASS_SQL = text("""
SELECT r.rolname, r.rolsuper, r.rolbypassrls,
       array_agg(DISTINCT c.relname ORDER BY c.relname) AS tables
FROM pg_roles r
CROSS JOIN pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE (r.rolsuper OR r.rolbypassrls) AND n.nspname = :schema AND c.relname = ANY(:tables)
  AND has_table_privilege(r.oid, c.oid, 'SELECT, INSERT, UPDATE, DELETE')
GROUP BY r.rolname, r.rolsuper, r.rolbypassrls
ORDER BY 1
""")


def run(rb, conn: Connection | None = None) -> pd.DataFrame:
    """Every rule over every tenant table; accepted findings carry the reason from params."""
    if conn is None:
        with rb.engine.connect() as own:
            return run(rb, own)
    p = rb.params
    schema, tables, setting = rb.schema, p.tables, p.rls.setting
    rows: list[dict[str, Any]] = []

    def add(rule: str, obj: str, finding: str, ok: bool) -> None:
        rows.append({"rule": rule, "object": obj, "finding": finding, "status": PASS if ok else FAIL, "reason": ""})

    tenants_oid = catalog.relation_oid(conn, schema, "tenants")
    for name in tables:
        st = catalog.table_state(conn, schema, name, tenants_oid)
        if not st.exists:
            add("tenant table exists", name, "missing", False)
            continue
        add("RLS enabled and forced", name,
            "enabled, forced" if st.rls_enabled and st.rls_forced else
            ("enabled, not forced: the owner bypasses the policies" if st.rls_enabled else "RLS not enabled"),
            st.rls_enabled and st.rls_forced)
        pols = rls.policies(conn, st.oid)
        covered = set()
        for pol in pols:
            cmd = {"r": "select", "a": "insert", "w": "update", "d": "delete", "*": "all"}[pol["polcmd"]]
            if pol["polname"] == rls.LEGACY_POLICY:
                rows.append(_legacy_policy(name, pol, p.rls))
                continue
            covered |= set(rls.COMMANDS) if cmd == "all" else {cmd}
            problems = _expr_problems(pol["using_expr"], setting) + _expr_problems(pol["check_expr"], setting)
            if cmd == "insert" and pol["check_expr"] is None:
                problems.append("an INSERT policy without WITH CHECK admits any row")
            add("policy fails closed", f"{name}.{pol['polname']}", "; ".join(dict.fromkeys(problems)) or
                f"{cmd.upper()} on {setting}", not problems)
        missing = [c.upper() for c in rls.COMMANDS if c not in covered]
        add("a policy per command", name, f"no policy for {', '.join(missing)}" if missing else "SELECT, INSERT, "
            "UPDATE, DELETE covered", not missing)

    for view in conn.execute(VIEWS_SQL, {"schema": schema, "tables": tables}).mappings():
        ok = view["security_invoker"].lower() in ("true", "on", "1")
        add("views over tenant tables are security_invoker", view["view"],
            f"over {view['table']}: " + ("security_invoker" if ok else "runs with its owner's rights, bypassing the "
                                          "caller's policies"), ok)

    table_pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in tables) + r")\b", re.I)
    for fn in conn.execute(DEFINER_SQL).mappings():
        if table_pattern.search(fn["prosrc"] or ""):
            ok = "search_path=" in fn["config"]
            add("SECURITY DEFINER functions pin search_path", fn["function"],
                "search_path pinned" if ok else "touches tenant tables without a pinned search_path", ok)

    uniques = catalog.unique_without_tenant(conn, schema, tables)
    for u in uniques.itertuples():
        global_id = u.assessment.startswith("global identifier")
        scoped = u.assessment.startswith("scoped by its parent")
        add("unique keys include tenant_id", f"{u.table}.{u.name}",
            f"({u.columns}) is unique across all tenants" + (": a global identifier" if global_id else "")
            + (f": {u.assessment}" if scoped else ""), global_id or scoped)

    fks = catalog.foreign_keys(conn, schema, tables)
    plain = distribution.accepted_references(p)
    for fk in fks:
        twin = None if TENANT_COLUMN in fk.cols else distribution.covering(fk, fks)
        ok = TENANT_COLUMN in fk.cols or twin is not None
        reason = None if ok else plain.get(f"{fk.child}.{fk.name}")
        add("foreign keys between tenant tables include tenant_id", f"{fk.child}.{fk.name}",
            f"({', '.join(fk.cols)}) -> {fk.parent}" + (
                f": {twin.name} beside it includes tenant_id" if twin else
                ("" if ok else ": a row can point at another tenant's row")) + (
                " (an accepted cross-tenant reference: cross_tenant.foreign_keys, wins: child)" if reason else ""), ok)
        if reason:
            rows[-1].update(status=ACCEPTED, reason=reason)

    allowed = set(p.rls.bypass_roles) | {rb.identity.user}
    for role in conn.execute(BYPASS_SQL, {"schema": schema, "tables": tables}).mappings():
        what = "superuser" if role["rolsuper"] else "BYPASSRLS"
        ok = role["rolname"] in allowed
        add("no role bypasses RLS on tenant tables", role["rolname"],
            f"{what}, reaches {len(role['tables'])} tenant tables" + (" (the migration role, allowed)" if ok else ""), ok)

    frame = pd.DataFrame(rows, columns=COLUMNS)
    return _apply_acceptances(frame, p.rls.lint_accept)


def _legacy_policy(table: str, pol: dict, params) -> dict[str, Any]:
    """The legacy role's contract: accepted as declared in params, provided it reaches that role alone."""
    obj = f"{table}.{pol['polname']}"
    roles = list(pol["roles"] or [])
    if not params.legacy_role or roles != [params.legacy_role]:
        return {"rule": "policy fails closed", "object": obj, "finding": f"the legacy policy applies to "
                f"{', '.join(roles)}, not to rls.legacy_role ({params.legacy_role or 'none'}) alone",
                "status": FAIL, "reason": ""}
    if params.legacy_access == "all_tenants":
        return {"rule": "policy fails closed", "object": obj, "finding": f"{params.legacy_role} sees every tenant "
                f"(rls.legacy_access: all_tenants)", "status": ACCEPTED, "reason": params.legacy_reason}
    return {"rule": "policy fails closed", "object": obj, "finding": f"{params.legacy_role} sees the System Tenant "
            f"only", "status": ACCEPTED, "reason": "rls.legacy_access: system_tenant"}


def _apply_acceptances(frame: pd.DataFrame, accepted) -> pd.DataFrame:
    for item in accepted:
        mask = (frame["rule"] == item.rule) & (frame["object"] == item.object) & (frame["status"] == FAIL)
        frame.loc[mask, "status"] = ACCEPTED
        frame.loc[mask, "reason"] = item.reason
    return frame


def advisory(frame: pd.DataFrame) -> pd.DataFrame:
    """Findings as advice: FAIL becomes advisory, for an environment that does not enforce isolation."""
    frame = frame.copy()
    mask = frame["status"] == FAIL
    frame.loc[mask, "status"] = ADVISORY
    frame.loc[mask, "reason"] = "rls.enabled is false: reported, not enforced"
    return frame


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per rule: how many objects pass, fail, or are accepted (deterministic: for nbval)."""
    out = frame.groupby("rule", sort=False)["status"].value_counts().unstack(fill_value=0)
    cols = [PASS, FAIL, ACCEPTED] + ([ADVISORY] if ADVISORY in out else [])
    for col in cols:
        if col not in out:
            out[col] = 0
    return out[cols].reset_index()


def clean(frame: pd.DataFrame) -> bool:
    return not (frame["status"] == FAIL).any()
