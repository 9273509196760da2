"""Phase 5: prove it. A table of checks, each with expected and actual; the last cell raises on any failure.

With legacy.enabled it adds the mapping's conservation checks (legacy/checks.py). Changes nothing: every
query is a read, and the smoke queries run in a READ ONLY transaction that is
rolled back (one declared `writes: true` in a read-write transaction, rolled back all the same).
"""

from __future__ import annotations

import pandas as pd
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from .. import drizzle, drizzle_schema
from ..db import catalog, fingerprint, partitions, reconcile, sizes as table_sizes
from ..db.ddl import UNDO_PHASE, Lock, Step
from ..db.names import TENANT_COLUMN
from ..db.sqltext import render
from ..distribution import citus_keys
from ..errors import RunbookError
from ..legacy import checks as legacy_checks
from ..tenancy import isolation, rls
from ..tenancy import lint as lint_mod
from . import original_schema, seed
from . import state as table_states

PHASE = "validate"
COLUMNS = ["check", "table", "expected", "actual", "passed"]


def checks(rb) -> pd.DataFrame:
    rows: list[dict] = []

    def add(check: str, table: str, expected, actual, passed: bool | None = None) -> None:
        rows.append({"check": check, "table": table, "expected": str(expected), "actual": str(actual),
                     "passed": str(expected) == str(actual) if passed is None else passed})

    baseline = rb.ledger.baseline(rb.control).set_index("table_name")
    system_id = table_states.system_tenant_id(rb)
    add("System Tenant present", "tenants", f"uuid {rb.params.system_tenant.uuid}",
        f"uuid {rb.params.system_tenant.uuid}" if system_id is not None else "missing")
    add("baseline captured", "", len(rb.params.tables), len(baseline))

    with rb.engine.connect() as conn:
        states = table_states.core_states(rb, conn)
        for name, st in states.items():
            add("tenant_id NOT NULL", name, "NOT NULL",
                "NOT NULL" if st.not_null else ("nullable" if st.has_column else "absent"))
            add("foreign key to tenants validated", name, "validated",
                "validated" if st.fk_valid else ("NOT VALID" if st.fk_name else "absent"))
            add("index led by tenant_id valid", name, "valid",
                "valid" if st.index_name else ("INVALID" if st.invalid_tenant_indexes else "absent"))
            add("no leftover NOT NULL check", name, "none", st.check_name or "none")
            if not st.has_column:
                continue
            nulls = catalog.null_tenant_count(conn, rb.schema, name)
            add("rows without tenant", name, 0, nulls)
            orphans = conn.exec_driver_sql(render(conn, sql.SQL(
                "SELECT count(*) FROM {t} x LEFT JOIN {tenants} tn ON tn.id = x.{c} "
                "WHERE x.{c} IS NOT NULL AND tn.id IS NULL").format(
                    t=sql.Identifier(rb.schema, name), c=sql.Identifier(TENANT_COLUMN),
                    tenants=sql.Identifier(rb.schema, "tenants")))).scalar()
            add("rows whose tenant does not exist", name, 0, orphans)
        for name, st in states.items():
            for check, table, expected, actual in partition_checks(rb, conn, st):
                add(check, table, expected, actual)
        for name, st in table_states.shared_states(rb, conn).items():
            add("shared table left alone", name, "no tenant_id", "tenant_id present" if st.has_column else "no tenant_id")
        before = original_schema.tables(conn, rb.params.ledger_schema)
        swapped = citus_keys.swapped(conn, rb.params.ledger_schema)
        for name, st in states.items():
            for con in (c for c in before.get(name, {}).get("constraints", []) if c["contype"] in ("p", "u")):
                now = conn.exec_driver_sql(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s AND conname = %s",
                    (st.oid, con["conname"])).scalar() if st.oid else None
                add(UNIQUENESS, f"{name}.{con['conname']}", con["definition"],
                    *_uniqueness(con["definition"], now, swapped.get((name, con["conname"]))))
        for conv in seed.CONVENTIONS.values():
            diffs = [d for d in seed.shape_differences(conn, rb.schema, conv) if not d["ok"]]
            add("follows the house convention", conv.name, "yes",
                "yes" if not diffs else "; ".join(f"{d['check']}: {d['actual']}" for d in diffs))

    for name, proof in reconciliation(rb).items():
        if isinstance(proof, reconcile.Reconciled):
            add("rows the application did not write: count unchanged", name, proof.expected_rows, proof.actual_rows)
            add("rows the application did not write: pre-existing columns unchanged (fingerprint)", name,
                proof.expected_digest, proof.actual_digest)
            add(BEFORE_RECORD, name, BEFORE_RECORD_EXPECTED, *_before_record_verdict(proof, baseline))
            continue
        if name not in baseline.index:  # no record of the application's writes: a quiet window is assumed
            add("row count equals baseline", name, "a baseline", "none captured")
            continue
        base = baseline.loc[name]
        count, fp = fingerprint.measure(rb.engine, rb.schema, name, list(base["columns"]))
        add("row count equals baseline", name, int(base["row_count"]), count)
        add("pre-existing columns unchanged (fingerprint)", name, base["fingerprint"], fp)

    for check, table, expected, actual in legacy_checks.conservation(rb, baseline, system_id):
        add(check, table, expected, actual)

    if rb.params.rls.enabled:
        with rb.engine.connect() as conn:
            problems = rls.role_problems(conn, rb.schema, rb.params.rls.app_role, rb.params.tables)
        add("application role cannot bypass isolation", rb.params.rls.app_role, "no problems",
            "; ".join(problems) or "no problems")

    for query in rb.params.validate_.smoke_queries:
        add("smoke query runs", query.name, SMOKE_WRITES if query.writes else "runs", _smoke(rb, query))
    return pd.DataFrame(rows, columns=COLUMNS)


