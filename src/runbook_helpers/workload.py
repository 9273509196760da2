"""The demo application's own workload: the statements the legacy application runs, in one place.

The tests run it through every phase (the application keeps working, unchanged, and every row it writes
lands in the right tenant) and the B3 benchmark uses it as the writer whose latency it measures. As the
legacy application it knows nothing of tenants: it connects as its own role, never names tenant_id, and
does what the application does: reads by id, by org and list views on every core table; sign-ups (a new org,
its first user and their membership, then rows under the org); inserts of parents and children; updates of ordinary columns; an update that moves a workflow to another org (its
rules and endpoints follow it: the rollout trigger, and the composite foreign keys' ON UPDATE CASCADE);
deletes that cascade; `INSERT … ON CONFLICT (id) DO UPDATE`. `tenant_aware=True` is the release that
follows: each insert names the tenant_id of its org (or its parent's), which is what 06_finalize waits for, and
every statement names its tenant the way Citus routes it to one shard once 07_distribute has sharded by tenant_id:
`WHERE tenant_id = … AND id = …`, tenant_id in every join condition, `ON CONFLICT (tenant_id, id)` (the composite
keys' UNIQUE (tenant_id, id) before distribution, the primary key after), and a move to another tenant done as
delete + insert of the workflow and its children in one transaction, with their ids and uuids (a distributed
row's tenant_id cannot be updated: Citus refuses with 0A000). It needs the composite keys (or the agreed
(tenant_id, …) keys). Only the list of the `active_workflows` view reads every tenant: the view has no tenant_id.
Every statement's kind, phase, latency and error is recorded, and the last statements of each kind
(`statements`, for EXPLAIN).
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
from psycopg.types.json import JsonbDumper

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
    moved: list[int] = field(default_factory=list)  # its workflows moved to another org (each time)


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
        self.signed_up: list[int] = []  # the orgs it created
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.orgs: list[int] = []
        self.existing: dict[str, list] = {}
        self.tenant_of: dict[tuple[str, int], int] = {}  # (table, id) -> tenant_id, of the rows it knows (tenant-aware)
        self.org_of: dict[int, int] = {}  # its own workflows' orgs
        self._tenants: dict[uuid.UUID, int] = {}
        self.statements: dict[str, list[tuple]] = {}  # kind -> the statements (and arguments) it ran last

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
            conn.adapters.register_dumper(dict, JsonbDumper)  # a jsonb value read back is written back as jsonb
            self._learn(conn)
            actions = [self.read_by_id, self.read_by_org, self.list_views, self.insert_parent, self.insert_children,
                       self.update_ordinary, self.upsert, self.insert_parent, self.insert_children,
                       self.move_workflow, self.delete_cascading]
            if not self.tenant_aware:  # the tenant-aware release signs orgs up through its own tenants
                actions.insert(4, self.sign_up)
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
            tenant = sql.SQL(", tenant_id" if self.tenant_aware else "")
            rows = conn.execute(sql.SQL("SELECT id{} FROM {} ORDER BY id LIMIT 200").format(
                tenant, sql.Identifier(table))).fetchall()
            self.existing[table] = [r[0] for r in rows]
            if self.tenant_aware:
                self.tenant_of.update(((table, r[0]), r[1]) for r in rows)
        # the columns it was written against, named in every read as an ORM does (never tenant_id, and never
        # SELECT *: a prepared SELECT * fails once with 0A000 after any ADD COLUMN, the application's own too)
        self.column_names = {t: [r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
            "AND attname <> 'tenant_id' ORDER BY attnum", (t,))] for t in CORE_TABLES}
        self.columns = {t: sql.SQL(", ").join(map(sql.Identifier, names)) for t, names in self.column_names.items()}

    def _run(self, conn: psycopg.Connection, kind: str, statements) -> list | None:
        """One transaction of the application; returns the last statement's rows."""
        def body(execute):
            rows = None
            for statement, args in statements:
                rows = execute(statement, args)
            return rows
        return self._transaction(conn, kind, body)

    def _transaction(self, conn: psycopg.Connection, kind: str, body) -> list | None:
        """One transaction of the application: body(execute) runs its statements through execute(statement, args),
        which returns their rows; returns what body returns."""
        ran: list[tuple] = []

        def execute(statement, args):
            ran.append((statement, args))
            cur = conn.execute(statement, args)
            return cur.fetchall() if cur.description else None

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
                rows = body(execute)
        except psycopg.Error as exc:
            error = f"{exc.sqlstate}: {(exc.diag.message_primary or str(exc)).splitlines()[0]}"
        with self._lock:
            self.samples.append(Sample(kind, self.phase, started, (time.perf_counter() - t0) * 1000, error))
            self.statements[kind] = ran
        return rows if error is None else None

    def _key(self, table: str, row: int, column: str = "id") -> tuple[sql.Composable, tuple]:
        """`id = %s`, and for the tenant-aware release `tenant_id = %s AND id = %s` (the row's tenant, which it knows;
        for a key naming a parent, the parent's)."""
        if not self.tenant_aware:
            return sql.SQL("{} = %s").format(sql.Identifier(column)), (row,)
        parent = table if column == "id" else {"template_id": "templates"}[column]
        return (sql.SQL("tenant_id = %s AND {} = %s").format(sql.Identifier(column)),
                (self.tenant_of[(parent, row)], row))

    def _tenant_of_org(self, conn: psycopg.Connection, org: int) -> int | None:
        if not self.tenant_aware:
            return None
        return self._tenant(conn, tenant_uuid(self.namespace, self.org_uuid[org])) or self._system_tenant(conn)

    def _tenant(self, conn: psycopg.Connection, uuid_: uuid.UUID) -> int | None:
        """A tenant's id by its uuid, read once (tenants are never renumbered)."""
        if uuid_ not in self._tenants:
            row = conn.execute("SELECT id FROM tenants WHERE uuid = %s", (uuid_,)).fetchone()
            if not row:
                return None
            self._tenants[uuid_] = row[0]
        return self._tenants[uuid_]

    def _row_name(self) -> str:
        return f"{PREFIX}{uuid.uuid4().hex[:12]}"

    # -- reads
    def read_by_id(self, conn) -> None:
        for table in ("workflows", "models", "rules", "decision_tables", "knowledge_bases", "templates", "endpoints"):
            where, args = self._key(table, self.random.choice(self.existing[table]))
            self._run(conn, f"read {table} by id", [(sql.SQL("SELECT {} FROM {} WHERE {}").format(
                self.columns[table], sql.Identifier(table), where), args)])
        where, args = self._key("widgets", self.random.choice(self.existing["templates"]), "template_id")
        self._run(conn, "read widgets by key", [(sql.SQL("SELECT {} FROM widgets WHERE {} AND position = 0").format(
            self.columns["widgets"], where), args)])

    def read_by_org(self, conn) -> None:
        org = self.random.choice(self.orgs)
        tenant = self._tenant_of_org(conn, org)
        of_tenant = sql.SQL("" if tenant is None else "tenant_id = %s AND ")
        args = (org,) if tenant is None else (tenant, org)
        for table in ("workflows", "models", "knowledge_bases", "endpoints"):
            self._run(conn, f"read {table} by org", [(sql.SQL("SELECT count(*) FROM {} WHERE {}org_id = %s").format(
                sql.Identifier(table), of_tenant), args)])
        if tenant is None:
            self._run(conn, "read rules of an org", [("SELECT count(*) FROM rules r JOIN workflows w ON w.id = "
                                                      "r.workflow_id WHERE w.org_id = %s", args)])
        else:  # tenant_id in the join condition too: Citus joins the colocated shards of that one tenant
            self._run(conn, "read rules of an org", [("SELECT count(*) FROM rules r JOIN workflows w ON w.tenant_id = "
                                                      "r.tenant_id AND w.id = r.workflow_id WHERE w.tenant_id = %s "
                                                      "AND w.org_id = %s", args)])

    def list_views(self, conn) -> None:
        tenant = self._tenant_of_org(conn, self.random.choice(self.orgs)) if self.tenant_aware else None
        system = self._system_tenant(conn)
        for table in CORE_TABLES:  # the newest first, by key (an index the application has); a tenant's own
            order = sql.SQL("template_id DESC, position DESC" if table == "widgets" else "id DESC")
            owner = system if table in ("templates", "widgets") else tenant
            where = sql.SQL("" if owner is None else "WHERE tenant_id = %s ")
            self._run(conn, f"list {table}", [(sql.SQL("SELECT {} FROM {} {}ORDER BY {} LIMIT 20").format(
                self.columns[table], sql.Identifier(table), where, order), None if owner is None else (owner,))])
        self._run(conn, "list active_workflows", [("SELECT id, uuid, org_id, name, updated_at FROM active_workflows "
                                                   "ORDER BY id DESC LIMIT 20", None)])

    # -- writes
    def sign_up(self, conn) -> None:
        """A new org, its first user (its org in org_ids, role 1) and their org_user row, in one transaction; the
        org then gets workflows, models and knowledge bases like every other (its rows must land on its tenant)."""
        name = self._row_name()

        def body(execute):
            org, org_uuid = execute("INSERT INTO org (uuid, name, slug) VALUES (gen_random_uuid(), %s, %s) "
                                    "RETURNING id, uuid::text", (name, name))[0]
            user = execute('INSERT INTO "user" (uuid, email, display_name, org_ids, role_ids) VALUES '
                           "(gen_random_uuid(), %s, %s, ARRAY[%s]::bigint[], '{1}') RETURNING id",
                           (f"{name}@example.com", name, org))[0][0]
            execute("INSERT INTO org_user (org_id, user_id, role) VALUES (%s, %s, 'owner')", (org, user))
            return org, org_uuid

        made = self._transaction(conn, "sign up an org and its first user", body)
        if made:
            org = made[0]
            self.orgs.append(org)
            self.org_uuid[org] = made[1]
            self.signed_up.append(org)
            workflow = self._insert(conn, "insert workflow", "workflows",
                                    {"org_id": org, "name": self._row_name(), "definition": "{}"})
            if workflow:
                self.written.workflows.append(workflow)
                self.org_of[workflow] = org
                self._insert(conn, "insert rule", "rules", {"workflow_id": workflow, "name": self._row_name(),
                                                            "expression": "x"})

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
        if rows and tenant is not None:
            self.tenant_of[(table, rows[0][0])] = tenant
        return rows[0][0] if rows else None

    def _parent_tenant(self, conn, table: str, parent_id: int) -> int | None:
        """The tenant of a row it knows (read with it, or written by it)."""
        return self.tenant_of[(table, parent_id)] if self.tenant_aware else None

    def _system_tenant(self, conn) -> int | None:
        if not self.tenant_aware:
            return None
        return self._tenant(conn, self.system_uuid)

    def insert_parent(self, conn) -> None:
        """A workflow, a model and a knowledge base of an org; a template with a widget (no org)."""
        org = self.random.choice(self.orgs)
        tenant = self._tenant_of_org(conn, org)
        workflow = self._insert(conn, "insert workflow", "workflows",
                                {"org_id": org, "name": self._row_name(), "definition": "{}"}, tenant)
        if workflow:
            self.written.workflows.append(workflow)
            self.org_of[workflow] = org
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
        where, args = self._key("workflows", workflow)
        org = conn.execute(sql.SQL("SELECT org_id FROM workflows WHERE {}").format(where), args).fetchone()
        self._insert(conn, "insert endpoint", "endpoints",
                     {"workflow_id": workflow, "org_id": org[0] if org else None, "method": "POST",
                      "path": f"/api/v1/workload/{uuid.uuid4()}"}, self._parent_tenant(conn, "workflows", workflow))

    def _own(self, kind: str) -> int | None:
        pool = getattr(self.written, kind)
        return self.random.choice(pool) if pool else None

    def update_ordinary(self, conn) -> None:
        where, args = self._key("workflows", self.random.choice(self.existing["workflows"]))
        self._run(conn, "update workflow status", [(sql.SQL("UPDATE workflows SET status = %s WHERE {}").format(where),
                                                    (self.random.choice(["draft", "active", "archived"]), *args))])
        where, args = self._key("rules", self.random.choice(self.existing["rules"]))
        self._run(conn, "update rule priority", [(sql.SQL("UPDATE rules SET priority = priority + 1 WHERE {}").format(
            where), args)])
        where, args = self._key("knowledge_bases", self.random.choice(self.existing["knowledge_bases"]))
        self._run(conn, "update knowledge base", [(sql.SQL("UPDATE knowledge_bases SET embedding_model = "
                                                           "'text-embedding-9' WHERE {}").format(where), args)])

    def _own_workflow_to(self, conn) -> tuple[int, int, int | None] | None:
        """One of its own workflows, an org, and (tenant-aware) that org's tenant."""
        workflow = self._own("workflows")
        if workflow is None:
            return None
        org = self.random.choice(self.orgs)
        return workflow, org, self._tenant_of_org(conn, org)

    def upsert(self, conn) -> None:
        """The legacy application: ON CONFLICT (id), with any org. The tenant-aware release upserts a row of its
        own tenant: ON CONFLICT (tenant_id, id), the row's own org and tenant."""
        target = self._own_workflow_to(conn)
        if target is None:
            return
        workflow, org, tenant = target
        if tenant is None:
            self._run(conn, "upsert workflow by id", [(
                "INSERT INTO workflows (id, uuid, org_id, name, definition) VALUES (%s, gen_random_uuid(), %s, %s, "
                "'{}') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name", (workflow, org, self._row_name()))])
        else:
            self._run(conn, "upsert workflow by id", [(
                "INSERT INTO workflows (id, uuid, org_id, name, definition, tenant_id) VALUES (%s, gen_random_uuid(), "
                "%s, %s, '{}', %s) ON CONFLICT (tenant_id, id) DO UPDATE SET name = EXCLUDED.name",
                (workflow, self.org_of[workflow], self._row_name(), self.tenant_of[("workflows", workflow)]))])

    def move_workflow(self, conn) -> None:
        """The application moves one of its workflows (with rules) to another org: the legacy application updates
        org_id (the rollout trigger moves the tenant, the composite keys' ON UPDATE CASCADE the children); the
        tenant-aware release deletes it and its children from their tenant and inserts them into the org's (_move)."""
        target = self._own_workflow_to(conn)
        if target is None:
            return
        workflow, org, tenant = target
        if tenant is None:
            self._run(conn, "move workflow to another org", [("UPDATE workflows SET org_id = %s WHERE id = %s",
                                                              (org, workflow))])
            return
        if self._transaction(conn, "move workflow to another org",
                             lambda execute: self._move(execute, workflow, org, tenant)):
            self.tenant_of[("workflows", workflow)] = tenant
            self.org_of[workflow] = org
            self.written.moved.append(workflow)

    def _move(self, execute, workflow: int, org: int, tenant: int) -> list:
        """The tenant-aware move: the workflow, its rules and its endpoints deleted from their tenant and inserted
        into the other, ids and uuids kept, in one transaction. Each statement names one tenant (one shard on Citus);
        an UPDATE of tenant_id is what Citus refuses on a distributed table (0A000). Delete first: before 07 the
        keys are still (id) and (uuid) alone."""
        old = self.tenant_of[("workflows", workflow)]
        children = {}
        for table in ("endpoints", "rules"):
            children[table] = execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND workflow_id = %s "
                                              "RETURNING {}").format(sql.Identifier(table), self.columns[table]),
                                      (old, workflow))
        rows = execute(sql.SQL("DELETE FROM workflows WHERE tenant_id = %s AND id = %s RETURNING {}").format(
            self.columns["workflows"]), (old, workflow))
        if not rows:
            return []
        for table, table_rows in (("workflows", rows), ("rules", children["rules"]),
                                  ("endpoints", children["endpoints"])):
            if not table_rows:
                continue
            names = self.column_names[table]
            values = [{**dict(zip(names, r)), "tenant_id": tenant,
                       **({"org_id": org} if "org_id" in names else {})} for r in table_rows]
            columns = list(values[0])
            row = sql.SQL("({})").format(sql.SQL(", ").join([sql.Placeholder()] * len(columns)))
            execute(sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.SQL(", ").join([row] * len(values))), tuple(v for r in values for v in r.values()))
        return rows

    def delete_cascading(self, conn) -> None:
        """A workflow of its own goes, its rules with it (ON DELETE CASCADE)."""
        if len(self.written.workflows) < 3:
            return
        workflow = self.written.workflows.pop(0)
        where, args = self._key("workflows", workflow)
        self._run(conn, "delete workflow (rules cascade)", [(sql.SQL("DELETE FROM workflows WHERE {}").format(where),
                                                             args)])
