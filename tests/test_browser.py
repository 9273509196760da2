"""The notebooks as a person sees them (issue 17): JupyterLab and the archived HTML in a real, headless Chromium.

JupyterLab (the project's own `jupyter lab`) serves a copy of the notebooks whose ci env names a fresh database of
this module, so its kernels never touch the shared ci demo database; 01_inspect is run with Lab's menu Run > Run
All Cells, and must show no error, its plan table and its chart. An archive made by `runbook run --phases
inspect` (papermill, on a database of its own) is opened from its file:// URL without any kernel, with the same
checks. Three more tests show that the checks catch what they look for: a deliberately failing cell in Lab, an
archived page with an error output, and one whose chart is missing, broken or hidden.

Screenshots land in tests/artifacts/browser/ (git-ignored). RUNBOOK_SCREENSHOTS=all adds a test that runs every
notebook in Lab in runbook order (01 … 05, 06_finalize, 99_rollback) on one database and screenshots each, and
archives a whole run, a finalize and a rollback on another and screenshots every HTML page:
    RUNBOOK_SCREENSHOTS=all .venv/bin/pytest -q -s tests/test_browser.py
Without Chromium or the playwright package every test here skips, saying how to install them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from runbook_helpers.run import archive as archive_mod
from browser import (ARTIFACTS, LAB_SCROLLER, broken_images, chart_image, chromium, error_outputs, jupyter_lab,
                     model_errors, open_notebook, plan_table, require_browser, run_all_cells, screenshot_pages,
                     stderr_outputs)
from conftest import Db, ci_home, copy_home, create_database, drop_database, runbook_cli

pytestmark = pytest.mark.slow

SCREENSHOTS = os.environ.get("RUNBOOK_SCREENSHOTS", "")
LAB_ORDER = ["01_inspect.ipynb", "02_seed.ipynb", "03_backfill.ipynb", "04_constrain.ipynb", "05_validate.ipynb",
             "06_finalize.ipynb", "99_rollback.ipynb"]
CHART_OF_01 = "charts.row_counts("


@contextmanager
def database_home(server, template, params, folder: Path):
    """A fresh copy of the test template, and a RUNBOOK_HOME in `folder` whose ci env is that database."""
    name = f"b_{uuid.uuid4().hex[:12]}"
    create_database(server, name, template)
    try:
        yield ci_home(copy_home(folder), name), Db(server, name, params)
    finally:
        drop_database(server, name)


def kernel_env(home: Path) -> dict[str, str]:
    """What Lab's kernels see: this home's ci env; they are not headless (someone watches the page)."""
    return {"RUNBOOK_HOME": str(home), "RUNBOOK_ENV": "ci", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


@pytest.fixture(scope="module", autouse=True)
def browser_present():
    """Before any database, Lab or archive is made: skip the module when there is no browser to look with."""
    require_browser()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


@pytest.fixture(scope="module")
def lab_db(server, template, ci_params, tmp_path_factory):
    with database_home(server, template, ci_params, tmp_path_factory.mktemp("lab-home")) as (home, db):
        yield home, db


@pytest.fixture(scope="module")
def lab(browser, lab_db, tmp_path_factory):
    home, _ = lab_db
    with jupyter_lab(home / "notebooks", tmp_path_factory.mktemp("lab-state"), kernel_env(home)) as lab:
        yield lab


@pytest.fixture
def lab_page(lab, page):
    yield page
    lab.shut_down_kernels()   # each test's kernel ends with it: its sessions, its runbook lock


@dataclass
class Archive:
    folder: Path                          # runs/ci/<timestamp>-<run id>/
    run: subprocess.CompletedProcess      # the `runbook run` that made it


@pytest.fixture(scope="module")
def archive(server, template, ci_params, tmp_path_factory) -> Archive:
    """The run folder of `runbook run --env ci --phases inspect` (papermill, nbconvert) on a database of its own.
    A failed run is archived too: the page test then shows what its reader would see, before the exit code."""
    with database_home(server, template, ci_params, tmp_path_factory.mktemp("archive-home")) as (home, _):
        result = runbook_cli("run", "--env", "ci", "--phases", "inspect", env={"RUNBOOK_HOME": str(home)})
        folders = [p for p in (home / "runs" / "ci").iterdir() if p.is_dir()]
        assert len(folders) == 1 and (folders[0] / "01_inspect.html").is_file(), result.stdout + result.stderr
        yield Archive(folders[0], result)


def test_01_inspect_in_jupyterlab_runs_clean_and_shows_its_plan_and_chart(lab, lab_db, lab_page):
    page, (_, db) = lab_page, lab_db
    shots = ARTIFACTS / "lab"
    shots.mkdir(parents=True, exist_ok=True)
    open_notebook(page, lab, "01_inspect.ipynb")
    run_all_cells(page)
    try:
        errors = model_errors(page) + error_outputs(page)
        assert errors == [], "\n".join(errors)
        plan_table(page)
        page.screenshot(path=str(shots / "01_inspect-plan.png"))
        chart_image(page, CHART_OF_01)
        page.screenshot(path=str(shots / "01_inspect-chart.png"))
        assert broken_images(page) == []
    finally:
        page.screenshot(path=str(shots / "01_inspect-last-screen.png"))
        print(f"screenshots of 01_inspect in JupyterLab: {shots}")
    # the kernel worked on this module's database: inspect captured its baseline there
    assert db.scalar("SELECT count(*) FROM tenancy_runbook.baseline") == len(db.params.tables)


def test_archived_html_shows_the_plan_and_chart_without_a_kernel(archive, page):
    shots = ARTIFACTS / "html"
    shots.mkdir(parents=True, exist_ok=True)
    page.goto((archive.folder / "01_inspect.html").as_uri())
    try:
        errors = error_outputs(page)
        assert errors == [], "\n".join(errors)
        plan_table(page)
        page.screenshot(path=str(shots / "01_inspect-plan.png"))
        chart_image(page, CHART_OF_01)
        page.screenshot(path=str(shots / "01_inspect-chart.png"))
        assert broken_images(page) == []
    finally:
        print(f"screenshots of the archived 01_inspect.html: {shots}")
    assert archive.run.returncode == 0, archive.run.stdout[-2000:] + archive.run.stderr[-2000:]


def test_a_failing_cell_is_reported_as_an_error(lab, lab_page):
    """The detection itself: Lab runs a notebook whose second code cell raises; both checks name it."""
    page = lab_page
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("A notebook that fails on purpose."),
        nbformat.v4.new_code_cell('print("before")'),
        nbformat.v4.new_code_cell('raise RuntimeError("a deliberately failing cell")'),
        nbformat.v4.new_code_cell('print("never runs")'),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}})
    path = lab.root / "zz_fails_on_purpose.ipynb"
    nbformat.write(notebook, path)
    try:
        open_notebook(page, lab, path.name)
        run_all_cells(page)
        assert model_errors(page) == ["cell 3: RuntimeError: a deliberately failing cell"]
        (shown,) = error_outputs(page)
        assert "RuntimeError" in shown and "a deliberately failing cell" in shown
    finally:
        path.unlink()


def test_an_error_in_an_archived_page_is_detected(archive, page, tmp_path):
    """The detection itself: the archived notebook with an error output in its plan cell, rendered as the archive
    renders it (nbconvert), opened without a kernel."""
    notebook = nbformat.read(archive.folder / "01_inspect.ipynb", as_version=4)
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and "full_plan(" in c.source]
    cell.outputs.append(nbformat.v4.new_output("error", ename="RunbookError", evalue="a deliberate failure",
                                               traceback=["Traceback (most recent call last):",
                                                          "RunbookError: a deliberate failure"]))
    nbformat.write(notebook, tmp_path / "01_inspect.ipynb")
    page.goto(archive_mod.export_html(tmp_path / "01_inspect.ipynb").as_uri())
    (shown,) = error_outputs(page)
    assert "RunbookError: a deliberate failure" in shown


def test_a_missing_broken_or_hidden_chart_is_detected(archive, page, tmp_path):
    """The detection itself, on copies of a real archived page: the chart's PNG removed, cut, or hidden."""
    source = (archive.folder / "01_inspect.html").read_text()
    images = re.findall(r'<img [^>]*src="data:image/png;base64,[^"]+"[^>]*>', source)
    assert len(images) == 1, "01_inspect.html should hold exactly one image, its chart"
    variants = {
        "missing": (source.replace(images[0], ""), "not on the page"),
        "broken": (re.sub(r'base64,[^"]+"', 'base64,iVBORw0KGgoAAAANSUhEUgAAA"', source), "did not load"),
        "hidden": (source.replace("</head>", "<style>.jp-OutputArea-output img {visibility: hidden}</style></head>"),
                   "not visible"),
    }
    for label, (html, message) in variants.items():
        copy = tmp_path / f"01_inspect-{label}.html"
        copy.write_text(html)
        page.goto(copy.as_uri())
        with pytest.raises(AssertionError, match=message):
            chart_image(page, CHART_OF_01)
        if label == "broken":
            assert broken_images(page) == ["data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAA"]
        plan_table(page)   # the rest of the page still passes


