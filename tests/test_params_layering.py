"""Params layering (issue 14, item 3): base.yaml holds defaults only, an application's spec is its own file,
`!replace` swaps an inherited mapping instead of merging into it, and every error about a table names the
params file (and key) it came from."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from runbook_helpers import params
from runbook_helpers.errors import ParamsError

# The resolved params of the shipped envs, dumped (public_dict) before the restructure of issue 14.
BEFORE = json.loads((Path(__file__).parent / "fixtures" / "params_resolved_before_issue14.json").read_text())
# What issue 14 added, each with a default that keeps the old behaviour: the tenant source the legacy mapping
# used to hard-code (checked in test_tenant_source.py), smoke queries that write, accepted isolation probes,
# the rules for conflicts between tenants. "*" matches any list index.
ADDED = [("legacy", "source"), ("validate", "smoke_queries", "*", "writes"), ("rls", "isolation_accept"),
         ("cross_tenant",), ("locks", "first_lock_timeout_ms"), ("locks", "wraparound_wait_s"),
         ("locks", "report_transactions_older_than_ms"), ("backfill", "throttle", "budget_p99_ms"),
         ("backfill", "throttle", "max_replica_lag_s"),
         ("backfill", "vacuum_after"),  # issue 15: a VACUUM (ANALYZE) after the batches (new behaviour, on)
         ("backfill", "vacuum_every_share"),  # issue 15: a VACUUM beside the batches (new behaviour, on)
         # issue 18: 07_distribute's params (a phase of its own, run only on a Citus coordinator)
         ("distribution", "application_keys_agreed"), ("distribution", "reference_tables"),
         ("distribution", "triggers")]
# Defaults issue 15 changed on purpose (the lock ladder: short waits first, many tries): old -> new, where an env
# kept the old default.
CHANGED = {("locks", "lock_timeout_ms"): (2000, 500), ("locks", "retry", "attempts"): (6, 20),
           ("locks", "retry", "backoff_ms"): (500, 100), ("locks", "retry", "backoff_max_ms"): (10000, 5000),
           # issue 18: the demo's smoke query joins on tenant_id too, so Citus joins colocated shards; issue 26: every
           # smoke query of a tenant table names its tenant (the System Tenant's rows), so Citus runs it on one shard
           ("validate", "smoke_queries", 0, "sql"): (
               "SELECT id, name, status FROM workflows ORDER BY updated_at DESC LIMIT 20",
               "SELECT id, name, status FROM workflows WHERE tenant_id = 1 ORDER BY updated_at DESC LIMIT 20"),
           ("validate", "smoke_queries", 1, "sql"): (
               "SELECT r.id, r.name FROM rules r JOIN workflows w ON w.id = r.workflow_id WHERE w.id = 1",
               "SELECT r.id, r.name FROM rules r JOIN workflows w ON w.tenant_id = r.tenant_id AND w.id = "
               "r.workflow_id WHERE w.tenant_id = 1 AND w.id = 333"),
           ("validate", "smoke_queries", 2, "sql"): (
               "SELECT template_id, position, kind FROM widgets WHERE template_id = 1 ORDER BY position",
               "SELECT template_id, position, kind FROM widgets WHERE tenant_id = 1 AND template_id = 1 ORDER BY "
               "position")}


def _leaves(node, at=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, at + (key,))
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for index, value in enumerate(node):
            yield from _leaves(value, at + (index,))
    else:
        yield at, node


def _added(path) -> bool:
    return any(len(path) >= len(a) and all(x == "*" or x == y for x, y in zip(a, path)) for a in ADDED)


@pytest.mark.parametrize("env", ["local", "ci", "staging", "prod"])
def test_shipped_envs_resolve_exactly_as_before_the_restructure(env):
    now = json.loads(json.dumps(params.load(env).public_dict()))
    assert now["legacy"]["source"]["tenants"]["table"] == "org"
    now_leaves = {k: v for k, v in _leaves(now) if not _added(k)}
    expected = {k: CHANGED[k][1] if k in CHANGED and v == CHANGED[k][0] else v for k, v in _leaves(BEFORE[env])}
    assert now_leaves == expected


@pytest.fixture
def params_dir(tmp_path) -> Path:
    folder = tmp_path / "params"
    shutil.copytree(ROOT / "params", folder)
    return folder


def test_base_holds_defaults_only_and_an_env_on_it_names_its_own_tables(params_dir):
    import yaml
    base = yaml.safe_load((ROOT / "params" / "base.yaml").read_text())
    assert "core_tables" not in base and "shared_tables" not in base
    assert base["validate"]["smoke_queries"] == [] and set(base["legacy"]) == {"enabled", "tenant_uuid_namespace"}
    (params_dir / "mine.yaml").write_text("extends: base.yaml\ndatabase: {embedded: true}\n"
                                          "core_tables: {orders: {org_column: account_id}}\n")
    p = params.load("mine", params_dir)
    assert list(p.core_tables) == ["orders"] and p.shared_tables == [] and p.validate_.smoke_queries == []
    assert p.origin("core_tables", "orders") == "params/mine.yaml"
    assert p.origin("backfill", "batch_size") == "params/base.yaml"


def test_replace_tag_takes_the_place_of_an_inherited_mapping(params_dir):
    (params_dir / "merged.yaml").write_text("extends: apps/demo.yaml\ndatabase: {embedded: true}\n"
                                            "core_tables: {orders: {}}\n")
    assert list(params.load("merged", params_dir).core_tables)[-2:] == ["endpoints", "orders"]
    (params_dir / "mine.yaml").write_text("extends: apps/demo.yaml\ndatabase: {embedded: true}\n"
                                          "core_tables: !replace\n  orders: {org_column: account_id}\n"
                                          "  lines: {parent: {table: orders, column: order_id}}\n"
                                          "shared_tables: [currencies]\n")
    p = params.load("mine", params_dir)
    assert list(p.core_tables) == ["orders", "lines"]
    assert p.core_tables["lines"].parent.table == "orders" and p.shared_tables == ["currencies"]
    assert p.origin("core_tables", "orders") == p.origin("core_tables") == "params/mine.yaml"
    assert p.origin("validate", "smoke_queries") == "params/apps/demo.yaml"   # the rest still merges
    # an error inside the replacement names the file of the replacement, not the file it replaced
    (params_dir / "bad.yaml").write_text("extends: apps/demo.yaml\ndatabase: {embedded: true}\n"
                                         "core_tables: !replace\n  rules: {parent: {column: workflow_id}}\n")
    with pytest.raises(ParamsError) as err:
        params.load("bad", params_dir)
    assert str(err.value) == ("params/bad.yaml: core_tables.rules.parent.table is required; add it to this file "
                              "or to the application spec it extends")


def test_replace_tags_only_a_mapping(params_dir):
    (params_dir / "odd.yaml").write_text("extends: apps/demo.yaml\ndatabase: {embedded: true}\n"
                                         "shared_tables: !replace [a]\n")
    with pytest.raises(ParamsError, match=r"params/odd.yaml line 3: not valid YAML \(!replace tags a mapping"):
        params.load("odd", params_dir)


def test_an_override_is_named_as_such():
    p = params.override(params.load("ci"), {"core_tables": {"extra": {}}})
    assert p.origin("core_tables", "extra") == "override"
    assert p.origin("core_tables", "workflows") == "params/apps/demo.yaml"
    assert p.origin("rls", "enabled") == "params/ci.yaml"


def test_a_missing_table_names_the_file_it_came_from(server, params_dir):
    """On a database without the demo's tables, an env that extends the demo's spec hears where each table
    it cannot find came from: the inherited ones from apps/demo.yaml, its own from its file."""
    from conftest import create_database, drop_database
    from runbook_helpers.phases import backfill, inspect
    from runbook_helpers.run.session import PhaseSession
    from runbook_helpers.errors import RunbookError
    ci = (params_dir / "ci.yaml").read_text()
    (params_dir / "ci.yaml").write_text(ci + "core_tables:\n  orders:\n")
    p = params.override(params.load("ci", params_dir), {"legacy": {"enabled": False}})
    name = "t_layering_missing"
    drop_database(server, name)
    create_database(server, name, None)
    try:
        with psycopg_connect(server.url(name)) as conn:
            conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY)")
        rb = PhaseSession("inspect", dry_run=True, database_name=name, params=p, log=lambda *_: None)
        try:
            row = inspect.preflight(rb).set_index("check").loc["spec tables exist"]
            assert row["status"] == "FAIL"
            assert "core table workflows (params/apps/demo.yaml, core_tables.workflows)" in row["detail"]
            assert "shared table node_types (params/apps/demo.yaml, shared_tables.node_types)" in row["detail"]
            assert "orders" not in row["detail"]
            assert "!replace" in row["fix"]
            with pytest.raises(RunbookError, match=r"core table\(s\) workflows \(params/apps/demo.yaml, "
                                                   r"core_tables.workflows\); models"):
                inspect.capture_baseline(rb)
            with pytest.raises(RunbookError, match=r"core table 'workflows' \(params/apps/demo.yaml, "
                                                   r"core_tables.workflows\) does not exist"):
                backfill.plans(rb)
        finally:
            rb.close()
    finally:
        drop_database(server, name)


def psycopg_connect(url):
    import psycopg
    return psycopg.connect(url, autocommit=True)
