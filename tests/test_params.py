"""Params: every env loads; every bad input gives one line naming the file, the key and the fix."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, runbook_cli
from runbook_helpers import params
from runbook_helpers.errors import ParamsError


@pytest.fixture
def params_dir(tmp_path) -> Path:
    folder = tmp_path / "params"
    shutil.copytree(ROOT / "params", folder)
    return folder


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


@pytest.mark.parametrize("env", ["local", "ci", "staging", "prod"])
def test_every_shipped_env_loads(env):
    p = params.load(env)
    assert p.env == env
    assert list(p.core_tables) == ["workflows", "models", "rules", "decision_tables", "knowledge_bases",
                                   "templates", "widgets", "endpoints"]
    assert p.shared_tables == ["node_types"]
    assert str(p.system_tenant.uuid) == "00000000-0000-4000-8000-000000000001"
    # issue 5: RLS and composite keys on where the demo database lives; real environments opt in
    assert p.rls.enabled is (env in ("local", "ci"))
    assert p.distribution.composite_keys is (env in ("local", "ci"))


def test_real_envs_name_a_dsn_variable_and_embedded_envs_do_not():
    assert params.load("staging").database.dsn_env == "RUNBOOK_STAGING_DSN"
    assert params.load("prod").database.dsn_env == "RUNBOOK_PROD_DSN"
    assert params.load("prod").database.confirm_required is True
    assert params.load("local").database.embedded and params.load("local").database.dsn_env is None


def test_env_file_overrides_base(params_dir):
    write(params_dir, "perf.yaml", "extends: apps/demo.yaml\ndatabase: {embedded: true}\nbackfill: {batch_size: 77}\n")
    p = params.load("perf", params_dir)
    assert p.backfill.batch_size == 77
    assert p.backfill.pause_ms == 0  # untouched keys come from base.yaml
    assert p.locks.lock_timeout_ms == 500 and p.locks.first_lock_timeout_ms == 50


def test_unknown_env_names_the_envs_that_exist():
    with pytest.raises(ParamsError) as err:
        params.load("no-such-env")
    assert str(err.value) == ("unknown env 'no-such-env': there is no params/no-such-env.yaml; "
                              "envs that exist: ci, local, prod, staging")


def test_env_names_cannot_escape_the_params_folder():
    with pytest.raises(ParamsError, match="unknown env '../base'"):
        params.load("../base")


def test_unknown_key_names_file_and_key(params_dir):
    write(params_dir, "typo.yaml", "extends: apps/demo.yaml\ndatabase: {embedded: true}\nbackfill: {batch_sise: 5}\n")
    with pytest.raises(ParamsError) as err:
        params.load("typo", params_dir)
    assert str(err.value) == ("params/typo.yaml: unknown key 'backfill.batch_sise'; fix its spelling or remove it "
                              "(see params/base.yaml for the keys)")


def test_wrong_type_names_file_key_and_value(params_dir):
    write(params_dir, "bad.yaml", "extends: apps/demo.yaml\ndatabase: {embedded: true}\nlocks: {lock_timeout_ms: soon}\n")
    with pytest.raises(ParamsError) as err:
        params.load("bad", params_dir)
    message = str(err.value)
    assert message.startswith("params/bad.yaml: locks.lock_timeout_ms: ")
    assert "integer" in message and "'soon'" in message and "fix the value" in message
    assert "\n" not in message


def test_error_in_base_is_attributed_to_base(params_dir):
    text = (params_dir / "base.yaml").read_text().replace("long_transaction_s: 60", "long_transaction_s: -60")
    write(params_dir, "base.yaml", text)
    with pytest.raises(ParamsError) as err:
        params.load("staging", params_dir)
    assert str(err.value).startswith("params/base.yaml: inspect.long_transaction_s: ")


def test_a_dsn_in_a_file_is_refused(params_dir):
    write(params_dir, "leaky.yaml", "extends: apps/demo.yaml\ndatabase:\n  dsn: postgresql://u:secret@h/db\n")
    with pytest.raises(ParamsError) as err:
        params.load("leaky", params_dir)
    assert "a DSN never goes in a params file" in str(err.value)
    assert "secret" not in str(err.value)


def test_real_env_without_dsn_variable_is_refused(params_dir):
    write(params_dir, "nodsn.yaml", "extends: apps/demo.yaml\n")
    with pytest.raises(ParamsError, match=r"params/nodsn.yaml: database.dsn_env: a real environment names"):
        params.load("nodsn", params_dir)


def test_missing_dsn_variable_says_what_to_export(monkeypatch):
    monkeypatch.delenv("RUNBOOK_STAGING_DSN", raising=False)
    p = params.load("staging")
    with pytest.raises(ParamsError) as err:
        params.dsn_from_environment(p)
    assert "RUNBOOK_STAGING_DSN, which is not set" in str(err.value)
    assert "export RUNBOOK_STAGING_DSN=" in str(err.value)


def test_extends_cycle_and_bad_yaml(params_dir):
    write(params_dir, "a.yaml", "extends: b.yaml\n")
    write(params_dir, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ParamsError, match="forms a cycle"):
        params.load("a", params_dir)
    write(params_dir, "broken.yaml", "extends: apps/demo.yaml\nbackfill: [unclosed\n")
    with pytest.raises(ParamsError, match=r"params/broken.yaml line \d+: not valid YAML"):
        params.load("broken", params_dir)


def test_overlapping_core_and_shared_tables_are_refused(params_dir):
    write(params_dir, "overlap.yaml", "extends: apps/demo.yaml\ndatabase: {embedded: true}\nshared_tables: [workflows]\n")
    with pytest.raises(ParamsError, match="workflows also listed in core_tables"):
        params.load("overlap", params_dir)


def test_public_dict_holds_the_variable_name_not_its_value(monkeypatch):
    monkeypatch.setenv("RUNBOOK_STAGING_DSN", "postgresql://app:hunter2@db.internal/app")
    dumped = str(params.load("staging").public_dict())
    assert "RUNBOOK_STAGING_DSN" in dumped
    assert "hunter2" not in dumped


def test_override_validates():
    p = params.override(params.load("ci"), {"backfill": {"batch_size": 5}})
    assert p.backfill.batch_size == 5
    with pytest.raises(ParamsError, match="batch_size"):
        params.override(p, {"backfill": {"batch_size": 0}})


def test_cli_unknown_env_is_one_line_and_no_traceback():
    result = runbook_cli("run", "--env", "no-such-env")
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == ["runbook: error: unknown env 'no-such-env': there is no params/no-such-env.yaml; "
                     "envs that exist: ci, local, prod, staging"]


def test_cli_missing_dsn_variable_is_one_message(monkeypatch):
    monkeypatch.delenv("RUNBOOK_STAGING_DSN", raising=False)
    result = runbook_cli("run", "--env", "staging", env={"RUNBOOK_STAGING_DSN": ""})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("runbook: error: params/staging.yaml: database.dsn_env names RUNBOOK_STAGING_DSN")


def test_cli_server_down_names_the_variable_not_the_password():
    dsn = "postgresql://app:s3cr3t-pw@127.0.0.1:1/app"
    result = runbook_cli("run", "--env", "staging", env={"RUNBOOK_STAGING_DSN": dsn})
    assert result.returncode == 2
    assert "cannot connect to the staging database named by $RUNBOOK_STAGING_DSN" in result.stderr
    assert "s3cr3t-pw" not in result.stderr + result.stdout


def test_notebook_overrides_apply_to_one_session_and_are_shown(db):
    from runbook_helpers.run.session import open_phase
    rb = None
    try:
        with pytest.raises(ParamsError, match="override backfill.batch_size"):
            open_phase("inspect", "ci", overrides={"backfill": {"batch_size": "many"}})
        overrides = {"backfill": {"batch_size": 123}, "database": {"name": db.name}}
        rb = open_phase("inspect", "ci", dry_run=True, overrides=overrides)
        assert rb.params.backfill.batch_size == 123
        assert rb.params.database.name == db.name
        assert json.loads(rb.summary().loc["params overridden", "value"]) == overrides
    finally:
        if rb is not None:
            rb.close()
    assert params.load("ci").backfill.batch_size == 2000
