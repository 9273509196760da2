"""B11 distribute on Citus

07_distribute on a real Citus cluster (Citus 13.0.5 on Debian's PostgreSQL 15, a coordinator and two workers on
127.0.0.1: tests/citus/cluster.py, the one the Citus suite starts; see bench/citus_cluster.py): the demo with
BENCH_B11_ROWS workflows (the other tables at BENCH_B11_SCALE of the demo's size), migrated through 06_finalize
with the ci env's spec (legacy mapping, RLS, composite keys) and the agreement 07 needs, once, as a template; then
per round, on a fresh copy of it: the tenant-keyed latency before distribution (every table local on the
coordinator), 07_distribute (its wall time, and per kind of step), the bytes moved, and the same latency after,
on the same database in the same round. Three rounds; medians with their spread (min-max).

Bytes moved: what the plan says Citus's copies move (the sum of its "data moved (bytes)", pg_total_relation_size
of each table before) against what Citus's shards hold after (citus_shards, every placement), for the distributed
and the reference tables apart.

Latency: as the tenant-aware application runs them (legacy_app, the login role the demo's application uses, which
Citus also uses on the workers; prepared statements; one connection, autocommit), BENCH_B11_SAMPLES times each
after a warm-up pass of as many (caches and connections warm in both states),
at (tenant_id, id) pairs drawn from the table: `SELECT … FROM workflows WHERE tenant_id = $1 AND id = $2`,
`UPDATE workflows SET name = … WHERE tenant_id = $1 AND id = $2`, and `INSERT INTO workflows (…, tenant_id)`.

Reproduce: .venv/bin/python -m bench b11   (BENCH_B11_ROWS=1000000, BENCH_B11_SCALE=0.01, BENCH_B11_ROUNDS=3,
BENCH_B11_SAMPLES=2000; needs Citus: tests/citus/build.sh, see the README's test section)
"""

from __future__ import annotations

import os
import random
import statistics
import time

import psycopg
from psycopg import sql

from runbook_helpers import demo, params as params_mod
from runbook_helpers.phases import distribute
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.run.session import PhaseSession

from . import common
from .citus_cluster import cluster_mod, missing

DSN_ENV = "RUNBOOK_BENCH_CITUS_DSN"
MIGRATED = ("inspect", "seed", "backfill", "constrain", "validate", "finalize")
AGREED = {"distribution": {"application_keys_agreed": True, "triggers": "enable_unsafe", "reference_tables": ["user"]}}
STATEMENTS = {
    "select": "SELECT id, name, definition FROM workflows WHERE tenant_id = %s AND id = %s",
    "update": "UPDATE workflows SET name = name || '.' WHERE tenant_id = %s AND id = %s",
    "insert": "INSERT INTO workflows (uuid, name, org_id, definition, tenant_id) VALUES (gen_random_uuid(), "
              "'bench ' || gen_random_uuid(), %s, '{}', %s)",
}


def rows() -> int:
    return int(os.environ.get("BENCH_B11_ROWS", "1000000"))


def scale() -> float:
    return float(os.environ.get("BENCH_B11_SCALE", "0.01"))


def rounds() -> int:
    return int(os.environ.get("BENCH_B11_ROUNDS", "3"))


def samples() -> int:
    return int(os.environ.get("BENCH_B11_SAMPLES", "2000"))


def params(cluster) -> params_mod.Params:
    """The ci env's spec on the cluster's coordinator (what make test-citus uses), with larger backfill batches for
    the template's migration (what is measured is 07, not the backfill)."""
    os.environ[DSN_ENV] = cluster.coordinator.url()
    return params_mod.override(params_mod.load("ci"), {"database": {"embedded": False, "dsn_env": DSN_ENV},
                                                       "backfill": {"batch_size": 50000}, **AGREED})


def session(p, phase: str, database: str, dry_run: bool = False) -> PhaseSession:
    return PhaseSession(phase, params=p, database_name=database, dry_run=dry_run, log=lambda *_: None)


