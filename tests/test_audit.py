"""Audit records: the password of a DSN never reaches an archived file; a planted secret fails the run;
manifests are hash-chained and `runbook audit verify` names any tampering."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import runbook_cli, staging_dsn
from runbook_helpers.run import archive

pytestmark = pytest.mark.slow
PASSWORD = "Sup3r-Secret-pw-4711"


def secret_dsn(db) -> str:
    return staging_dsn(db, password=PASSWORD)


def test_the_password_reaches_no_archived_file(db, home):
    result = runbook_cli("run", "--env", "staging", env={"RUNBOOK_STAGING_DSN": secret_dsn(db),
                                                         "RUNBOOK_HOME": str(home)})
    assert result.returncode == 0, result.stdout + result.stderr
    folder = next((home / "runs" / "staging").iterdir())
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".ipynb", ".html", ".json"}
    for path in files:
        assert PASSWORD not in path.read_text(errors="replace"), path
    assert PASSWORD not in result.stdout + result.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["secret_scan"] == "clean"
    assert manifest["params"]["database"]["dsn_env"] == "RUNBOOK_STAGING_DSN"


def test_a_secret_planted_in_an_output_fails_the_run_and_is_redacted(db, home):
    notebook = home / "notebooks" / "01_inspect.ipynb"
    book = json.loads(notebook.read_text())
    book["cells"].insert(3, {"cell_type": "code", "execution_count": None, "id": "debugprint", "metadata": {},
                             "outputs": [], "source": ["import os\n", "print(os.environ['RUNBOOK_STAGING_DSN'])"]})
    notebook.write_text(json.dumps(book))
    result = runbook_cli("run", "--env", "staging", "--phases", "inspect",
                         env={"RUNBOOK_STAGING_DSN": secret_dsn(db), "RUNBOOK_HOME": str(home)})
    assert result.returncode == 1
    assert "SECRET FOUND: 01_inspect.ipynb" in result.stdout
    folder = next((home / "runs" / "staging").iterdir())
    for path in folder.rglob("*"):
        if path.is_file():
            assert PASSWORD not in path.read_text(errors="replace"), path
    assert "[REDACTED]" in (folder / "01_inspect.ipynb").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert any(p.startswith("01_inspect.ipynb: contained a secret") for p in manifest["secret_scan"])


def make_run(base: Path, name: str, files: dict[str, str]) -> Path:
    folder = base / name
    folder.mkdir(parents=True)
    for file, text in files.items():
        (folder / file).write_text(text)
    archive.write_manifest(folder, {"run_id": name[-8:], "status": "succeeded"})
    return folder


def test_audit_verify_names_tampering_precisely(tmp_path):
    base = tmp_path / "runs" / "ci"
    first = make_run(base, "20260101T000000Z-aaaaaaaa", {"01_inspect.ipynb": "one", "01_inspect.html": "<p>1</p>"})
    second = make_run(base, "20260102T000000Z-bbbbbbbb", {"01_inspect.ipynb": "two"})
    third = make_run(base, "20260103T000000Z-cccccccc", {"01_inspect.ipynb": "three"})
    assert archive.verify(first) == [] and archive.verify(second) == [] and archive.verify(third) == []
    (second / "01_inspect.ipynb").write_text("two, edited")
    (second / "extra.txt").write_text("slipped in")
    problems = archive.verify(second)
    assert problems[0].startswith("01_inspect.ipynb: sha256 ") and "differs from the manifest's" in problems[0]
    assert problems[1] == "extra.txt: present but not in the manifest"
    manifest = json.loads((first / "manifest.json").read_text())
    manifest["status"] = "failed"
    (first / "manifest.json").write_text(json.dumps(manifest))
    assert any("predecessor 20260101T000000Z-aaaaaaaa/manifest.json has sha256" in p for p in archive.verify(second))
    shutil.rmtree(second)
    assert archive.verify(third) == ["chain: predecessor 20260102T000000Z-bbbbbbbb is missing",
                                     "chain: the manifest names 20260102T000000Z-bbbbbbbb as predecessor, but "
                                     "20260101T000000Z-aaaaaaaa precedes it (a run was removed or inserted)"]


def test_audit_cli_lists_and_verifies(tmp_path, home):
    base = home / "runs" / "ci"
    make_run(base, "20260101T000000Z-aaaaaaaa", {"01_inspect.ipynb": "one"})
    listed = runbook_cli("audit", "list", "--env", "ci", env={"RUNBOOK_HOME": str(home)})
    assert "20260101T000000Z-aaaaaaaa  succeeded" in listed.stdout
    ok = runbook_cli("audit", "verify", "aaaaaaaa", "--env", "ci", env={"RUNBOOK_HOME": str(home)})
    assert ok.returncode == 0 and "every file matches its manifest" in ok.stdout
    (base / "20260101T000000Z-aaaaaaaa" / "01_inspect.ipynb").write_text("changed")
    bad = runbook_cli("audit", "verify", "aaaaaaaa", "--env", "ci", env={"RUNBOOK_HOME": str(home)})
    assert bad.returncode == 1 and "TAMPERED OR INCOMPLETE" in bad.stdout and "01_inspect.ipynb: sha256" in bad.stdout
