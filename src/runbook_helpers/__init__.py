"""Helpers for the tenancy runbook: every notebook cell calls into this package.

Layout (imports point down only): the foundation modules errors, paths, params and faults; db (the
database plumbing); backfill (the batch engine), tenancy (the isolation guarantees), distribution (Citus), legacy (the org ->
tenant mapping) and drizzle (the application's migrations); phases (one module per notebook); run (the
session, runner, archive, progress, charts); cli on top. The names the notebooks and the application use
are re-exported here, loaded on first use so that importing a low layer never pulls in the ones above.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "open_phase": ("runbook_helpers.run.session", "open_phase"),   # the first call of every notebook
    "charts": ("runbook_helpers.run.charts", None),                # every notebook's last picture
    "rollback": ("runbook_helpers.phases.rollback", None),         # 99_rollback
    "set_tenant": ("runbook_helpers.tenancy.rls", "set_tenant"),   # for the application (README)
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = import_module(module)
    return getattr(value, attribute) if attribute else value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