UNIQUENESS = "every uniqueness of before is kept"
SWAPPED_BY_07 = "swapped by 07_distribute with the application's agreement (distribution.application_keys_agreed)"


def _uniqueness(was: str, now: str | None, swapped_from: str | None) -> tuple[str, bool]:
    """(actual, passed) for one key of before: the same definition passes, and so does exactly the (tenant_id, …)
    form of it where the ledger records that 07_distribute swapped this key from this definition (which it does
    only once the application agreed); any other difference fails, saying what 07 swapped where it did."""
    if now == was:
        return now, True
    if swapped_from is not None:
        agreed = citus_keys.with_tenant(swapped_from)
        if swapped_from == was and now == agreed:
            return f"{now}: {SWAPPED_BY_07}", True
        return f"{now or 'missing'}, but 07_distribute swapped {swapped_from} to {agreed}", False
    return now or "missing", False


BEFORE_RECORD = "rows the application wrote before the record opened: listed by key"
BEFORE_RECORD_EXPECTED = "none, or each listed by key"


def _before_record_verdict(proof: reconcile.Reconciled, baseline: pd.DataFrame) -> tuple[str, bool]:
    """Rows written between inspect's baseline and the opening of the record of the application's writes (the
    rollout triggers) are the application's: the runbook changes no core row before the record opens. They pass
    when each is listed by key (inserted, updated, deleted; the keys are in application_write_keys and the
    archive's application_writes.csv). A change that cannot be listed by key fails, saying why: a count and a
    fingerprint alone would let any change there pass unseen."""
    before = proof.before_record
    if before is not None and before.get("reason") is None:
        counts = before["counts"]
        listed = ", ".join(f"{n:,} {c}" for c, n in counts.items() if n)
        return (f"{listed}, each listed by key" if listed else "none"), True
    name = proof.table
    if name in baseline.index and baseline.loc[name, "fingerprint"] == proof.digest_at_start:
        return "none", True  # the record opened on the table exactly as the baseline measured it
    delta = proof.rows_at_start - int(baseline.loc[name, "row_count"]) if name in baseline.index else None
    what = f"{delta:+,} rows, content changed" if delta else "content changed"
    reason = before["reason"] if before is not None else (
        "the record was closed (06_finalize) by a version of the runbook that did not list them")
    return (f"{what}, not listed by key: {reason}; roll back (99_rollback) and run again from 01_inspect for a "
            f"baseline that lists them"), False


