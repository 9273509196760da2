"""Shared pieces of the benchmarks: template databases, identical copies, probes, results.

Everything runs on the local env's embedded server, in databases named bench_*; templates are built
once and reused by later runs (a comment on the database records how it was built). Runbook and naive
approach always work on identical copies (CREATE DATABASE … TEMPLATE) in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg import sql

from runbook_helpers import demo, params as params_mod
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.db.server import EmbeddedServer
from runbook_helpers.run.session import PhaseSession

RESULTS = Path(__file__).resolve().parent / "results"
ENV = "local"
TEMPLATE_VERSION = "3"  # 3: the demo has the legacy application's login role


def server() -> EmbeddedServer:
    srv = EmbeddedServer(ENV)
    srv.start()
    return srv


def base_params() -> params_mod.Params:
    """The local env (embedded server) with base.yaml's settings for what is measured: local.yaml shrinks
    batches and turns on RLS, composite keys and the Drizzle hand-over for the demo's sake; a benchmark
    measures the defaults a real environment gets (one core table, no other table to rewrite keys of)."""
    import yaml

    from runbook_helpers import paths
    base = yaml.safe_load((paths.params_dir() / "base.yaml").read_text())
    return params_mod.override(params_mod.load(ENV), {k: base[k] for k in ("backfill", "rls", "distribution",
                                                                          "drizzle")})


def admin() -> psycopg.Connection:
    return psycopg.connect(server().url(), autocommit=True)


def ensure_template(name: str, rows: int, prepare: list[str] = (), scale: float = 0.01, log=print) -> str:
    """A demo database with `rows` workflows (other tables tiny), then `prepare` statements; built once."""
    marker = f"bench v{TEMPLATE_VERSION} rows={rows} scale={scale} prepare={list(prepare)}"
    with admin() as conn:
        found = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                             (name,)).fetchone()
    if found and found[0] == marker:
        return name
    log(f"building template {name} ({rows:,} workflows) ...")
    t0 = time.monotonic()
    demo.build(server().url(), name, system_uuid=str(base_params().system_tenant.uuid), rows=rows, scale=scale,
               log=lambda *_: None)
    with psycopg.connect(server().url(name), autocommit=True) as conn:
        for statement in prepare:
            conn.execute(statement)
        conn.execute("VACUUM (ANALYZE, FREEZE)")
    with admin() as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(marker)))
    log(f"  built in {time.monotonic() - t0:.0f} s")
    return name


def clone(template: str, name: str) -> str:
    with admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        strategy = sql.SQL(" STRATEGY FILE_COPY") if conn.info.server_version >= 150000 else sql.SQL("")
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
                     + strategy)
        conn.execute("CHECKPOINT")
    return name


def drop(name: str) -> None:
    with admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def url(name: str) -> str:
    return server().url(name)


def session(phase: str, database: str, overrides: dict[str, Any] | None = None) -> PhaseSession:
    overrides = dict(overrides or {})
    tables = overrides.pop("tables", None)
    params = params_mod.override(base_params(), overrides)
    if tables:
        data = params.model_dump(by_alias=True)
        data["core_tables"] = {t: data["core_tables"].get(t, {}) for t in tables}
        params = params_mod.Params.model_validate(data)
    return PhaseSession(phase, params=params, database_name=database, log=lambda *_: None)


def run(phase: str, database: str, overrides: dict[str, Any] | None = None) -> dict:
    return run_phase(session(phase, database, overrides))


def only(table: str = "workflows", **backfill) -> dict[str, Any]:
    """Params overrides: the spec reduced to one core table (the others are tiny and irrelevant here)."""
    out: dict[str, Any] = {"tables": [table], "validate": {"smoke_queries": []}}
    if backfill:
        out["backfill"] = backfill
    return out


class Probe(threading.Thread):
    """Runs a tiny statement every few ms from its own connection and records how long each took:
    the longest time is how long the probe's lock was unavailable (from the outside, not the DDL's timer)."""

    def __init__(self, database: str, statement: str, every_s: float = 0.005):
        super().__init__(daemon=True)
        self.database, self.statement, self.every_s = database, statement, every_s
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        self._stop_event = threading.Event()
        self.errors = 0

    def run(self) -> None:
        with psycopg.connect(url(self.database), autocommit=True) as conn:
            while not self._stop_event.is_set():
                t0 = time.monotonic()
                try:
                    conn.execute(self.statement)
                except psycopg.Error:
                    self.errors += 1
                self.samples.append((t0, time.monotonic() - t0))
                time.sleep(self.every_s)

    def stop(self) -> "Probe":
        self._stop_event.set()
        self.join(30)
        return self

    def max_ms(self, start: float | None = None, end: float | None = None) -> float:
        window = [s for t, s in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return 1000 * max(window) if window else 0.0


class WaitSampler(threading.Thread):
    """What a role's active sessions are doing, every few ms from pg_stat_activity: the wait event (or "CPU"
    when active and waiting on nothing), for the evidence of what a latency tail waits on."""

    SQL = ("SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity "
           "WHERE usename = %s AND state = 'active' AND pid <> pg_backend_pid()")

    def __init__(self, database: str, role: str, every_s: float = 0.01):
        super().__init__(daemon=True)
        self.database, self.role, self.every_s = database, role, every_s
        self.samples: list[tuple[float, str]] = []  # (time.time(), event) per active session per poll
        self.polls: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with psycopg.connect(url(self.database), autocommit=True) as conn:
            while not self._stop_event.is_set():
                now = time.time()
                self.polls.append(now)
                self.samples += [(now, r[0]) for r in conn.execute(self.SQL, (self.role,))]
                time.sleep(self.every_s)

    def stop(self) -> "WaitSampler":
        self._stop_event.set()
        self.join(30)
        return self

    def shares(self, start: float, end: float, top: int = 5) -> str:
        """The events seen in [start, end], as the average number of the role's sessions in each (and its share
        of all active-session samples): the top ones, most first."""
        polls = sum(1 for t in self.polls if start <= t <= end)
        seen = Counter(e for t, e in self.samples if start <= t <= end)
        total = sum(seen.values())
        if not polls or not total:
            return "no active session seen"
        return ", ".join(f"{e} {n / polls:.2f} ({100 * n / total:.0f}%)" for e, n in seen.most_common(top))


@dataclass
class Report:
    name: str
    command: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    size: str | None = None  # one of several sizes the benchmark is reported at ("1,000,000 rows"): its own file

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def save_and_print(self) -> dict[str, Any]:
        data = {"benchmark": self.name, "command": self.command, "machine": machine(), "rows": self.rows,
                "notes": self.notes, "size": self.size}
        RESULTS.mkdir(exist_ok=True)
        slug = self.name.split()[0].lower() + ("_" + "".join(c for c in self.size if c.isdigit()) if self.size else "")
        (RESULTS / f"{slug}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\n{self.name}   ({self.command})")
        if self.rows:
            cols = list(dict.fromkeys(k for r in self.rows for k in r))
            widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in self.rows)) for c in cols}
            print("  " + "  ".join(c.ljust(widths[c]) for c in cols))
            for r in self.rows:
                print("  " + "  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))
        for note in self.notes:
            print(f"  note: {note}")
        return data


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def machine() -> dict[str, Any]:
    with admin() as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(conn.execute("SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
                                     "('shared_buffers', 'max_wal_size', 'synchronous_commit', 'fsync')").fetchall())
    mem = None
    try:
        mem = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) // 1024
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "memory_mb": mem, "platform": platform.platform(),
            "python": platform.python_version(), "postgresql": version, "settings": settings}


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
