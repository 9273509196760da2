"""A real Citus cluster for the tests: a coordinator and two workers, Debian's PostgreSQL 15 with Citus 13.0.5
(tests/citus/build.sh builds and installs it), on 127.0.0.1, each node's data in this clone's .runbook/.

The nodes are the embedded server's class pointed at Debian's binaries, with three differences: they listen on
127.0.0.1 (Citus reaches its nodes by host and port), on ports chosen once per clone and kept in
.runbook/citus-ports (two clones never collide; a second test run reuses the running nodes), and they preload
citus. initdb's trust authentication covers 127.0.0.1, as the peers' README describes. A database is made on
every node with the extension, and the coordinator's copy is told its workers (`database`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from runbook_helpers import paths
from runbook_helpers.db import ddl
from runbook_helpers.db import server as server_mod

PG15 = Path("/usr/lib/postgresql/15/bin")
BUILD = Path(__file__).resolve().parent / "build.sh"
HOW = ("Citus 13.0.5 for PostgreSQL 15 is needed: as root, `.ci/run` installs it, or apt-get install postgresql-15 "
       "postgresql-server-dev-15 and the build dependencies in ../shared/peers/README.md, then tests/citus/build.sh")
NODES = ("coordinator", "worker1", "worker2")
HOST = "127.0.0.1"


def missing() -> str | None:
    """Why Citus cannot run here (None when it can): builds and installs it from the shared source when the
    machine has what that needs (a cached build installs in a second)."""
    if not (PG15 / "postgres").is_file():
        return f"no PostgreSQL 15 at {PG15}. {HOW}"
    out = subprocess.run([str(BUILD)], capture_output=True, text=True)
    if out.returncode != 0:
        return f"{(out.stderr or out.stdout).strip()[-600:]}. {HOW}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ports() -> dict[str, int]:
    """Each node's port, chosen once per clone (free when chosen) and kept beside the nodes' data."""
    file = paths.project_root() / ".runbook" / "citus-ports"
    try:
        ports = json.loads(file.read_text())
        if set(ports) == set(NODES):
            return ports
    except (OSError, ValueError):
        pass
    ports = {}
    while len(set(ports.values())) < len(NODES):
        ports = {node: _free_port() for node in NODES}
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(ports))
    return ports


class Node(server_mod.EmbeddedServer):
    """One node: the embedded server's life cycle on Debian's PostgreSQL 15, on 127.0.0.1:port, citus preloaded."""

    def __init__(self, name: str, port: int):
        super().__init__(f"citus-{name}", PG15)
        self.name, self.port = name, port

    def url(self, database: str = "postgres", user: str = server_mod.SUPERUSER) -> str:
        return f"postgresql://{quote(user, safe='')}@{HOST}:{self.port}/{quote(database, safe='')}"

    def settings(self, socket_dir: Path) -> dict[str, str]:
        return {**super().settings(socket_dir), "listen_addresses": f"'{HOST}'", "port": str(self.port),
                "shared_preload_libraries": "'citus'", "max_connections": "300",
                "max_prepared_transactions": "100", "wal_level": "logical", "fsync": "off"}


@dataclass
class Cluster:
    coordinator: Node
    workers: list[Node]

    @property
    def nodes(self) -> list[Node]:
        return [self.coordinator, *self.workers]

    def start(self) -> "Cluster":
        for node in self.nodes:
            node.start()
        return self

    def create_database(self, name: str, template: str | None = None) -> None:
        """The database on every node with the citus extension; the coordinator's (copied from `template` when
        given: a database made here, before any table was distributed) told its host and workers."""
        for node in self.nodes:
            with psycopg.connect(node.url(), autocommit=True) as conn:
                query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                if template and node is self.coordinator:
                    query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
                for attempt in range(40):  # a maintenance daemon that was still leaving the template
                    try:
                        conn.execute(query)
                        break
                    except psycopg.errors.ObjectInUse:
                        if attempt == 39:
                            raise
                        time.sleep(0.25)
            with psycopg.connect(node.url(name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
        with psycopg.connect(self.coordinator.url(name), autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", (HOST, self.coordinator.port))
            for worker in self.workers:
                for attempt in range(5):  # adding a node creates every role on it: another database may do so too
                    try:
                        conn.execute("SELECT citus_add_node(%s, %s)", (HOST, worker.port))
                        break
                    except psycopg.Error as exc:
                        if attempt == 4 or not ddl.concurrent_catalog_update(exc):
                            raise
                        time.sleep(0.2)

    def drop_database(self, name: str) -> None:
        for node in reversed(self.nodes):
            with psycopg.connect(node.url(), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def new_name(self, prefix: str = "c") -> str:
        return f"{prefix}_{uuid.uuid4().hex[:12]}"


def cluster() -> Cluster:
    ports = _ports()
    return Cluster(Node("coordinator", ports["coordinator"]),
                   [Node(name, ports[name]) for name in NODES[1:]]).start()
