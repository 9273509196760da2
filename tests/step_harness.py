"""The step harness (issue 25): every phase walked one step at a time, the application's contract checked
between any two steps, and every step killed and resumed.

A phase's steps are whatever it commits: each statement the Executor runs and each batch of the backfill
(runbook_helpers.faults.step_done). `faults.watch_steps` calls a function there, in the process that runs the
phase, before the next step begins, so nothing here lists steps by hand: a step added to a phase is walked,
checked and killed the day it is added.

Between steps, the contract of the application (`Application`) must hold:
- the legacy role sees every row of every core table, and its workload (a read, an insert of a parent and of a
  child, an update, a delete) succeeds, with the row counts it expects;
- the application role with a tenant set never sees a row of another tenant; where the runbook's policies are in
  force on a table it sees exactly its tenant's rows, without an error.
A kill right after any step, then a re-run, must end in the state an uninterrupted run ends in (the catalog,
without the runbook's ledger, and a fingerprint of every table's rows).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable

import psycopg
from psycopg import sql

from runbook_helpers import faults
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.tenancy import rls


class StepKilled(BaseException):
    """Raised between two steps to stop a phase there, as a kill would (BaseException: nothing may catch it)."""


@dataclass
class Application:
    """What one schema's application does and may expect: its core tables, roles and a workload."""
    tables: list[str]
    legacy_role: str
    app_role: str
    setting: str
    workload: Callable[[psycopg.Connection, int | None], None]  # (the legacy role's connection, tenant_id to name)
    tenant_of_workload: str  # SQL: the tenant the workload's rows belong to (tenant-aware inserts name it)


def demo_workload(conn: psycopg.Connection, tenant: int | None) -> None:
    """The demo's legacy application (tenant=None), or its tenant-aware release (names tenant_id)."""
    cols, vals = ("", "") if tenant is None else (", tenant_id", f", {int(tenant)}")
    expect(conn, "SELECT count(*) >= 0 FROM workflows WHERE org_id = 3", None, True)
    workflow = conn.execute(f"INSERT INTO workflows (uuid, name, org_id, definition{cols}) VALUES (gen_random_uuid(), "
                            f"'harness ' || gen_random_uuid(), 3, '{{}}'{vals}) RETURNING id").fetchone()[0]
    rule = conn.execute(f"INSERT INTO rules (uuid, workflow_id, name, expression{cols}) VALUES (gen_random_uuid(), %s, "
                        f"'harness', 'x'{vals}) RETURNING id", (workflow,)).fetchone()[0]
    rowcount(conn, "UPDATE workflows SET name = name || ', renamed' WHERE id = %s", (workflow,), 1)
    expect(conn, "SELECT count(*) FROM rules WHERE workflow_id = %s", (workflow,), 1)
    rowcount(conn, "DELETE FROM rules WHERE id = %s", (rule,), 1)
    rowcount(conn, "DELETE FROM workflows WHERE id = %s", (workflow,), 1)


def shop_workload(conn: psycopg.Connection, tenant: int | None) -> None:
    """The shop's legacy application: a copy of a film into store 2's inventory, rented, returned, removed."""
    cols, vals = ("", "") if tenant is None else (", tenant_id", f", {int(tenant)}")
    expect(conn, "SELECT count(*) >= 0 FROM customer WHERE store_id = 2", None, True)
    item = conn.execute(f"INSERT INTO inventory (film_id, store_id{cols}) VALUES ((SELECT min(film_id) FROM film), 2"
                        f"{vals}) RETURNING inventory_id").fetchone()[0]
    rental = conn.execute("SELECT coalesce(max(rental_id), 0) + 1000000 FROM rental").fetchone()[0]
    conn.execute(f"INSERT INTO rental (rental_id, rental_date, inventory_id, customer_id{cols}) VALUES (%s, now(), %s, "
                 f"(SELECT min(customer_id) FROM customer WHERE store_id = 2){vals})", (rental, item))
    rowcount(conn, "UPDATE rental SET return_date = now() WHERE rental_id = %s", (rental,), 1)
    expect(conn, "SELECT count(*) FROM rental WHERE inventory_id = %s", (item,), 1)
    rowcount(conn, "DELETE FROM rental WHERE rental_id = %s", (rental,), 1)
    rowcount(conn, "DELETE FROM inventory WHERE inventory_id = %s", (item,), 1)


