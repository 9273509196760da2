"""A writer as the superuser, with the legacy mapping off, keeps writing while every phase runs: it sees no
error, all its committed rows are there at the end, each with a tenant, validate passes while it writes,
and the pre-existing rows are untouched (tests/test_application_keeps_working.py runs the legacy
application's own workload, as its role, with the mapping on)."""

import threading
import time

import psycopg
import pytest

from runbook_helpers import params as params_mod
from runbook_helpers.phases import validate

pytestmark = pytest.mark.slow


class LegacyApp(threading.Thread):
    """INSERTs that omit tenant_id, UPDATEs and DELETEs of its own rows, as the pre-migration code does."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.alive: set[str] = set()   # names of committed rows that should exist at the end
        self.deleted: set[str] = set()
        self.statements = 0

    def run(self) -> None:
        n = 0
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                n += 1
                name = f"live {n}"
                try:
                    conn.execute("INSERT INTO templates (uuid, name, category) VALUES (gen_random_uuid(), %s, 'live')",
                                 (name,))
                    conn.execute("INSERT INTO knowledge_bases (uuid, org_id, name) VALUES (gen_random_uuid(), 1, %s)",
                                 (name,))
                    self.alive.add(name)
                    if n % 3 == 0:
                        conn.execute("UPDATE templates SET category = 'live-updated' WHERE name = %s", (f"live {n - 1}",))
                    if n % 5 == 0:
                        gone = f"live {n - 2}"
                        conn.execute("DELETE FROM templates WHERE name = %s", (gone,))
                        conn.execute("DELETE FROM knowledge_bases WHERE name = %s", (gone,))
                        self.alive.discard(gone)
                        self.deleted.add(gone)
                    self.statements += 4
                except psycopg.Error as exc:
                    self.errors.append(f"{exc.sqlstate}: {exc}")
                time.sleep(0.005)


def test_the_legacy_application_writes_through_every_phase(db):
    app = LegacyApp(db.url)
    params = params_mod.override(db.params, {"backfill": {"batch_size": 100, "target_batch_ms": None}})
    app.start()
    try:
        time.sleep(0.3)
        results = {}
        for phase in ("inspect", "seed", "backfill", "constrain"):
            results[phase] = db.run(phase, params=params)[phase]
        with db.session("validate", params=params) as rb:
            checks = validate.checks(rb)
            isolation = validate.isolation_suite(rb)
            writes = validate.application_writes(rb).set_index("table")
        time.sleep(0.3)
    finally:
        app.stop.set()
        app.join(30)
    assert app.errors == []
    assert app.statements > 100
    with db.connect() as conn:
        for table in ("templates", "knowledge_bases"):
            names = {r[0] for r in conn.execute(f"SELECT name FROM {table} WHERE name LIKE 'live %%'")}
            assert names == app.alive, table
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id IS NULL").fetchone()[0] == 0
        for table in db.params.tables:
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id IS NULL").fetchone()[0] == 0
    # every check passes on the live database: the rows the application did not write are proven unchanged,
    # and its own writes are counted as its own
    assert checks["passed"].all(), checks[~checks["passed"]].to_dict("records")
    assert isolation["passed"].all()
    assert writes.loc["templates", "inserted"] + writes.loc["templates", "inserted, then deleted"] > 0
    assert writes.loc["knowledge_bases", "inserted"] > 0
