"""Where the project's folders are: params/, notebooks/, .runbook/, runs/.

The notebooks run with notebooks/ as their working directory and the CLI runs from anywhere, so the
project root is found once here: $RUNBOOK_HOME, else the nearest folder above the working directory
that holds params/base.yaml, else the checkout this package was installed from (editable install).
"""

import os
from functools import lru_cache
from pathlib import Path

from .errors import RunbookError


def _has_params(folder: Path) -> bool:
    return (folder / "params" / "base.yaml").is_file()


@lru_cache(maxsize=None)
def _root_for(cwd: str, home: str | None) -> Path:
    if home:
        root = Path(home).expanduser().resolve()
        if not _has_params(root):
            raise RunbookError(
                f"RUNBOOK_HOME={home} has no params/base.yaml; point RUNBOOK_HOME at the runbook checkout"
            )
        return root
    here = Path(cwd).resolve()
    for folder in (here, *here.parents):
        if _has_params(folder):
            return folder
    checkout = Path(__file__).resolve().parents[2]
    if _has_params(checkout):
        return checkout
    raise RunbookError(
        "cannot find the runbook checkout (no params/base.yaml above the working directory); "
        "cd into the checkout or set RUNBOOK_HOME"
    )


def project_root() -> Path:
    return _root_for(os.getcwd(), os.environ.get("RUNBOOK_HOME"))


def params_dir() -> Path:
    return project_root() / "params"


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def state_dir(env: str) -> Path:
    """Local server data for an environment: .runbook/<env>/ (git-ignored)."""
    return project_root() / ".runbook" / env