def expect(conn, query: str, args, value) -> None:
    got = conn.execute(query, args).fetchone()[0]
    if got != value:
        raise AssertionError(f"{query} returned {got!r}, expected {value!r}")


def rowcount(conn, query: str, args, rows: int) -> None:
    got = conn.execute(query, args).rowcount
    if got != rows:
        raise AssertionError(f"{query} changed {got} rows, expected {rows}")


DEMO = Application(
    tables=["workflows", "models", "rules", "decision_tables", "knowledge_bases", "templates", "widgets", "endpoints"],
    legacy_role="legacy_app", app_role="app_user", setting="app.current_tenant_id", workload=demo_workload,
    tenant_of_workload="SELECT tenant_id FROM workflows WHERE org_id = 3 AND tenant_id IS NOT NULL LIMIT 1")
SHOP = Application(
    tables=["store", "staff", "customer", "inventory", "rental", "payment"],
    legacy_role="shop_legacy", app_role="shop_app", setting="app.current_tenant_id", workload=shop_workload,
    tenant_of_workload="SELECT tenant_id FROM inventory WHERE store_id = 2 AND tenant_id IS NOT NULL LIMIT 1")


def _has_column(conn, table: str, column: str) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s "
                        "AND NOT attisdropped)", (table, column)).fetchone()[0]


def _role_exists(conn, role: str) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s)", (role,)).fetchone()[0]


def _may_read(conn, role: str, table: str) -> bool:
    return conn.execute("SELECT has_table_privilege(%s, to_regclass(%s), 'SELECT')", (role, table)).fetchone()[0]


def _policies_in_force(conn, table: str) -> bool:
    """Row level security on, with the runbook's policies: the application role must see its tenant's rows."""
    return conn.execute("SELECT c.relrowsecurity AND EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid) "
                        "FROM pg_class c WHERE c.oid = to_regclass(%s)", (table,)).fetchone()[0]


def contract_problems(url: str, app: Application, workloads: tuple[bool, ...] = (False,)) -> list[str]:
    """What the application would meet now: [] when its contract holds. `workloads`: which releases of the
    application run now (False: the legacy one, True: the tenant-aware one, which names tenant_id)."""
    problems: list[str] = []
    with psycopg.connect(url) as conn:
        if rls.has_citus(conn):  # counts only: one connection per worker, not Citus's fan-out over many (4x faster)
            conn.execute("SET citus.max_adaptive_executor_pool_size = 1")
        conn.commit()  # the snapshot below is the next transaction's first
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")  # every count below reads one snapshot
        tenants: list[int] = []
        for table in app.tables:
            total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
            problems += _as_role(conn, app.legacy_role, None, None, table,
                                 lambda seen, total=total, table=table:
                                 [f"{app.legacy_role} is refused on {table}: {seen}"] if isinstance(seen, str) else
                                 [] if seen[0] == total else
                                 [f"{app.legacy_role} sees {seen[0]} of the {total} rows of {table}"])
            if not _has_column(conn, table, "tenant_id") or not _role_exists(conn, app.app_role):
                continue
            if not tenants:
                tenants = [r[0] for r in conn.execute(sql.SQL(
                    "SELECT tenant_id FROM {} WHERE tenant_id IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC LIMIT 2"
                ).format(sql.Identifier(table)))]
            # the role is held to seeing its tenant's rows where the policies are in force and it was granted the
            # table; refused (not granted yet, or revoked first by rollback) is fail-closed; another tenant's row never
            enforced = _policies_in_force(conn, table) and _may_read(conn, app.app_role, table)
            for tenant in tenants:
                own = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(sql.Identifier(table)),
                                   (tenant,)).fetchone()[0]

                def judge(seen, tenant=tenant, own=own, table=table, enforced=enforced):
                    if isinstance(seen, str):  # refused
                        return [f"{app.app_role} (tenant {tenant}) is refused on {table}: {seen}"] if enforced else []
                    mine, others = seen
                    out = [f"{app.app_role} (tenant {tenant}) sees {others} rows of other tenants in {table}"] if others else []
                    if enforced and mine != own:
                        out.append(f"{app.app_role} (tenant {tenant}) sees {mine} of its {own} rows of {table}")
                    return out
                problems += _as_role(conn, app.app_role, app.setting, tenant, table, judge)
        conn.rollback()
    for tenant_aware in workloads:
        problems += _workload_problems(url, app, tenant_aware)
    return problems


