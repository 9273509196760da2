"""B8 partitioned table

A table range-partitioned by month into 24 partitions (100k rows, ~4k each) beside a plain table it
references: the whole migration of it, and the time per partition of each per-partition step.

Two variants on identical copies: `fast default` (tenant_id absent: ADD COLUMN on the parent, metadata only)
and `batched` (tenant_id present, NULL in every row: keyset batches per leaf partition, a checkpoint each).
Then constrain: CHECK NOT VALID on the parent, VALIDATE per partition, SET NOT NULL, FK NOT VALID + VALIDATE
per partition then on the parent, index ON ONLY + CONCURRENTLY per partition + ATTACH, ANALYZE.

Reproduce: .venv/bin/python -m bench b8    (BENCH_B8_ROWS=100000, BENCH_B8_PARTITIONS=24)
"""

from __future__ import annotations

import os
import time

import psycopg
from psycopg import sql

from . import common


def rows() -> int:
    return int(os.environ.get("BENCH_B8_ROWS", "100000"))


def parts() -> int:
    return int(os.environ.get("BENCH_B8_PARTITIONS", "24"))


def build(name: str, with_column: bool) -> str:
    with common.admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(common.url(name), autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO accounts (name) SELECT 'a' || g FROM generate_series(1, 100) g")
        conn.execute("CREATE TABLE events (id bigserial, occurred_on date NOT NULL, account_id bigint NOT NULL "
                     "REFERENCES accounts (id), payload text, PRIMARY KEY (id, occurred_on)) PARTITION BY RANGE (occurred_on)")
        for m in range(parts()):
            conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF events FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(f"events_m{m:02d}"), sql.Literal(f"{2024 + m // 12}-{m % 12 + 1:02d}-01"),
                sql.Literal(f"{2024 + (m + 1) // 12}-{(m + 1) % 12 + 1:02d}-01")))
        conn.execute("INSERT INTO events (occurred_on, account_id, payload) SELECT date '2024-01-01' + "
                     "(g %% (%s * 30)), 1 + g %% 100, md5(g::text) FROM generate_series(1, %s) g", (parts(), rows()))
        if with_column:
            conn.execute("ALTER TABLE events ADD COLUMN tenant_id bigint")
        conn.execute("VACUUM (ANALYZE, FREEZE)")
    return name


def migrate(db: str) -> dict:
    overrides = {"tables": ["accounts", "events"], "shared_tables": [], "legacy": {"enabled": False}, "validate": {"smoke_queries": []}}
    common.run("inspect", db, overrides)
    common.run("seed", db, overrides)
    t0 = time.monotonic()
    backfill = common.run("backfill", db, overrides)
    t1 = time.monotonic()
    constrain = common.run("constrain", db, overrides)
    t2 = time.monotonic()
    validate = common.run("validate", db, overrides)
    assert validate["checks"]["passed"].all()
    steps = constrain["applied"]
    events = steps[steps["table"] == "events"]
    per = {}
    for kind, prefix in (("validate NOT NULL", "validate the NOT NULL check on partition"),
                         ("validate FK", "validate the foreign key on partition"),
                         ("build index", "build the index on (tenant_id) of partition"),
                         ("attach index", "attach events_m")):
        chosen = events[events["action"].str.startswith(prefix)]
        per[kind] = (len(chosen), chosen["seconds"].mean() * 1000 if len(chosen) else 0.0)
    summary = backfill["report"].summary.set_index("table").loc["events"]
    return {"backfill_s": t1 - t0, "constrain_s": t2 - t1, "batches": int(summary["batches"]),
            "constrain_events_s": float(events["seconds"].sum()), "per": per}


def main() -> dict:
    report = common.Report("B8 partitioned table", "python -m bench b8")
    for label, with_column in (("fast default", False), ("batched", True)):
        db = build("bench_b8", with_column)
        try:
            m = migrate(db)
        finally:
            common.drop(db)
        n = parts()
        report.add(variant=label, rows=rows(), partitions=n, backfill_s=round(m["backfill_s"], 2),
                   batches=m["batches"], constrain_s=round(m["constrain_s"], 2),
                   per_partition_ms=round((m["backfill_s"] + m["constrain_s"]) * 1000 / n),
                   **{f"{k} ms/partition": round(v[1], 1) for k, v in m["per"].items()})
    return report.save_and_print()


if __name__ == "__main__":
    main()
