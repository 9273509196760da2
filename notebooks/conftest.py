"""nbval runs the notebooks in order against a fresh demo database of the ci env (never your local one)."""

import os


def pytest_sessionstart(session):
    opts = session.config.option
    if not (getattr(opts, "nbval", False) or getattr(opts, "nbval_lax", False)):
        return
    os.environ.setdefault("RUNBOOK_ENV", "ci")
    os.environ["RUNBOOK_HEADLESS"] = "1"
    os.environ.pop("RUNBOOK_RUN_ID", None)
    from runbook_helpers.cli import _demo_db

    _demo_db(os.environ["RUNBOOK_ENV"], None)