def _as_role(conn, role: str, setting: str | None, tenant: int | None, table: str, judge) -> list[str]:
    """Counts `table` as `role` (its tenant set when given): judge((own rows, other tenants' rows) or an error)."""
    conn.execute("SAVEPOINT as_role")
    try:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        if setting:  # as the application sets it (a set_config(…, true) would stay on a Citus coordinator)
            rls.set_tenant(conn, tenant, setting)
            seen = conn.execute(sql.SQL("SELECT count(*) FILTER (WHERE tenant_id = %s), count(*) FILTER (WHERE "
                                        "tenant_id IS DISTINCT FROM %s) FROM {}").format(sql.Identifier(table)),
                                (tenant, tenant)).fetchone()
        else:
            seen = (conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0], 0)
    except psycopg.Error as exc:
        seen = f"{exc.sqlstate}: {exc.diag.message_primary}"
    conn.execute("ROLLBACK TO SAVEPOINT as_role")
    conn.execute("RESET ROLE")
    return judge(seen)


def _workload_problems(url: str, app: Application, tenant_aware: bool) -> list[str]:
    tenant = None
    if tenant_aware:
        with psycopg.connect(url) as conn:
            tenant = conn.execute(app.tenant_of_workload).fetchone()[0]
    try:
        with psycopg.connect(url.replace("postgresql://postgres@", f"postgresql://{app.legacy_role}@"),
                             autocommit=True) as conn:
            app.workload(conn, tenant)
    except (psycopg.Error, AssertionError) as exc:
        return [f"the {'tenant-aware' if tenant_aware else 'legacy'} workload failed: "
                f"{getattr(exc, 'sqlstate', '') or ''} {str(exc).splitlines()[0]}"]
    return []


@dataclass
class Walk:
    """A phase run one step at a time: the contract checked after every step; what failed, by step."""
    url: str
    app: Application
    workloads: tuple[bool, ...] = (False,)  # the releases of the application running (contract_problems)
    switch: Callable[["Walk", str], None] | None = None  # changes `workloads` at a step, as a deployment would
    steps: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, where: str) -> None:
        for problem in contract_problems(self.url, self.app, self.workloads):
            self.failures.append(f"after {where}: {problem}")

    def __call__(self, detail: str) -> None:
        self.steps.append(detail)
        if self.switch:
            self.switch(self, detail)
        self.check(detail)


CITUS_CALLS = ("create_distributed_table", "create_reference_table")


def plain_distribute(db) -> list[str]:
    """07_distribute's steps that plain PostgreSQL can run, in plan order: all but Citus's own calls (which are never
    stubbed; the phase itself refuses without Citus before its first change)."""
    from runbook_helpers.phases import distribute
    with db.session("distribute", params=db.params) as rb:
        steps = distribute.analyse(rb).steps
        plain = [s for s in steps if not any(call in str(s.statement.as_string(None)) for call in CITUS_CALLS)]
        rb.executor().run_all(plain)
    return [s.action for s in plain]


def has_citus(db) -> bool:
    with db.connect() as conn:
        return conn.execute(rls.CITUS_SQL).fetchone()[0]


def run(db, phase: str, **kw):
    """One phase as the harness runs it: "distribute" on a database without Citus is its plain-PostgreSQL part
    (plain_distribute); on a Citus coordinator, the phase itself (create_reference_table and
    create_distributed_table for real)."""
    if phase == "distribute" and not has_citus(db):
        return plain_distribute(db)
    return run_phase(db.session(phase), **kw)


def walk_phase(db, phase: str, walk: Walk, **kw):
    """Runs `phase` with `walk` called between its steps, and checks once more at its end."""
    with faults.watch_steps(walk):
        out = run(db, phase, **kw)
    walk.check(f"{phase} (its end)")
    return out