LEAF_INDEX_SQL = text("""
SELECT coalesce(bool_or(i.indisvalid), false) FROM pg_partition_tree((SELECT c.oid FROM pg_class c JOIN pg_namespace n
  ON n.oid = c.relnamespace WHERE n.nspname = :schema AND c.relname = :top)::regclass) t
JOIN pg_index i ON i.indexrelid = t.relid WHERE i.indrelid = CAST(:oid AS oid)
""")


def partition_checks(rb, conn, st) -> list[tuple[str, str, str, str]]:
    """Per leaf partition of a partitioned core table: what the parent's state promises for its rows, read
    from the partition itself (a query may name a partition directly): tenant_id NOT NULL, the foreign key
    to tenants validated, its part of the parent's tenant_id index valid, and, with row level security,
    the partition's own policies enabled and forced (the parent's do not apply to a direct query)."""
    out = []
    tenants_oid = table_states.tenants_oid(conn, rb.schema)
    for part in partitions.leaves(partitions.tree(conn, st, tenants_oid)):
        ps = part.state
        index = bool(conn.execute(LEAF_INDEX_SQL, {"schema": rb.schema, "top": st.index_name,
                                                           "oid": ps.oid}).scalar()) if st.index_name else False
        actual = ", ".join(["tenant_id NOT NULL" if ps.not_null else "tenant_id nullable",
                            "foreign key validated" if ps.fk_valid else "foreign key absent or NOT VALID",
                            "index attached and valid" if index else "no valid index attached"])
        out.append(("partition: tenant_id NOT NULL, foreign key, index", f"{st.name}.{ps.name}",
                    "tenant_id NOT NULL, foreign key validated, index attached and valid", actual))
        if rb.params.rls.enabled:
            own = {p["polname"] for p in rls.policies(conn, ps.oid)}
            missing = [rls.policy_name(c) for c in rls.COMMANDS if rls.policy_name(c) not in own]
            actual = ", ".join(["enabled" if ps.rls_enabled else "disabled", "forced" if ps.rls_forced else "not forced",
                                f"policies missing: {', '.join(missing)}" if missing else "tenant policies"])
            out.append(("partition: row level security of its own (direct queries)", f"{st.name}.{ps.name}",
                        "enabled, forced, tenant policies", actual))
    return out


def reconciliation(rb) -> dict[str, object]:
    """Per core table, the live proof (db/reconcile.py) where the rollout window's record is open, else None
    (no primary key, or validate before backfill): those tables are compared with the baseline instead."""
    out: dict[str, object] = {}
    with rb.engine.connect() as conn:
        states = table_states.core_states(rb, conn)
    for name, st in states.items():
        out[name] = reconcile.reconcile(rb.engine, rb.params.ledger_schema, st) if st.exists else None
    return out


def application_writes(rb) -> pd.DataFrame:
    """What the application wrote, per core table: since inspect's baseline up to the record's opening (rows
    inserted, updated, deleted, by key; or, where they cannot be listed by key, the net change and why), and since
    then (rows inserted, updated, deleted). Their keys are in application_write_keys (the archive's
    application_writes.csv). Deterministic on a quiet database: for nbval."""
    baseline = rb.ledger.baseline(rb.control).set_index("table_name")
    rows = []
    for name, proof in reconciliation(rb).items():
        if not isinstance(proof, reconcile.Reconciled):
            rows.append({"table": name, "before the record opened": "not recorded", **dict.fromkeys(reconcile.CHANGES, 0)})
            continue
        verdict, listed = _before_record_verdict(proof, baseline)
        before = verdict
        if listed and verdict != "none":
            counts = proof.before_record["counts"]
            delta = counts["inserted"] - counts["deleted"]
            before = (f"{delta:+,} rows: " if delta else "") + verdict.replace(", each listed by key", " (by key)")
        rows.append({"table": name, "before the record opened": before, **proof.changes})
    return pd.DataFrame(rows, columns=["table", "before the record opened", *reconcile.CHANGES])


def application_write_keys(rb) -> pd.DataFrame:
    """The keys of every row the application wrote (the archive's CSV): between the baseline and the record's
    opening (window "before the record opened"), then since (window "recorded")."""
    with rb.engine.connect() as conn:
        states = table_states.core_states(rb, conn)
    proofs = reconciliation(rb)
    frames = [reconcile.writes(rb.engine, rb.params.ledger_schema, st, proofs.get(name))
              for name, st in states.items() if st.exists]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=reconcile.WRITE_COLUMNS)