def stderr_note(where: str, outputs: list[str]) -> str:
    blank = sum(1 for text in outputs if not text)
    return (f"{where}: {len(outputs)} stderr outputs that are not errors ({blank} empty)"
            + (f", e.g. {next(t for t in outputs if t)!r}" if blank < len(outputs) else "")) if outputs else ""


@pytest.mark.timeout(1800)
def test_screenshots_of_every_notebook_in_lab_and_every_archived_page(server, template, ci_params, browser, tmp_path):
    if SCREENSHOTS != "all":
        pytest.skip("screenshots of every notebook and archived page: RUNBOOK_SCREENSHOTS=all")
    out = ARTIFACTS / "all"
    shutil.rmtree(out, ignore_errors=True)
    problems: dict[str, list[str]] = {}
    notes: list[str] = []   # stderr outputs that are not errors: shown for a person to judge, not failed on
    page = browser.new_page()
    with database_home(server, template, ci_params, tmp_path / "lab-home") as (home, _):
        with jupyter_lab(home / "notebooks", tmp_path / "lab-state", kernel_env(home)) as lab:
            for notebook in LAB_ORDER:
                open_notebook(page, lab, notebook)
                run_all_cells(page, timeout_s=900)
                found = model_errors(page) + error_outputs(page) + [f"image not loaded: {s}" for s in broken_images(page)]
                notes.append(stderr_note(f"lab/{notebook}", stderr_outputs(page)))
                screenshot_pages(page, out / "lab", Path(notebook).stem, LAB_SCROLLER)
                lab.shut_down_kernels()
                if found:
                    problems[f"lab/{notebook}"] = found
    with database_home(server, template, ci_params, tmp_path / "archive-home") as (home, _):
        for command in (["run"], ["finalize"], ["rollback"]):
            result = runbook_cli(*command, "--env", "ci", env={"RUNBOOK_HOME": str(home)}, timeout=900)
            if result.returncode:
                problems[f"runbook {command[0]}"] = [result.stdout[-1500:] + result.stderr[-1500:]]
        for html in sorted((home / "runs" / "ci").glob("*/*.html")):
            page.goto(html.as_uri())
            found = error_outputs(page) + [f"image not loaded: {s}" for s in broken_images(page)]
            notes.append(stderr_note(f"html/{html.parent.name}/{html.name}", stderr_outputs(page)))
            screenshot_pages(page, out / "html", html.stem)
            if found:
                problems[f"html/{html.parent.name}/{html.name}"] = found
    page.close()
    print("\n".join(note for note in notes if note))
    print(f"screenshots of every notebook in JupyterLab: {out / 'lab'}; of every archived page: {out / 'html'}")
    assert problems == {}