def warm_up(db, phase: str, **kw) -> None:
    """Runs `phase` once on a copy that is then thrown away, before the steps are recorded on another: what a phase
    creates for the whole server (constrain's application role) then exists for the recorded run as for every run
    after it, so their steps agree (on a fresh server the first run alone has a "create role" step)."""
    run(db, phase, **kw)


def recorded_steps(db, phase: str, **kw) -> list[str]:
    """The steps an uninterrupted run of `phase` commits, in order."""
    seen: list[str] = []
    with faults.watch_steps(seen.append):
        run(db, phase, **kw)
    return seen


def killed_after(db, phase: str, n: int, **kw) -> str:
    """Runs `phase` and stops it right after its n-th step (1-based); returns that step."""
    count = [0]
    hit: list[str] = []

    def stop(detail: str) -> None:
        count[0] += 1
        if count[0] == n:
            hit.append(detail)
            raise StepKilled(detail)

    try:
        with faults.watch_steps(stop):
            run(db, phase, **kw)
    except StepKilled:
        return hit[0]
    raise AssertionError(f"{phase} ended before its step {n}")


def kills_that_differ(fresh: Callable[[], object], phase: str, steps: list[str], want: dict[str, str],
                      positions: list[int], **kw) -> dict[str, list[str]]:
    """For each position n: a fresh database (`fresh()`), the phase stopped right after its n-th step, re-run; the
    end states that differ from `want` (an uninterrupted run's), by the step killed after."""
    wrong = {}
    for n in positions:
        db = fresh()
        killed = killed_after(db, phase, n, **kw)
        assert killed == steps[n - 1], "the killed run took other steps than the uninterrupted one"
        run(db, phase, **kw)
        got = end_state(db)
        if got != want:
            wrong[f"{n}/{len(steps)}: {killed}"] = differences(got, want)
    return wrong


def kind_of(step: str) -> str:
    """A step's kind: its phase and action with the names of tables, constraints, indexes and policies, and
    numbers, taken out ("constrain: add * NOT VALID")."""
    phase, _, rest = step.partition(": ")
    action = rest.split(": ", 1)[1] if ": " in rest else rest
    action = re.sub(r"\([^)]*[_\d][^)]*\)", "(…)", action)  # columns, counts
    action = re.sub(r"\b(SELECT|INSERT|UPDATE|DELETE)\b", "…", action)  # one policy per command: one kind
    return phase + ": " + " ".join("*" if re.search(r"[_\d]", w) else w for w in action.split())


def one_per_kind(steps: list[str]) -> list[int]:
    """1-based positions of the first step of each kind."""
    seen: dict[str, int] = {}
    for i, step in enumerate(steps, 1):
        seen.setdefault(kind_of(step), i)
    return sorted(seen.values())


SNAPSHOT_TABLES = """
SELECT c.oid::regclass::text, array_agg(a.attname ORDER BY a.attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
  AND coalesce(pg_get_expr(d.adbin, d.adrelid), '') !~* 'now\\(\\)|current_timestamp|gen_random_uuid|random\\(\\)'
GROUP BY c.oid ORDER BY 1
"""


def end_state(db) -> dict[str, str]:
    """The catalog (pg_dump --schema-only without the ledger) and a fingerprint of every table's rows (columns a
    clock or a random default fills, such as created_at DEFAULT now() or uuid DEFAULT gen_random_uuid(), left out:
    two runs fill them differently)."""
    state = {"catalog": db.schema_dump(exclude_ledger=True)}
    with db.connect() as conn:
        for table, columns in conn.execute(SNAPSHOT_TABLES).fetchall():
            row = sql.SQL("md5(row({})::text)").format(sql.SQL(", ").join(map(sql.Identifier, columns)))
            query = sql.SQL("SELECT count(*), md5(string_agg(h, '' ORDER BY h)) FROM (SELECT {} AS h FROM {}) AS x"
                            ).format(row, sql.SQL(table))
            state[table] = str(conn.execute(query).fetchone())
    if has_citus(db):
        state.update(citus_state(db))
    return state