def template(cluster, p) -> str:
    """The demo migrated through finalize on the coordinator, built once per size (a comment records how), the
    citus extension dropped again (as tests/citus/citus_fixtures.py does: nothing of Citus is used before 07, and
    CREATE DATABASE … TEMPLATE refuses a database the maintenance daemon is connected to)."""
    name = f"bench_b11_{rows()}"
    marker = f"bench b11 rows={rows()} scale={scale()} phases={list(MIGRATED)}"
    node = cluster.coordinator
    with psycopg.connect(node.url(), autocommit=True) as admin:
        found = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                              (name,)).fetchone()
    if found and found[0] == marker:
        return name
    print(f"building template {name} ({rows():,} workflows) and migrating it through finalize ...", flush=True)
    t0 = time.monotonic()
    demo.build(node.url(), name, system_uuid=str(p.system_tenant.uuid), rows=rows(), scale=scale(),
               log=lambda *_: None)
    with psycopg.connect(node.url(name), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION citus")
    for phase in MIGRATED:
        run_phase(session(p, phase, name), **({"force": True} if phase == "finalize" else {}))
    with psycopg.connect(node.url(name), autocommit=True) as conn:
        conn.execute("DROP EXTENSION citus")
        conn.execute("VACUUM (ANALYZE, FREEZE)")
    with psycopg.connect(node.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(marker)))
    print(f"  built in {time.monotonic() - t0:.0f} s", flush=True)
    return name


def latencies(url: str, seed: int) -> dict[str, list[float]]:
    """Milliseconds per statement, each kind BENCH_B11_SAMPLES times, as legacy_app, after a pass of as many that
    is not counted: before distribution the copy is fresh from CREATE DATABASE … TEMPLATE (its pages not in any
    cache), after it the shards were just written; without the warm-up the comparison measured the caches (p99
    before 4-10 ms against 1-2 ms after in a first run)."""
    rng = random.Random(seed)
    with psycopg.connect(url) as conn:
        keys = conn.execute("SELECT tenant_id, id FROM workflows TABLESAMPLE SYSTEM (5) LIMIT %s",
                            (samples(),)).fetchall()
        orgs = conn.execute("SELECT DISTINCT tenant_id, org_id FROM workflows WHERE org_id IS NOT NULL").fetchall()
    out: dict[str, list[float]] = {k: [] for k in STATEMENTS}
    legacy = url.replace("postgresql://postgres@", "postgresql://legacy_app@")
    with psycopg.connect(legacy, autocommit=True) as conn:
        for i in range(2 * samples()):  # the first pass warms the caches and connections, the second is measured
            if i == samples():
                out = {k: [] for k in STATEMENTS}
            for kind, statement in STATEMENTS.items():
                if kind == "insert":
                    tenant, org = rng.choice(orgs)
                    args = (org, tenant)
                else:
                    args = rng.choice(keys)
                t0 = time.perf_counter()
                cur = conn.execute(statement, args, prepare=True)
                if kind == "select":
                    cur.fetchall()
                out[kind].append(1000 * (time.perf_counter() - t0))
                if kind != "insert" and cur.rowcount != 1:
                    raise AssertionError(f"{kind} at {args} touched {cur.rowcount} rows")
    return out


def moved(url: str) -> dict[str, int]:
    """What Citus's shards hold after, by kind of table: every placement (a reference table once per node)."""
    with psycopg.connect(url) as conn:
        got = dict(conn.execute("SELECT citus_table_type, sum(shard_size) FROM citus_shards GROUP BY 1").fetchall())
    return {"distributed": int(got.get("distributed", 0)), "reference": int(got.get("reference", 0))}


def kind(action: str) -> str:
    if action.startswith("distribute "):
        return "distribute tables"
    if "reference table" in action:
        return "reference tables"
    if action.startswith(("re-add ", "validate ", "drop ")) and "_fk" in action:
        return "foreign keys"
    return "key swaps"


