"""The same runbook on another PostgreSQL major version, where the machine has one installed.

RUNBOOK_PG_BIN points the server management at other binaries (here Debian's, which `pg_config --bindir`
does not report); the data of each major version lives in its own folder, .runbook/<env>/pg<major>/.
The whole suite can also run on them: RUNBOOK_PG_BIN=/usr/lib/postgresql/15/bin make test.
"""

import json

import pytest

from conftest import ROOT, runbook_cli
from runbook_helpers.db import server

pytestmark = [pytest.mark.slow, pytest.mark.pg_other]

OTHER = [b for b in server.system_bin_dirs() if server.major_version(b) != server.major_version(server.wheel_bin_dir())]


@pytest.mark.skipif(not OTHER, reason="no second PostgreSQL major version installed under /usr/lib/postgresql")
@pytest.mark.parametrize("bin_dir", OTHER, ids=lambda b: f"pg{server.major_version(b)}")
def test_the_whole_runbook_on_another_major_version(bin_dir, home):
    # a checkout copy with its own runs/ (so it runs beside the runner tests); the servers stay in .runbook/
    (home / ".runbook").symlink_to(ROOT / ".runbook")
    env = {"RUNBOOK_PG_BIN": str(bin_dir), "RUNBOOK_HOME": str(home)}
    major = server.major_version(bin_dir)
    try:
        started = runbook_cli("db", "start", "--env", "ci", env=env)
        assert started.returncode == 0, started.stderr
        assert f"PostgreSQL {major}." in started.stdout
        assert f"/.runbook/ci/pg{major}" in started.stdout
        again = runbook_cli("db", "start", "--env", "ci", env=env)
        assert "(reused)" in again.stdout
        assert runbook_cli("demo-db", "--env", "ci", env=env).returncode == 0
        result = runbook_cli("run", "--env", "ci", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        folder = next((home / "runs" / "ci").iterdir())
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "succeeded"
        assert manifest["server"]["version"].startswith(f"{major}.")
    finally:
        stopped = runbook_cli("db", "stop", "--env", "ci", env=env)
        assert stopped.returncode == 0, stopped.stderr


def test_a_bin_folder_without_postgres_is_refused(tmp_path):
    result = runbook_cli("db", "start", "--env", "ci", env={"RUNBOOK_PG_BIN": str(tmp_path)})
    assert result.returncode == 2
    assert f"RUNBOOK_PG_BIN={tmp_path} has no initdb, pg_ctl, postgres" in result.stderr
