"""The demo application's own workload: the statements the legacy application runs, in one place.

The tests run it through every phase (the application keeps working, unchanged, and every row it writes
lands in the right tenant) and the B3 benchmark uses it as the writer whose latency it measures. As the
legacy application it knows nothing of tenants: it connects as its own role, never names tenant_id, and
does what the application does: reads by id, by org and list views on every core table; inserts of
parents and children; updates of ordinary columns; an update that moves a workflow to another org (its
rules and endpoints follow it: the rollout trigger, and the composite foreign keys' ON UPDATE CASCADE);
deletes that cascade; `INSERT … ON CONFLICT (id) DO UPDATE`. `tenant_aware=True` is the release that
follows: the same statements, each insert naming the tenant_id of its org (or its parent's), which is
what 06_finalize waits for. Every statement's kind, phase, latency and error is recorded.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

CORE_TABLES = ("workflows", "models", "rules", "decision_tables", "knowledge_bases", "templates", "widgets",
               "endpoints")
PREFIX = "wl-"  # the names of every row the workload writes


@dataclass
class Sample:
    kind: str
    phase: str
    started: float   # time.time()
    ms: float
    error: str | None = None


@dataclass
class Written:
    """What the workload wrote and still owns, so later statements can update, move and delete it."""
    workflows: list[int] = field(default_factory=list)
    rules: list[int] = field(default_factory=list)
    models: list[int] = field(default_factory=list)


def tenant_uuid(namespace: uuid.UUID, org_uuid: str) -> uuid.UUID:
    """The tenant the legacy mapping made of an org (the tenant-aware release computes it the same way)."""
    return uuid.uuid3(namespace, str(org_uuid))


class LegacyWorkload(threading.Thread):
    """One connection running the application's statements in a loop until stopped."""

    def __init__(self, url: str, *, seed: int = 7, pause_s: float = 0.002, namespace: uuid.UUID | None = None,
                 system_tenant: uuid.UUID | None = None, tenant_aware: bool = False, rate: float | None = None):
        """`namespace` and `system_tenant` (the uuids the params name) are what the tenant-aware release knows.
        `rate`: transactions per second on a fixed schedule (each latency then counts from its scheduled start,
        as pgbench -R does, so a stall is not hidden by the statements it delayed); None: as fast as `pause_s`
        allows."""
        super().__init__(daemon=True, name="legacy workload")
        self.url, self.pause_s, self.namespace, self.system_uuid = url, pause_s, namespace, system_tenant
        self.interval = 1.0 / rate if rate else None
        self._next: float | None = None
        self.tenant_aware = tenant_aware
        self.random = random.Random(seed)
        self.phase = "before"
        self.samples: list[Sample] = []
        self.written = Written()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.orgs: list[int] = []
        self.existing: dict[str, list] = {}

    # -- control
    def stop(self) -> None:
        self._stop_event.set()
        self.join(60)

    def errors(self) -> list[Sample]:
        return [s for s in self.samples if s.error]

    def counts(self) -> dict[tuple[str, str], int]:
        """Statements per (phase, kind)."""
        return dict(Counter((s.phase, s.kind) for s in self.samples))

    # -- the loop
    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a crash is an error the test must see, not a quiet thread
            self.samples.append(Sample("workload", self.phase, time.time(), 0.0, f"crashed: {type(exc).__name__}: {exc}"))

    def _loop(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            self._learn(conn)
            actions = [self.read_by_id, self.read_by_org, self.list_views, self.insert_parent, self.insert_children,
                       self.update_ordinary, self.upsert, self.insert_parent, self.insert_children,
                       self.move_workflow, self.delete_cascading]
            while not self._stop_event.is_set():
                for action in actions:
                    if self._stop_event.is_set():
                        break
                    action(conn)
                    if not self.interval:
                        time.sleep(self.pause_s)

    def _learn(self, conn: psycopg.Connection) -> None:
        """What the application knows at start: its orgs and some of its rows (ids it will read and update)."""
        self.orgs = [r[0] for r in conn.execute("SELECT id FROM org WHERE deleted_at IS NULL ORDER BY id")]
        self.org_uuid = dict(conn.execute("SELECT id, uuid::text FROM org").fetchall())
        for table in ("workflows", "models", "rules", "decision_tables", "knowledge_bases", "templates", "endpoints"):
            self.existing[table] = [r[0] for r in conn.execute(sql.SQL("SELECT id FROM {} ORDER BY id LIMIT 200").format(
                sql.Identifier(table)))]
        # the columns it was written against, named in every read as an ORM does (never tenant_id, and never
        # SELECT *: a prepared SELECT * fails once with 0A000 after any ADD COLUMN, the application's own too)
        self.columns = {t: sql.SQL(", ").join(sql.Identifier(r[0]) for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
            "AND attname <> 'tenant_id' ORDER BY attnum", (t,))) for t in CORE_TABLES}

    def _run(self, conn: psycopg.Connection, kind: str, statements) -> list | None:
        """One transaction of the application; returns the last statement's rows."""
        t0 = time.perf_counter()
        if self.interval:
            self._next = t0 if self._next is None else self._next + self.interval
            if self._next > t0:
                time.sleep(self._next - t0)
            t0 = self._next
        started = time.time() - (time.perf_counter() - t0)
        error, rows = None, None
        try:
            with conn.transaction():
                for statement, args in statements:
                    cur = conn.execute(statement, args)
                    rows = cur.fetchall() if cur.description else None
        except psycopg.Error as exc:
            error = f"{exc.sqlstate}: {(exc.diag.message_primary or str(exc)).splitlines()[0]}"
        with self._lock:
            self.samples.append(Sample(kind, self.phase, started, (time.perf_counter() - t0) * 1000, error))
        return rows if error is None else None

    def _tenant_of_org(self, conn: psycopg.Connection, org: int) -> int | None:
        if not self.tenant_aware:
            return None
        row = conn.execute("SELECT id FROM tenants WHERE uuid = %s",
                           (tenant_uuid(self.namespace, self.org_uuid[org]),)).fetchone()
        return row[0] if row else self._system_tenant(conn)

    def _row_name(self) -> str:
        return f"{PREFIX}{uuid.uuid4().hex[:12]}"

    # -- reads
    def read_by_id(self, conn) -> None:
        for table in ("workflows", "models", "rules", "decision_tables", "knowledge_bases", "templates", "endpoints"):
            self._run(conn, f"read {table} by id", [(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
                self.columns[table], sql.Identifier(table)), (self.random.choice(self.existing[table]),))])
        template = self.random.choice(self.existing["templates"])
        self._run(conn, "read widgets by key", [(sql.SQL("SELECT {} FROM widgets WHERE template_id = %s AND position = 0"
                                                         ).format(self.columns["widgets"]), (template,))])

    def read_by_org(self, conn) -> None:
        org = self.random.choice(self.orgs)
        for table in ("workflows", "models", "knowledge_bases", "endpoints"):
            self._run(conn, f"read {table} by org", [(sql.SQL("SELECT count(*) FROM {} WHERE org_id = %s").format(
                sql.Identifier(table)), (org,))])
        self._run(conn, "read rules of an org", [("SELECT count(*) FROM rules r JOIN workflows w ON w.id = r.workflow_id "
                                                  "WHERE w.org_id = %s", (org,))])

    def list_views(self, conn) -> None:
        for table in CORE_TABLES:  # the newest first, by key (an index the application has)
            order = sql.SQL("template_id DESC, position DESC" if table == "widgets" else "id DESC")
            self._run(conn, f"list {table}", [(sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 20").format(
                self.columns[table], sql.Identifier(table), order), None)])
        self._run(conn, "list active_workflows", [("SELECT id, uuid, org_id, name, updated_at FROM active_workflows "
                                                   "ORDER BY id DESC LIMIT 20", None)])

    # -- writes
    def _insert(self, conn, kind: str, table: str, values: dict, tenant: int | None = None) -> int | None:
        """INSERT … RETURNING the first column; a new uuid for `uuid`; tenant_id only when given (tenant-aware)."""
        if tenant is not None:
            values = {**values, "tenant_id": tenant}
        cols = ["uuid", *values] if table != "widgets" else list(values)
        exprs = ([sql.SQL("gen_random_uuid()")] if table != "widgets" else []) + [sql.Placeholder()] * len(values)
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(exprs),
            sql.Identifier("template_id" if table == "widgets" else "id"))
        rows = self._run(conn, kind, [(statement, tuple(values.values()))])
        return rows[0][0] if rows else None

    def _parent_tenant(self, conn, table: str, parent_id: int) -> int | None:
        if not self.tenant_aware:
            return None
        row = conn.execute(sql.SQL("SELECT tenant_id FROM {} WHERE id = %s").format(sql.Identifier(table)),
                           (parent_id,)).fetchone()
        return row[0] if row else None

    def _system_tenant(self, conn) -> int | None:
        if not self.tenant_aware:
            return None
        return conn.execute("SELECT id FROM tenants WHERE uuid = %s", (self.system_uuid,)).fetchone()[0]

    def insert_parent(self, conn) -> None:
        """A workflow, a model and a knowledge base of an org; a template with a widget (no org)."""
        org = self.random.choice(self.orgs)
        tenant = self._tenant_of_org(conn, org)
        workflow = self._insert(conn, "insert workflow", "workflows",
                                {"org_id": org, "name": self._row_name(), "definition": "{}"}, tenant)
        if workflow:
            self.written.workflows.append(workflow)
        model = self._insert(conn, "insert model", "models", {"org_id": org, "name": self._row_name(), "kind": "dmn"}, tenant)
        if model:
            self.written.models.append(model)
        self._insert(conn, "insert knowledge base", "knowledge_bases", {"org_id": org, "name": self._row_name()}, tenant)
        system = self._system_tenant(conn)
        template = self._insert(conn, "insert template", "templates", {"name": self._row_name(), "category": "workload"},
                                system)
        if template:
            self._insert(conn, "insert widget", "widgets", {"template_id": template, "position": 0, "kind": "chart"},
                         system)

    def insert_children(self, conn) -> None:
        """Rules of its own and of older workflows, a decision table, an endpoint (with its denormalised org)."""
        for workflow in [w for w in (self._own("workflows"), self.random.choice(self.existing["workflows"])) if w]:
            rule = self._insert(conn, "insert rule", "rules", {"workflow_id": workflow, "name": self._row_name(),
                                                                "expression": "x"},
                                self._parent_tenant(conn, "workflows", workflow))
            if rule:
                self.written.rules.append(rule)
        model = self._own("models") or self.random.choice(self.existing["models"])
        self._insert(conn, "insert decision table", "decision_tables", {"model_id": model, "name": self._row_name()},
                     self._parent_tenant(conn, "models", model))
        workflow = self.random.choice(self.existing["workflows"])
        org = conn.execute("SELECT org_id FROM workflows WHERE id = %s", (workflow,)).fetchone()
        self._insert(conn, "insert endpoint", "endpoints",
                     {"workflow_id": workflow, "org_id": org[0] if org else None, "method": "POST",
                      "path": f"/api/v1/workload/{uuid.uuid4()}"}, self._parent_tenant(conn, "workflows", workflow))

    def _own(self, kind: str) -> int | None:
        pool = getattr(self.written, kind)
        return self.random.choice(pool) if pool else None

    def update_ordinary(self, conn) -> None:
        workflow = self.random.choice(self.existing["workflows"])
        self._run(conn, "update workflow status", [("UPDATE workflows SET status = %s WHERE id = %s",
                                                    (self.random.choice(["draft", "active", "archived"]), workflow))])
        rule = self.random.choice(self.existing["rules"])
        self._run(conn, "update rule priority", [("UPDATE rules SET priority = priority + 1 WHERE id = %s", (rule,))])
        kb = self.random.choice(self.existing["knowledge_bases"])
        self._run(conn, "update knowledge base", [("UPDATE knowledge_bases SET embedding_model = 'text-embedding-9' "
                                                   "WHERE id = %s", (kb,))])

    def _own_workflow_to(self, conn) -> tuple[int, int, int | None] | None:
        """One of its own workflows, an org, and (tenant-aware) that org's tenant."""
        workflow = self._own("workflows")
        if workflow is None:
            return None
        org = self.random.choice(self.orgs)
        return workflow, org, self._tenant_of_org(conn, org)

    def upsert(self, conn) -> None:
        target = self._own_workflow_to(conn)
        if target is None:
            return
        workflow, org, tenant = target
        cols, vals = ("", "") if tenant is None else (", tenant_id", ", %s")
        self._run(conn, "upsert workflow by id", [(
            f"INSERT INTO workflows (id, uuid, org_id, name, definition{cols}) VALUES (%s, gen_random_uuid(), %s, %s, "
            f"'{{}}'{vals}) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
            (workflow, org, self._row_name()) + (() if tenant is None else (tenant,)))])

    def move_workflow(self, conn) -> None:
        """The application moves one of its workflows (with rules) to another org; the tenant-aware release
        moves the tenant with it (its children follow through the keys)."""
        target = self._own_workflow_to(conn)
        if target is None:
            return
        workflow, org, tenant = target
        if tenant is None:
            self._run(conn, "move workflow to another org", [("UPDATE workflows SET org_id = %s WHERE id = %s",
                                                              (org, workflow))])
        else:
            self._run(conn, "move workflow to another org", [(
                "UPDATE workflows SET org_id = %s, tenant_id = %s WHERE id = %s", (org, tenant, workflow))])

    def delete_cascading(self, conn) -> None:
        """A workflow of its own goes, its rules with it (ON DELETE CASCADE)."""
        if len(self.written.workflows) < 3:
            return
        workflow = self.written.workflows.pop(0)
        self._run(conn, "delete workflow (rules cascade)", [("DELETE FROM workflows WHERE id = %s", (workflow,))])
