"""The Citus cluster of the tests (tests/citus/cluster.py), for the benchmarks that need one: the same nodes, ports
and data folders (.runbook/citus-*), started if they are not running. Imported from where it lives rather than
moved: it is the Citus suite's fixture first (its build script and skip message sit beside it), and bench/ only
needs its start-up; `missing()` builds and installs Citus when the machine can, and says how otherwise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "tests" / "citus" / "cluster.py"
_spec = importlib.util.spec_from_file_location("runbook_citus_cluster", _PATH)
cluster_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cluster_mod
_spec.loader.exec_module(cluster_mod)


def missing() -> str | None:
    """Why no Citus cluster can run here (None: it can), saying how to get one."""
    return cluster_mod.missing()
