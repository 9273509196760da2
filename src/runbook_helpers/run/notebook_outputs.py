"""`make notebooks`: re-execute the committed notebooks in place so their stored outputs are current.

nbval compares the cells marked `# NBVAL_CHECK_OUTPUT` against these stored outputs, so they must come
from a fresh run on the demo database. Papermill's run metadata (paths, timings) is removed afterwards:
the committed notebooks should differ only when their content does.
"""

from __future__ import annotations

import os

import nbformat

from .. import paths
from .runner import NOTEBOOKS, execute_notebook


def _strip(path) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


# 07_distribute runs only on a Citus coordinator: on the demo database it is committed as a dry run, which shows
# its plan and what stops it (nbval re-runs it the same way)
PARAMETERS = {"07_distribute.ipynb": {"dry_run": True}}


def refresh(env: str) -> None:
    os.environ.update({"RUNBOOK_ENV": env, "RUNBOOK_HOME": str(paths.project_root())})
    os.environ.pop("RUNBOOK_RUN_ID", None)
    for name in NOTEBOOKS.values():
        path = paths.notebooks_dir() / name
        print(f"executing {name} ...")
        execute_notebook(path, path, PARAMETERS.get(name))
        _strip(path)
