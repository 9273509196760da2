"""The package's layers: every import points down (DESIGN.md, Layout), checked on the source itself.

Foundation modules (errors, paths, params, faults) import only each other; db imports the foundation;
backfill, tenancy and drizzle import db; distribution imports db and tenancy; legacy imports db and backfill (it builds the engine's
assignments); phases import those; run imports phases; cli and demo sit on top. A module-level import
and one inside a function count the same: a lazy import upwards is still a dependency upwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "runbook_helpers"
FOUNDATION = {"errors", "paths", "params", "faults", "__init__"}
# what each layer may import besides itself and the foundation
ALLOWED = {
    "foundation": set(),
    "db": set(),
    "backfill": {"db"},
    "tenancy": {"db"},
    "distribution": {"db", "tenancy"},
    "drizzle": {"db"},
    "legacy": {"db", "backfill"},
    "phases": {"db", "backfill", "tenancy", "distribution", "legacy", "drizzle"},
    "run": {"db", "backfill", "tenancy", "distribution", "legacy", "drizzle", "phases"},
    "demo": {"db", "drizzle"},
    "workload": set(),
    "cli": {"db", "backfill", "tenancy", "distribution", "legacy", "drizzle", "phases", "run", "demo", "workload"},
}
SUBPACKAGES = {"db", "backfill", "tenancy", "distribution", "legacy", "phases", "run"}


def layer_of(parts: list[str]) -> str:
    """The layer of a module given as its path inside the package, e.g. ['db', 'catalog']."""
    head = parts[0]
    if head in SUBPACKAGES:
        return head
    if head in FOUNDATION:
        return "foundation"
    if head in ("drizzle", "drizzle_schema"):
        return "drizzle"  # the application's migrations, and its schema in Drizzle's terms
    return head  # demo, workload, cli


def imported_modules(path: Path) -> list[tuple[int, list[str]]]:
    """(line, module inside the package) for every import of the package's own modules in one file."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    here = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "runbook_helpers":
                target = node.module.split(".")[1:]
            else:
                continue
            if not target:  # from . import a, b: the names are modules (or the package's own attributes)
                found += [(node.lineno, [a.name]) for a in node.names if a.name != "__version__"]
            elif target[0] in SUBPACKAGES and len(target) == 1:
                found += [(node.lineno, [target[0], a.name]) for a in node.names]
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1:]) for a in node.names
                      if a.name.split(".")[0] == "runbook_helpers" and "." in a.name]
    return found


def test_every_import_points_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if rel == ["__init__"]:
            continue  # the package's lazy re-exports for notebooks and the application
        mine = layer_of(rel)
        for line, target in imported_modules(path):
            theirs = layer_of(target)
            if theirs in (mine, "foundation") or theirs in ALLOWED[mine]:
                continue
            wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({mine}) imports {'.'.join(target)} ({theirs})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself can go red: an engine module that imports the session is caught."""
    module = PACKAGE / "backfill" / "engine.py"
    found = [t for _, t in imported_modules(module)]
    assert ["db", "catalog"] in found  # it reads imports at all
    fake = PACKAGE / "backfill" / "_layout_probe.py"
    fake.write_text("def f():\n    from ..run.session import headless\n")
    try:
        targets = [layer_of(t) for _, t in imported_modules(fake)]
        assert targets == ["run"] and "run" not in ALLOWED["backfill"]
    finally:
        fake.unlink()


def test_each_subpackage_says_what_it_is_for_and_may_import():
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"{name}/__init__.py needs a docstring saying what it may import"
