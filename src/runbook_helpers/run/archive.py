"""The audit record of a run: its folder, the manifest with file hashes, HTML renderings, the secret scan.

runs/<env>/<UTC timestamp>-<run id>/ holds each executed notebook, an HTML rendering of each, and
manifest.json. The manifest records the sha256 of every file and of the previous run's manifest of the
same env, so the records form a chain. Before the manifest is written, every file is scanned for the
secrets of this run (the DSN, its password, URLs with an inline password); a hit is redacted on disk and
fails the run.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import paths

MANIFEST = "manifest.json"
# The lookbehind starts a match only where a URL scheme can start: without it, every long base64 run in
# an embedded chart is re-scanned from each of its characters (quadratic: seconds per archive).
INLINE_PASSWORD = re.compile(rb"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^/\s:@\"']+:[^@\s/\"']+@", re.IGNORECASE)


def run_folder(archive_dir: str, env: str, started: datetime, run_id: str) -> Path:
    base = Path(archive_dir)
    if not base.is_absolute():
        base = paths.project_root() / base
    folder = base / env / f"{started:%Y%m%dT%H%M%SZ}-{run_id}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def previous_manifest(folder: Path) -> Path | None:
    """The newest earlier run of the same env (folder names sort by UTC timestamp)."""
    earlier = sorted(p for p in folder.parent.iterdir() if p.is_dir() and p.name < folder.name and (p / MANIFEST).is_file())
    return earlier[-1] / MANIFEST if earlier else None


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, data: dict[str, Any]) -> str:
    prev = previous_manifest(folder)
    data = dict(data)
    data["previous_manifest"] = {"run": prev.parent.name, "sha256": sha256_file(prev)} if prev else None
    data["files"] = file_hashes(folder)
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    return sha256_file(folder / MANIFEST)


def warm_up_html() -> None:
    """Import nbconvert and compile its template once, so the first real export is as fast as the rest."""
    import nbformat
    from nbconvert import HTMLExporter

    HTMLExporter().from_notebook_node(nbformat.v4.new_notebook())


def export_html(notebook: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    target = notebook.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


def scan_for_secrets(folder: Path, secrets: list[str]) -> list[str]:
    """Files holding a secret (or an inline-password URL); each hit is redacted in place."""
    needles = [s.encode("utf-8") for s in secrets if s and len(s) >= 4]
    findings = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        hit = [n for n in needles if n in data]
        url_hits = INLINE_PASSWORD.findall(data)
        if hit or url_hits:
            for needle in sorted(hit, key=len, reverse=True):
                data = data.replace(needle, b"[REDACTED]")
            data = INLINE_PASSWORD.sub(b"[REDACTED-URL]@", data)
            path.write_bytes(data)
            what = "a secret of this run" if hit else "a URL with an inline password"
            findings.append(f"{path.relative_to(folder).as_posix()}: contained {what} (redacted)")
    return findings


def git_commit(root: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or paths.project_root(),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def list_runs(archive_dir: str, env: str) -> list[dict[str, Any]]:
    base = Path(archive_dir)
    if not base.is_absolute():
        base = paths.project_root() / base
    runs = []
    for manifest in sorted((base / env).glob(f"*/{MANIFEST}")):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        runs.append({"run": manifest.parent.name, "status": data.get("status"), "dry_run": data.get("dry_run"),
                     "phases": ",".join(p["name"] for p in data.get("phases", [])),
                     "operator": data.get("operator"), "folder": str(manifest.parent)})
    return runs


def _base(archive_dir: str) -> Path:
    base = Path(archive_dir)
    return base if base.is_absolute() else paths.project_root() / base


def find_run(archive_dir: str, env: str, run: str) -> Path:
    """A run folder by path, folder name or run id."""
    from ..errors import RunbookError

    candidate = Path(run)
    if candidate.is_dir() and (candidate / MANIFEST).is_file():
        return candidate
    folder = _base(archive_dir) / env
    matches = [p for p in folder.glob("*") if p.is_dir() and (p.name == run or p.name.endswith(f"-{run}"))]
    if len(matches) != 1:
        raise RunbookError(f"no single run {run!r} under {folder} ({len(matches)} found); see `runbook audit list "
                           f"--env {env}`")
    return matches[0]


def verify(folder: Path) -> list[str]:
    """Every way the run folder differs from its manifest, and the manifest from the chain."""
    import json as _json

    problems: list[str] = []
    manifest_path = folder / MANIFEST
    try:
        manifest = _json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST}: unreadable ({exc})"]
    recorded: dict[str, str] = manifest.get("files", {})
    actual = file_hashes(folder)
    for name, digest in sorted(recorded.items()):
        if name not in actual:
            problems.append(f"{name}: listed in the manifest but missing")
        elif actual[name] != digest:
            problems.append(f"{name}: sha256 {actual[name]} differs from the manifest's {digest}")
    for name in sorted(set(actual) - set(recorded)):
        problems.append(f"{name}: present but not in the manifest")
    previous = manifest.get("previous_manifest")
    expected_previous = previous_manifest(folder)
    if previous is None and expected_previous is not None:
        problems.append(f"chain: the manifest names no predecessor, but {expected_previous.parent.name} precedes it")
    elif previous is not None:
        prev_path = folder.parent / previous["run"] / MANIFEST
        if not prev_path.is_file():
            problems.append(f"chain: predecessor {previous['run']} is missing")
        elif sha256_file(prev_path) != previous["sha256"]:
            problems.append(f"chain: predecessor {previous['run']}/manifest.json has sha256 {sha256_file(prev_path)}, "
                            f"not the {previous['sha256']} recorded here (it was changed after this run)")
        if expected_previous is not None and expected_previous.parent.name != previous["run"]:
            problems.append(f"chain: the manifest names {previous['run']} as predecessor, but "
                            f"{expected_previous.parent.name} precedes it (a run was removed or inserted)")
    return problems