SIZE_COLUMNS = ["table", "rewritten", "heap before", "heap after", "indexes before", "indexes after", "total before",
                "total after", "growth"]


def sizes(rb) -> pd.DataFrame:
    """Per core table, bytes on disk before backfill (recorded in the ledger when it started) and now: heap
    (pg_relation_size), indexes (pg_indexes_size), in all (pg_total_relation_size, with TOAST); `rewritten`:
    the batches wrote a new version of its rows (a fast default rewrites none). The archive keeps it as
    table_sizes.csv."""
    before = rb.ledger.sizes(rb.control).set_index("table_name")
    checkpoints = rb.ledger.checkpoints(rb.control)
    rewritten = set(checkpoints[checkpoints["rows_updated"] > 0]["table_name"]) if len(checkpoints) else set()
    rows = []
    with rb.engine.connect() as conn:
        for name, st in table_states.core_states(rb, conn).items():
            if not st.exists:
                continue
            now = table_sizes.measure(conn, st.oid)
            names = {name} | {leaf.name for leaf in partitions.leaves(partitions.tree(conn, st))}
            was = before.loc[name] if name in before.index else None
            row = {"table": name, "rewritten": "yes" if names & rewritten else "no",
                   "heap before": None if was is None else int(was["heap_bytes"]), "heap after": now.heap,
                   "indexes before": None if was is None else int(was["index_bytes"]), "indexes after": now.indexes,
                   "total before": None if was is None else int(was["total_bytes"]), "total after": now.total}
            row["growth"] = _growth(row["total before"], now.total)
            rows.append(row)
    return pd.DataFrame(rows, columns=SIZE_COLUMNS)


def _growth(before: int | None, after: int) -> str:
    if before is None:
        return "not recorded (backfill has not started)"
    delta = after - before
    share = f" ({100.0 * delta / before:+.0f}%)" if before else ""
    return f"{delta / 1024 / 1024:+,.1f} MB{share}"


def rows_per_tenant(rb) -> pd.DataFrame:
    """Rows per core table and tenant (for the chart; the checks above prove they add up)."""
    return legacy_checks.tenant_counts(rb)


def drizzle_schema_changes(rb):
    """What the application's schema.ts declares now, as the diff of drizzle.schema_file (the archive keeps it
    with the per-table blocks as drizzle_schema.md); a note where params name no schema file."""
    from IPython.display import Markdown

    handover = drizzle_schema.build(rb)
    changes = drizzle_schema.diff(rb.params, handover)
    if changes:
        return Markdown(f"```diff\n{changes}```")
    return Markdown(drizzle_schema.markdown(handover) if rb.params.drizzle.folder else "no Drizzle project in params")


def hand_over_to_drizzle(rb, verdict: "Verdict | None" = None) -> pd.DataFrame:
    """After the verdict: record the Drizzle migrations whose end state the runbook produced
    (drizzle.record_after_validate) with created_at = the journal's `when`; empty when params name none.
    A real run only gets here when every check passed; a dry run gets here either way, so its outcome says
    what a real run would do with this `verdict`: record them, or stop before (and how many checks fail)."""
    frame = drizzle.hand_over(rb)
    if rb.dry_run and len(frame):
        if verdict is None:
            outcome = "not evaluated: dry run, and no verdict given (a real run records only after every check passed)"
        elif verdict.failed:
            outcome = (f"would not be recorded: {verdict.failed} of {verdict.total} checks would fail now, and a "
                       f"real run stops at the verdict (dry run: nothing recorded)")
        else:
            outcome = "would be recorded: every check passes now (dry run: nothing recorded)"
        frame["outcome"] = outcome
    return frame


def lint(rb) -> pd.DataFrame:
    """The tenancy lint, enforced here: every finding must pass or be accepted in params with a reason.

    With row level security off in params the findings are advice (shown, archived, not failing): an
    environment that has not opted into isolation is not failed for lacking it."""
    frame = lint_mod.run(rb)
    return frame if rb.params.rls.enabled else lint_mod.advisory(frame)


