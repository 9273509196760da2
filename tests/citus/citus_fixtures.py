"""Fixtures of the Citus suite (make test-citus), imported by its test modules: a real cluster (cluster.py), the demo built and migrated through
06_finalize on its coordinator with the ci env's spec (legacy mapping, RLS, composite keys) once per worker, and a
fresh copy of it per test, made on every node and told its workers.

Without Citus the suite skips with the line saying how to get it; under CI (CI set) it fails instead."""

from __future__ import annotations

import os

import psycopg
import pytest
from psycopg import sql

import cluster as cluster_mod
from conftest import TEMPLATE_ROWS, TEMPLATE_SCALE, Db

from runbook_helpers import demo
from runbook_helpers import params as params_mod

DSN_ENV = "RUNBOOK_CITUS_DSN"
MIGRATED = ("inspect", "seed", "backfill", "constrain", "validate", "finalize")
# what the demo needs for 07: the application agreed to the key changes, its updated_at trigger goes along,
# "user" (which workflows.created_by references) becomes a reference table
AGREED = {"distribution": {"application_keys_agreed": True, "triggers": "enable_unsafe", "reference_tables": ["user"]}}


@pytest.fixture(scope="session")
def citus() -> cluster_mod.Cluster:
    reason = cluster_mod.missing()
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    return cluster_mod.cluster()


@pytest.fixture(scope="session")
def citus_params(citus) -> params_mod.Params:
    """The ci env's spec (the demo application, legacy mapping, RLS, composite keys) on the cluster's coordinator,
    with the agreement and settings 07 needs."""
    return on_cluster(citus, params_mod.load("ci"), AGREED)


def on_cluster(citus, params: params_mod.Params, overrides: dict | None = None) -> params_mod.Params:
    """`params` (an env's spec) pointed at the cluster's coordinator, with `overrides`."""
    os.environ[DSN_ENV] = citus.coordinator.url()
    return params_mod.override(params, {"database": {"embedded": False, "dsn_env": DSN_ENV}, **(overrides or {})})


def _template(citus, params, phases: tuple[str, ...], key: str, schema: str | None = None) -> str:
    """The demo (or the database `schema`, SQL, builds) on the coordinator (citus created, no workers yet), migrated
    through `phases`, once per worker; the copies get the extension back (Cluster.create_database)."""
    name = f"citus_template_{key}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    node = citus.coordinator
    with psycopg.connect(node.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if schema:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    if schema:
        with psycopg.connect(node.url(name), autocommit=True) as conn:
            conn.execute(schema)
    else:
        demo.build(node.url(), name, system_uuid=str(params.system_tenant.uuid), rows=TEMPLATE_ROWS,
                   scale=TEMPLATE_SCALE, log=lambda *_: None)
    with psycopg.connect(node.url(name), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION citus")
    Db(node, name, params).run(*phases, params=params)
    with psycopg.connect(node.url(name), autocommit=True) as conn:
        # nothing of Citus is in use before 07 (no node, no distributed table); without the extension no
        # maintenance daemon holds a connection to the template, which CREATE DATABASE … TEMPLATE refuses
        conn.execute("DROP EXTENSION citus")
        # what 07's preflight asks of the DBA (04_constrain makes the application role NOLOGIN; Citus connects to the
        # workers as it): done here once, so no test depends on another having done it on this cluster before it.
        # The tests of the refusal take the login back from a role of their own.
        role = params.rls.app_role
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
    return name


_TEMPLATES: dict[tuple, str] = {}


@pytest.fixture
def citus_db(citus, citus_params):
    """make(phases=MIGRATED, params=citus_params, schema=None): a fresh copy of the demo (or of the database `schema`,
    SQL, builds, such as tests/schemas/shop.sql) migrated through `phases`, on every node, the coordinator told its
    workers."""
    made: list[str] = []

    def make(phases: tuple[str, ...] = MIGRATED, params=None, schema: str | None = None) -> Db:
        p = params or citus_params
        key = (phases, p.model_dump_json(), schema)
        if key not in _TEMPLATES:
            _TEMPLATES[key] = _template(citus, p, phases, str(len(_TEMPLATES)), schema)
        name = citus.new_name()
        citus.create_database(name, template=_TEMPLATES[key])
        made.append(name)
        return Db(citus.coordinator, name, p)

    yield make
    for name in made:
        citus.drop_database(name)