def one_round(cluster, p, tpl: str, n: int) -> dict:
    name = cluster.new_name("bench_b11")
    cluster.create_database(name, template=tpl)
    try:
        url = cluster.coordinator.url(name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
        before = latencies(url, seed=n)
        with session(p, "distribute", name, dry_run=True) as rb:
            planned = distribute.plan(rb)
        plan_bytes = {"distributed": 0, "reference": 0}
        for action, b in zip(planned["action"], planned["data moved (bytes)"].fillna(0)):
            plan_bytes["reference" if "reference table" in action else "distributed"] += int(b)
        t0 = time.monotonic()
        out = run_phase(session(p, "distribute", name))
        seconds = time.monotonic() - t0
        steps = out["applied"] if "applied" in out else None
        per_kind: dict[str, float] = {}
        if steps is not None and "seconds" in steps:
            for action, s in zip(steps["action"], steps["seconds"]):
                per_kind[kind(action)] = per_kind.get(kind(action), 0.0) + float(s or 0)
        after_bytes = moved(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
        after = latencies(url, seed=n)
        return {"seconds": seconds, "per_kind": per_kind, "steps": len(steps) if steps is not None else None,
                "plan_bytes": plan_bytes, "shard_bytes": after_bytes,
                "before": before, "after": after}
    finally:
        cluster.drop_database(name)


def spread(values: list[float]) -> str:
    return f"{min(values):,.2f}-{max(values):,.2f}"


def mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def main() -> dict:
    reason = missing()
    if reason:  # `make bench` goes on with the others; the line says how to get Citus
        print(f"\nB11 distribute on Citus: not run: {reason}", flush=True)
        return {}
    cluster = cluster_mod.cluster()
    p = params(cluster)
    tpl = template(cluster, p)
    report = common.Report("B11 distribute on Citus", "python -m bench b11", size=f"{rows():,} rows")
    results = []
    for n in range(1, rounds() + 1):
        r = one_round(cluster, p, tpl, n)
        results.append(r)
        report.add(round=n, measure="07_distribute (s)", before=None, after=round(r["seconds"], 1),
                   **{"after / before": None}, detail=", ".join(
            f"{k} {v:.1f} s" for k, v in sorted(r["per_kind"].items())) + f" ({r['steps']} steps)")
        for k in ("distributed", "reference"):
            report.add(round=n, measure=f"bytes, {k} tables", before=mb(r["plan_bytes"][k]),
                       after=mb(r["shard_bytes"][k]), detail="before: the plan's data moved; after: citus_shards, "
                                                            "every placement")
        for k in STATEMENTS:
            b, a = r["before"][k], r["after"][k]
            report.add(round=n, measure=f"{k} p50 / p99 (ms)",
                       before=f"{statistics.median(b):.2f} / {common.percentile(b, 99):.2f}",
                       after=f"{statistics.median(a):.2f} / {common.percentile(a, 99):.2f}")
        print(f"round {n} done: 07 in {r['seconds']:.1f} s", flush=True)
    secs = [r["seconds"] for r in results]
    report.add(round="median (spread)", measure="07_distribute (s)", after=f"{statistics.median(secs):.1f} "
                                                                          f"({spread(secs)})")
    for k in ("distributed", "reference"):
        ratio = [r["shard_bytes"][k] / r["plan_bytes"][k] for r in results if r["plan_bytes"][k]]
        if ratio:
            report.add(round="median (spread)", measure=f"bytes, {k} tables", **{
                "after / before": f"{statistics.median(ratio):.2f} ({spread(ratio)})"})
    for k in STATEMENTS:
        for pct in (50, 99):
            b = [common.percentile(r["before"][k], pct) for r in results]
            a = [common.percentile(r["after"][k], pct) for r in results]
            ratio = [x / y for x, y in zip(a, b)]
            report.add(round="median (spread)", measure=f"{k} p{pct} (ms)",
                       before=f"{statistics.median(b):.2f} ({spread(b)})",
                       after=f"{statistics.median(a):.2f} ({spread(a)})",
                       **{"after / before": f"{statistics.median(ratio):.2f} ({spread(ratio)})"})
    report.notes += [
        f"{rows():,} workflows, other tables at scale {scale()}; {samples():,} statements of each kind per round "
        f"before and after (after a warm-up pass of as many), as legacy_app, prepared, one connection; Citus 13.0.5, PostgreSQL 15, coordinator + 2 "
        f"workers on one machine (127.0.0.1), fsync off on the nodes",
        "before: the same database before 07 (every table local on the coordinator); after: once 07 finished"]
    return report.save_and_print()


if __name__ == "__main__":
    main()
