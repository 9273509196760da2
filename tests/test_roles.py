"""Cluster-wide roles made by two sessions at once (test workers building their templates on one server, the
demo database and a test's fixture): both succeed, and the role exists once."""

import threading
import uuid

import psycopg

from conftest import create_role
from runbook_helpers import demo

ROUNDS = 10


def at_once(*calls) -> list[BaseException]:
    """Run the calls in threads released together; the errors they raised."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call):
        barrier.wait()
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def count_roles(server, names: list[str]) -> int:
    with psycopg.connect(server.url()) as conn:
        return conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", (names,)).fetchone()[0]


def drop_roles(server, names: list[str]) -> None:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        for name in names:
            conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def test_demo_roles_made_twice_at_once_both_succeed(server):
    made = []
    try:
        for _ in range(ROUNDS):
            owner, legacy = f"owner_{uuid.uuid4().hex[:8]}", f"legacy_{uuid.uuid4().hex[:8]}"
            made += [owner, legacy]
            errors = at_once(*[lambda: demo.ensure_roles(server.url(), owner, legacy)] * 2)
            assert errors == []
            assert count_roles(server, [owner, legacy]) == 2
    finally:
        drop_roles(server, made)


def test_a_fixture_role_and_a_demo_role_of_one_name_made_at_once_both_succeed(server):
    made = []
    try:
        for _ in range(ROUNDS):
            name, legacy = f"both_{uuid.uuid4().hex[:8]}", f"legacy_{uuid.uuid4().hex[:8]}"
            made += [name, legacy]
            errors = at_once(lambda: create_role(server, name, "NOLOGIN"),
                             lambda: demo.ensure_roles(server.url(), name, legacy))
            assert errors == []
            assert count_roles(server, [name]) == 1
    finally:
        drop_roles(server, made)


def test_constrain_creates_its_role_while_another_database_creates_the_same_one(server, db, empty_db):
    """Two databases on one server migrated at once both create the application role: the second creation waits
    for the first to commit, then finds the role there (unique_violation), which the step takes as done."""
    from runbook_helpers.db.sqltext import render
    from runbook_helpers.tenancy import rls
    role = f"app_{uuid.uuid4().hex[:8]}"
    session = db.session("constrain")
    try:
        with session.engine.connect() as conn:
            created, _ = rls.role_steps(conn, "public", role, ["workflows"], [], None)
            statement = render(conn, created[0].statement)
    finally:
        session.close()
    first = psycopg.connect(db.url)
    first.execute(statement)  # created, not committed: the second creation waits on it
    errors: list[BaseException] = []

    def second():
        try:
            with psycopg.connect(empty_db.url, autocommit=True) as conn:
                conn.execute(statement)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    thread = threading.Thread(target=second)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive(), "the second creation did not wait for the first"
    first.commit()
    first.close()
    thread.join(30)
    try:
        assert errors == []
        assert count_roles(server, [role]) == 1
    finally:
        drop_roles(server, [role])