def lint_summary(frame: pd.DataFrame) -> pd.DataFrame:
    return lint_mod.summary(frame)


def isolation_summary(frame: pd.DataFrame) -> pd.DataFrame:
    return isolation.summary(frame)


def isolation_suite(rb) -> pd.DataFrame:
    """The isolation attacks, as the application role, in a transaction that is rolled back (empty when
    row level security is off, or in a dry run: probe rows draw sequence values, which PostgreSQL never
    rolls back)."""
    if not rb.params.rls.enabled or rb.dry_run:
        return pd.DataFrame(columns=isolation.COLUMNS)
    return isolation.run(rb)


SMOKE_WRITES = "runs (its writes rolled back)"


def _smoke(rb, query) -> str:
    """One smoke query: READ ONLY, or, declared `writes: true`, read-write with a short lock_timeout; rolled
    back either way (sequence values it draws stay drawn: PostgreSQL never rolls those back)."""
    with rb.engine.connect() as conn:
        try:
            with conn.begin() as tx:
                if query.writes:
                    conn.exec_driver_sql("SELECT set_config('lock_timeout', %s, true)",
                                         (f"{int(rb.params.locks.lock_timeout_ms)}ms",))
                else:
                    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                result = conn.exec_driver_sql(query.sql)
                if result.returns_rows:
                    result.fetchall()
                tx.rollback()
            return SMOKE_WRITES if query.writes else "runs"
        except DBAPIError as exc:
            return f"error: {getattr(exc.orig, 'diag', None) and exc.orig.diag.message_primary or exc.orig}"


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """Passed and failed per check (deterministic: for nbval)."""
    grouped = results.groupby("check", sort=False)["passed"].agg(passed="sum", total="count").reset_index()
    grouped["failed"] = grouped["total"] - grouped["passed"]
    return grouped[["check", "passed", "failed"]]


def assert_all_passed(results: pd.DataFrame, dry_run: bool = False, lint: pd.DataFrame | None = None,
                      isolation_results: pd.DataFrame | None = None) -> str:
    """The notebook's last cell: raise with every failed check, lint finding and isolation case."""
    lines = [f"  - {r.check} [{r.table}]: expected {r.expected}, got {r.actual}"
             for r in results[~results["passed"]].itertuples()]
    if lint is not None and len(lint):
        lines += [f"  - lint {r.rule} [{r.object}]: {r.finding}" for r in lint[lint["status"] == lint_mod.FAIL].itertuples()]
    if isolation_results is not None and len(isolation_results):
        lines += [f"  - {isolation.ISOLATION_PREFIX}{r.case} [{r.table}]: expected {r.expected}, got {r.actual}"
                  for r in isolation_results[~isolation_results["passed"]].itertuples()]
    total = len(results) + (len(lint) if lint is not None else 0) + (
        len(isolation_results) if isolation_results is not None else 0)
    if dry_run:
        return Verdict(f"dry run: {len(lines)} of {total} checks would fail at this point", len(lines), total)
    if lines:
        raise RunbookError(f"{len(lines)} of {total} checks failed:\n" + "\n".join(lines))
    return Verdict(f"all {total} checks passed", 0, total)


class Verdict(str):
    """The verdict line, with the counts behind it (the dry run's hand-over says what a real run would do)."""

    def __new__(cls, line: str, failed: int, total: int):
        verdict = super().__new__(cls, line)
        verdict.failed, verdict.total = failed, total
        return verdict


# --- undo (run by 99_rollback) ---------------------------------------------------------------------

def undo_steps(rb, conn, before) -> list[Step]:
    """What reverses validate: the Drizzle hand-over's records, so `drizzle-kit migrate` sees those
    migrations as pending again once the schema is back to before them."""
    return [Step(UNDO_PHASE, None, f"forget Drizzle's record of {m.tag}", drizzle.forget_statement(rb.params, m),
                 Lock((("__drizzle_migrations", "ROW EXCLUSIVE"),), note="Drizzle's migrations table; one row"),
                 "the schema goes back to before this migration, so Drizzle must see it as pending")
            for m in drizzle.recorded_by_runbook(conn, rb.params)]
