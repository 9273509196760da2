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
from . import composite_keys, rls

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
SELECT DISTINCT v.oid::regclass::text AS view, c.relname AS table, v.relkind::text AS kind,
       coalesce((SELECT option_value FROM pg_options_to_table(v.reloptions) WHERE option_name = 'security_invoker'),
                'false') AS security_invoker,
       (SELECT rolname FROM pg_roles WHERE rolname = :role) IS NOT NULL
         AND has_table_privilege(:role, v.oid, 'SELECT') AS app_reads
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

# SECURITY DEFINER functions with their owner's power over row level security and the tenant tables they
# depend on (pg_depend: SQL-standard bodies, BEGIN ATOMIC); other bodies are matched by name (prosrc).
DEFINER_OWNER_SQL = text("""
SELECT p.oid::regprocedure::text AS function, n.nspname AS schema, r.rolname AS owner, r.rolsuper, r.rolbypassrls,
       coalesce(p.prosrc, '') AS prosrc,
       ARRAY(SELECT DISTINCT c.relname::text FROM pg_depend d JOIN pg_class c ON c.oid = d.refobjid
             JOIN pg_namespace cn ON cn.oid = c.relnamespace
             WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.refclassid = 'pg_class'::regclass
               AND cn.nspname = :schema AND c.relname = ANY(:tables)) AS depends,
       ARRAY(SELECT c.relname::text FROM pg_class c JOIN pg_namespace cn ON cn.oid = c.relnamespace
             WHERE cn.nspname = :schema AND c.relname = ANY(:tables) AND NOT c.relforcerowsecurity
               AND pg_has_role(p.proowner, c.relowner, 'USAGE')) AS owns_unforced
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_roles r ON r.oid = p.proowner
WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1
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
    for name, st in catalog.table_states(conn, schema, tables, tenants_oid).items():
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

    for view in conn.execute(VIEWS_SQL, {"schema": schema, "tables": tables, "role": p.rls.app_role}).mappings():
        if view["kind"] == "m":
            rows.append(_materialized_view(view, p.rls.app_role))
            continue
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

    rows.extend(_definers_bypassing_rls(conn, schema, tables, table_pattern, p.ledger_schema))

    uniques = catalog.unique_without_tenant(conn, schema, tables)
    for u in uniques.itertuples():
        global_id = u.assessment.startswith("global identifier")
        scoped = u.assessment.startswith("scoped by its parent")
        add("unique keys include tenant_id", f"{u.table}.{u.name}",
            f"({u.columns}) is unique across all tenants" + (": a global identifier" if global_id else "")
            + (f": {u.assessment}" if scoped else ""), global_id or scoped)

    fks = catalog.foreign_keys(conn, schema, tables)
    plain = composite_keys.accepted_references(p)
    for fk in fks:
        twin = None if TENANT_COLUMN in fk.cols else composite_keys.covering(fk, fks)
        ok = TENANT_COLUMN in fk.cols or twin is not None
        reason = None if ok else plain.get(f"{fk.child}.{fk.name}")
        add("foreign keys between tenant tables include tenant_id", f"{fk.child}.{fk.name}",
            f"({', '.join(fk.cols)}) -> {fk.parent}" + (
                f": {twin.name} beside it includes tenant_id" if twin else
                ("" if ok else ": a row can point at another tenant's row")) + (
                " (an accepted cross-tenant reference: cross_tenant.foreign_keys, wins: child)" if reason else
                "" if ok else f"; {_untwinned_todo(fk)}"), ok)
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


def _untwinned_todo(fk: catalog.ForeignKey) -> str:
    """What to do about a foreign key between tenant tables without a (tenant_id, …) twin: why none can be built,
    or what builds it (whichever unique key of its parent it references)."""
    return composite_keys.twin_refusal(fk) or (
        f"04_constrain adds its ({TENANT_COLUMN}, …) twin, and UNIQUE ({TENANT_COLUMN}, {', '.join(fk.ref_key)}) on "
        f"{fk.parent} where missing, with distribution.composite_keys")


def _materialized_view(view, app_role: str) -> dict[str, Any]:
    """A materialized view cannot be security_invoker: its rows are stored by REFRESH, which runs with its
    owner's rights, so it holds whatever the owner saw (every tenant, or nothing under FORCE). It is safe as
    long as the application role cannot read it."""
    obj = view["view"]
    if not view["app_reads"]:
        return {"rule": MATVIEW_RULE, "object": obj, "finding": f"over {view['table']}: {app_role} cannot read it",
                "status": PASS, "reason": ""}
    return {"rule": MATVIEW_RULE, "object": obj, "finding": f"over {view['table']}: {app_role} can read it, and it "
            f"holds the rows its owner saw at refresh time, not the caller's tenant's: revoke SELECT from {app_role}, "
            f"or keep one per tenant refreshed with that tenant set (and accept it with the reason)",
            "status": FAIL, "reason": ""}


MATVIEW_RULE = "materialized views over tenant tables are not readable by the application role"
DEFINER_RULE = "SECURITY DEFINER functions reading tenant tables do not bypass RLS"


def _definers_bypassing_rls(conn: Connection, schema: str, tables: list[str], table_pattern, ledger_schema: str
                            ) -> list[dict[str, Any]]:
    """A SECURITY DEFINER function runs with its owner's rights: owned by a superuser, a BYPASSRLS role or the
    owner of a table without FORCE (or a member of the owning role), it reads that table's rows of every tenant,
    whoever calls it."""
    by_lower = {t.lower(): t for t in tables}
    out = []
    for fn in conn.execute(DEFINER_OWNER_SQL, {"schema": schema, "tables": tables}).mappings():
        reads = sorted(set(fn["depends"]) | {by_lower[m.lower()] for m in table_pattern.findall(fn["prosrc"])})
        if not reads:
            continue
        obj = fn["function"]
        if fn["schema"] == ledger_schema:
            out.append({"rule": DEFINER_RULE, "object": obj, "finding": "the runbook's rollout trigger: it reads parent "
                        "rows to give a written row its tenant; removed by 06_finalize", "status": PASS, "reason": ""})
            continue
        if fn["rolsuper"] or fn["rolbypassrls"]:
            why = f"{fn['owner']} is {'a superuser' if fn['rolsuper'] else 'BYPASSRLS'}"
            bypassed = reads
        else:
            bypassed = [t for t in reads if t in fn["owns_unforced"]]  # its own, or its owning role's
            why = f"{fn['owner']} owns {', '.join(bypassed)} without FORCE ROW LEVEL SECURITY"
        if not bypassed:
            out.append({"rule": DEFINER_RULE, "object": obj, "finding": f"owner {fn['owner']} is subject to row level "
                        f"security on {', '.join(reads)}", "status": PASS, "reason": ""})
            continue
        out.append({"rule": DEFINER_RULE, "object": obj, "finding": f"reads {', '.join(bypassed)} with its owner's "
                    f"rights ({why}): every caller sees every tenant's rows; make it SECURITY INVOKER or give it an "
                    f"owner subject to row level security", "status": FAIL, "reason": ""})
    return out


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
