"""`runbook plan --format sql|json|table` (issue 17): the SQL file is every statement as it will run, which
PostgreSQL's own parser (pglast, libpg_query) and the migration linter squawk read without a syntax error; the
JSON is the same plan as objects; both hold the statements of the table form; batched UPDATEs are the statement
one batch runs with its bounds as $n, which the real server plans (EXPLAIN with the bounds bound); all read-only."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pglast
import psycopg
import pytest

from runbook_helpers import params as params_mod
from runbook_helpers.db import plan_text
from runbook_helpers.phases import inspect
from runbook_helpers.run.session import PhaseSession
from conftest import LEGACY_ON
from test_accounting import cli, runner_home  # noqa: F401  (runner_home: a fixture)

SQUAWK = Path(sys.executable).with_name("squawk")


def squawk_findings(path: Path) -> list[dict]:
    if not SQUAWK.exists() and shutil.which("squawk") is None:
        pytest.skip("squawk is missing: pip install squawk-cli (it is in the dev extras: pip install -e '.[dev]')")
    out = subprocess.run([str(SQUAWK if SQUAWK.exists() else "squawk"), "--reporter", "json", str(path)],
                         capture_output=True, text=True)
    return json.loads(out.stdout or "[]")


def test_the_sql_and_json_forms_hold_every_statement_of_the_plan_and_parse(db, runner_home, tmp_path):  # noqa: F811
    as_sql = cli(runner_home, "plan", "--env", "ci", "--format", "sql")
    as_json = cli(runner_home, "plan", "--env", "ci", "--format", "json")
    as_table = cli(runner_home, "plan", "--env", "ci")
    for out in (as_sql, as_json, as_table):
        assert out.returncode == 0, out.stdout + out.stderr
    steps = json.loads(as_json.stdout)
    assert json.loads(json.dumps(steps)) == steps and len(steps) > 100
    assert {"phase", "table", "action", "statement", "lock", "lock_mode", "lock_target", "brief", "why",
            "params"} <= set(steps[0])
    # the same plan as the table form, step by step (the table form is the frame the notebooks show)
    with PhaseSession("inspect", params=params_mod.override(db.params, LEGACY_ON), database_name=db.name,
                      read_only=True, log=lambda *_: None) as rb:
        frame = inspect.full_plan(rb)
    assert [(s["phase"], s["table"] or "", s["action"], s["statement"]) for s in steps] == \
        list(zip(frame["phase"], frame["table"], frame["action"], frame["statement"]))
    table_lines = as_table.stdout.splitlines()
    assert all(any(s["action"][:40] in line for line in table_lines) for s in steps)
    # every statement whole: no truncation, no placeholder text where SQL belongs
    assert not any("…" in s["statement"] or "<key range" in s["statement"] or "<the tenant" in s["statement"]
                   for s in steps)
    batches = [s for s in steps if s["params"]]
    assert batches and all(s["statement"].startswith("UPDATE ") and "$1" in s["statement"] and "$2" in s["statement"]
                           and s["lock_mode"] == "ROW EXCLUSIVE" for s in batches)
    assert all("(exclusive)" in s["params"][0]["holds"] and "(inclusive)" in s["params"][-1]["holds"] for s in batches)
    # the SQL file: PostgreSQL's parser reads exactly the statements of the plan, plus the session's lock_timeout
    parsed = pglast.parse_sql(as_sql.stdout)
    assert len(parsed) == 1 + sum(len(pglast.parse_sql(s["statement"])) for s in steps)
    assert as_sql.stdout.count("\n-- lock: ") == len(steps)
    assert "$1: the previous batch's last id (exclusive)" in as_sql.stdout
    # the linter: no syntax error, and it sees the lock_timeout every statement runs under
    path = tmp_path / "plan.sql"
    path.write_text(as_sql.stdout)
    rules = {f["rule_name"] for f in squawk_findings(path)}
    assert "syntax-error" not in rules and "require-lock-timeout" not in rules, rules
    assert db.scalar("SELECT to_regnamespace('tenancy_runbook')") is None  # read-only: not even the ledger


def test_each_batch_update_of_the_sql_form_is_planned_by_the_server_with_its_bounds(migrated_db, ci_params, home):
    """After seed (the mapping tables exist) and, in a transaction rolled back, the plan's ADD COLUMN statements:
    EXPLAIN each batched UPDATE as the file writes it, its $n bound."""
    db = migrated_db("inspect", "seed", params=params_mod.override(ci_params, LEGACY_ON))
    (home / ".runbook").symlink_to(Path(__file__).resolve().parents[1] / ".runbook")
    ci = home / "params" / "ci.yaml"
    ci.write_text(ci.read_text().replace("database:\n  embedded: true\n",
                                         f"database:\n  embedded: true\n  name: {db.name}\n"))
    out = cli(home, "plan", "--env", "ci", "--format", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    steps = json.loads(out.stdout)
    batches = [s for s in steps if s["params"]]
    assert {s["table"] for s in batches} >= {"workflows", "rules", "knowledge_bases"}
    with psycopg.connect(db.url) as conn:  # one transaction, rolled back: the columns the batches fill first
        for s in steps:
            if s["action"].startswith("add tenant_id"):
                conn.execute(s["statement"])
        for s in batches:
            bounds = [b"-1"] * (len(s["params"]) // 2) + [b"2147483647"] * (len(s["params"]) // 2)
            result = conn.pgconn.exec_params(b"EXPLAIN " + s["statement"].encode(), bounds)
            assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, \
                (s["table"], s["action"], result.error_message.decode())
            assert b"Update on" in result.get_value(0, 0)
        conn.rollback()


def test_the_notebook_form_shows_whole_statements_with_the_short_lock_and_its_meaning(db):
    with PhaseSession("inspect", params=db.params, database_name=db.name, read_only=True, log=lambda *_: None) as rb:
        frame = inspect.full_plan(rb)
    page = frame._repr_html_()
    longest = max(frame["statement"], key=len)
    assert len(longest) > 200 and plan_text.html.escape(longest) in page  # whole, not cut at 200 with "…"
    assert "ACCESS EXCLUSIVE (brief)</td>" in page and 'title="ACCESS EXCLUSIVE on workflows (metadata only' in page
    assert "white-space:pre-wrap" in page and "text-align:left" in page and "\\n" not in page
    assert "blocks every read and write of the table while held" in page  # the legend below
    text = repr(frame)  # the terminal / text/plain form: whole statements too, real newlines
    assert longest.splitlines()[-1].strip() in text and "\\n" not in text
    assert type(frame[frame["phase"] == "constrain"]).__name__ == "DataFrame"  # selections are plain frames
