"""The notebooks as a user runs them with plain `papermill` (no runner, none of its environment variables):
a mistyped parameter stops the notebook before a session opens and changes nothing; `overrides` may be a JSON
string; the backfill's progress leaves milestone lines on stdout and nothing on stderr. In-process: the
parameter checks themselves, and phases run out of order naming the notebook to run first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from runbook_helpers import open_phase
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import seed
from runbook_helpers.run import parameters as notebook_parameters
from runbook_helpers.run.runner import NOTEBOOKS


def papermill(notebook: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`papermill` as a user would call it: the runner's variables (RUNBOOK_HEADLESS, RUNBOOK_RUN_ID) unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_HEADLESS", "RUNBOOK_RUN_ID")}
    cmd = [str(Path(sys.executable).with_name("papermill")), str(ROOT / "notebooks" / notebook), str(out),
           "-p", "env", "ci", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def overrides_for(db, **more) -> str:
    return json.dumps({"database": {"name": db.name}, "legacy": {"enabled": False}, **more})


def relations(db) -> list[str]:
    return [r[0] for r in db.connect().execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1").fetchall()]


def test_a_mistyped_parameter_stops_papermill_before_anything_runs(migrated_db, tmp_path):
    db = migrated_db("inspect")
    before = relations(db), db.scalar("SELECT count(*) FROM users")
    out = tmp_path / "02_seed.ipynb"
    # overrides as a dict (papermill's -y), so that only the typo differs from a run that would seed for real
    done = papermill("02_seed.ipynb", out, "-p", "dryrun", "True", "-y",
                     "overrides: " + json.dumps({"database": {"name": db.name}}))  # the legacy mapping on (ci's)
    assert done.returncode != 0
    assert "Passed unknown parameter: dryrun" in done.stderr  # papermill's own warning: all it does
    errors = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "RunbookError"
    assert "unknown notebook parameter 'dryrun' (did you mean 'dry_run'?)" in errors[0].evalue
    # seed did not run: no new relation (its mapping tables in the ledger), no user migrated
    assert (relations(db), db.scalar("SELECT count(*) FROM users")) == before
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.phase_runs WHERE phase = 'seed'") == 0


def test_backfill_under_plain_papermill_prints_milestones_and_nothing_on_stderr(migrated_db, tmp_path):
    db = migrated_db("inspect", "seed")
    out = tmp_path / "03_backfill.ipynb"
    # overrides as a JSON string, as `-p` passes it (a str: it crashed with AttributeError before)
    done = papermill("03_backfill.ipynb", out, "-p", "overrides", overrides_for(db))
    assert done.returncode == 0, done.stderr[-3000:]
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert [o for o in outputs if o.output_type == "stream" and o.name == "stderr"] == []
    assert [o for o in outputs if o.output_type == "error"] == []
    apply_cell = next(c for c in nb.cells if "phases.backfill.apply(rb)" in c.source)
    text = "".join(o.get("text", "") for o in apply_cell.outputs if o.output_type == "stream")
    assert "backfill knowledge_bases: " in text and " rows (100%), " in text and " rows/s" in text
    # one bar per batched table (its last state), the milestone lines, the summary: not a frame per redraw
    bars = [o for o in apply_cell.outputs if o.output_type == "display_data"]
    assert 1 <= len(bars) <= 20 and all("<progress" in o.data["text/html"] for o in bars)
    assert len(apply_cell.outputs) <= 40
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0
    # what a direct papermill run records (the README says so): the phase and its statements in the ledger,
    # without a run id; no run in the ledger's runs (so no archive: only the runner writes one)
    assert db.connect().execute("SELECT run_id, status FROM tenancy_runbook.phase_runs WHERE phase = 'backfill'"
                                ).fetchall() == [(None, "succeeded")]
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.statement_journal WHERE phase = 'backfill' "
                     "AND run_id IS NULL") > 0
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.runs") == 0


def test_every_notebook_declares_exactly_the_parameters_the_check_knows():
    for phase, name in NOTEBOOKS.items():
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assigned = notebook_parameters.injected_names([notebook_parameters.INJECTED_HEADER + "\n" + cell.source])
        assert assigned == list(notebook_parameters.declared(phase)), name


def test_unknown_names_and_wrong_types_are_refused_before_a_session_opens():
    injected = ["import os\nenv = 'ci'", "# Parameters\nenv = \"ci\"\ndryrun = True\n"]
    with pytest.raises(RunbookError, match=r"unknown notebook parameter 'dryrun' \(did you mean 'dry_run'\?\)"):
        notebook_parameters.check_names("seed", injected)
    notebook_parameters.check_names("finalize", ["# Parameters\nsince = '2026-12-01'\nforce = True\n"])
    with pytest.raises(RunbookError, match="unknown notebook parameter 'since'"):
        notebook_parameters.check_names("seed", ["# Parameters\nsince = '2026-12-01'\n"])
    with pytest.raises(RunbookError, match="dry_run must be True or False, got 'false'"):
        open_phase("seed", "ci", dry_run="false")
    with pytest.raises(RunbookError, match="overrides parameter is not valid JSON"):
        open_phase("seed", "ci", overrides="{backfill: 1}")
    assert notebook_parameters.overrides_dict('{"backfill": {"batch_size": 5}}') == {"backfill": {"batch_size": 5}}


def test_overrides_as_a_json_string_reach_the_session(db):
    rb = open_phase("inspect", "ci", dry_run=True, overrides=json.dumps(
        {"database": {"name": db.name}, "backfill": {"batch_size": 1234}}))
    try:
        assert rb.params.backfill.batch_size == 1234
        assert json.loads(rb.summary().loc["params overridden", "value"])["backfill"] == {"batch_size": 1234}
    finally:
        rb.close()


def test_seed_before_inspect_says_run_01_inspect_first(db):
    before = relations(db), db.scalar("SELECT count(*) FROM tenants")
    rb = db.session("seed")
    try:
        with pytest.raises(RunbookError) as err:
            seed.apply(rb)
    finally:
        rb.close()
    message = str(err.value)
    assert "run 01_inspect" in message and "first" in message and not message.startswith("None")
    assert (relations(db), db.scalar("SELECT count(*) FROM tenants")) == before  # no ledger, no System Tenant