# what Citus made of each table: its kind, distribution column, replication model, shard count and placements per
# node; colocation groups by the tables they hold (their ids come from a sequence), shard ids left out likewise
CITUS_TABLES = """
SELECT p.logicalrelid::regclass::text, p.partmethod, coalesce(column_to_column_name(p.logicalrelid, p.partkey), ''),
       p.repmodel, p.colocationid,
       (SELECT count(*) FROM pg_dist_shard s WHERE s.logicalrelid = p.logicalrelid),
       (SELECT coalesce(string_agg(n, ' ' ORDER BY n), '') FROM (
          SELECT format('%s:%s×%s', d.nodename, d.nodeport, count(*)) AS n FROM pg_dist_shard s
          JOIN pg_dist_placement pl USING (shardid) JOIN pg_dist_node d USING (groupid)
          WHERE s.logicalrelid = p.logicalrelid GROUP BY d.nodename, d.nodeport) AS per_node)
FROM pg_dist_partition p ORDER BY 1
"""
# a node's relations in public, with Citus's hiding of shards off
NODE_RELATIONS = """
SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'f')
"""
PLACED = """
SELECT d.nodename, d.nodeport, shard_name(s.logicalrelid, s.shardid) FROM pg_dist_shard s
JOIN pg_dist_placement pl USING (shardid) JOIN pg_dist_node d USING (groupid)
"""


def citus_state(db) -> dict[str, str]:
    """Citus's distribution state on the coordinator and its nodes: which tables are distributed (by which column),
    reference or Citus local, in which colocation groups, with how many shards where; and the leftovers: a relation
    on a worker that is neither a Citus table nor a shard placed there (on the coordinator, which also holds the
    local tables, one named as a shard of a Citus table), a placed shard missing, cleanup records Citus holds."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    with db.connect() as conn:
        tables = conn.execute(CITUS_TABLES).fetchall()
        nodes = conn.execute("SELECT nodename, nodeport, groupid = 0 FROM pg_dist_node WHERE isactive ORDER BY 1, 2"
                             ).fetchall()
        placed = conn.execute(PLACED).fetchall()
        cleanup = conn.execute("SELECT count(*) FROM pg_dist_cleanup").fetchone()[0]
    groups: dict[int, list[str]] = {}
    for table, *_, colocation, _, _ in tables:
        groups.setdefault(colocation, []).append(table)
    state = {f"citus {table}": f"{method} {column} {model} shards={shards} {where} colocated with "
                               f"{sorted(groups[colocation])}"
             for table, method, column, model, colocation, shards, where in tables}
    citus_tables = {table.strip('"').split(".")[-1] for table, *_ in tables}
    leftovers = [f"pg_dist_cleanup holds {cleanup} records"] if cleanup else []
    base = conninfo_to_dict(db.url)
    shard_of_citus_table = re.compile("^(" + "|".join(map(re.escape, citus_tables)) + r")_\d+$")
    for host, port, coordinator in nodes:
        with psycopg.connect(make_conninfo(**{**base, "host": host, "port": str(port)})) as node:
            node.execute("SET citus.override_table_visibility = off")
            present = {r[0] for r in node.execute(NODE_RELATIONS)
                       if not coordinator or shard_of_citus_table.match(r[0]) or r[0] in citus_tables}
        expected = citus_tables | {shard.split(".")[-1].strip('"') for h, p, shard in placed if (h, p) == (host, port)}
        leftovers += [f"{host}:{port}: {name} (neither a Citus table nor a shard placed there)"
                      for name in sorted(present - expected)]
        leftovers += [f"{host}:{port}: shard {name} is not there" for name in sorted(expected - present)
                      if name not in citus_tables]
    state["citus leftovers"] = repr(leftovers)
    return state


def differences(got: dict[str, str], want: dict[str, str]) -> list[str]:
    out = [f"{k}: {got.get(k)} != {want.get(k)}" for k in sorted(set(got) | set(want))
           if k != "catalog" and got.get(k) != want.get(k)]
    if got.get("catalog") != want.get("catalog"):
        import difflib
        diff = difflib.unified_diff(want["catalog"].splitlines(), got["catalog"].splitlines(), lineterm="", n=0)
        out.append("catalog differs:\n" + "\n".join(list(diff)[:40]))
    return out


def digest(state: dict[str, str]) -> str:
    return hashlib.sha256(repr(sorted(state.items())).encode()).hexdigest()[:12]
