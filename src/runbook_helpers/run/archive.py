"""The audit record of a run: its folder, the manifest with file hashes, HTML renderings, the secret scan.

runs/<env>/<UTC timestamp>-<run id>/ holds each executed notebook, an HTML rendering of each, and
manifest.json. The manifest records the sha256 of every file and of the previous run's manifest of the
same env, so the records form a chain. Before the manifest is written, every file is scanned for the
secrets of this run (the DSN, every password libpq could use for it, in every encoding db/secrets.py
knows; URLs with an inline password); a hit is redacted on disk and fails the run. A folder a killed runner
left without a manifest is scanned by the next run (scan_unfinished_runs).
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
from ..db import secrets as db_secrets

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


# a 1x1 PNG: the warm-up notebook carries every kind of output a phase notebook has
_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def warm_up_html() -> None:
    """Import everything an export of a phase notebook imports (nbconvert, its template, the IPython lexer, the
    Markdown plugins) and compile the template once, by exporting a small notebook with every kind of cell and
    output the phase notebooks have. Run on the thread that imports the rest (the runner's main thread), before
    any other thread renders: later exports then import nothing (tests/test_runner_startup.py)."""
    import nbformat
    from nbconvert import HTMLExporter

    v4 = nbformat.v4
    notebook = v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3", "codemirror_mode": {"name": "ipython",
                                                                                            "version": 3}}})
    notebook.cells = [
        v4.new_markdown_cell("# A phase\n\nWhat the next cell does, and *why* it is `safe`:\n\n- [x] one\n- two "
                             "<https://example.org>\n\nterm\n: definition\n\n| a | b |\n|---|---|\n| 1 | 2 |"
                             + "".join(f"\n\n```{language}\nx\n```" for language in ("diff", "sql", "json", "yaml", "sh"))),
        v4.new_code_cell("rb = open_phase('inspect')\nrb.summary()", outputs=[
            v4.new_output("stream", name="stdout", text="backfill rules: 3,000/3,000 rows (100%)\n"),
            v4.new_output("execute_result", data={"text/plain": "   a\n0  1",
                                                  "text/html": "<table><tr><td>1</td></tr></table>"}, execution_count=1),
            v4.new_output("display_data", data={"image/png": _PIXEL, "text/plain": "<Figure>"}),
            v4.new_output("error", ename="RunbookError", evalue="no baseline",
                          traceback=["\x1b[0;31mRunbookError\x1b[0m: no baseline"])]),
    ]
    HTMLExporter().from_notebook_node(notebook)


def export_html(notebook: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    target = notebook.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


def scan_for_secrets(folder: Path, secrets: list[str]) -> list[str]:
    """Files holding a secret (in any encoding db/secrets.py knows) or an inline-password URL; each hit is
    redacted in place. A finding names the file and the encodings found, never the secret."""
    needles = db_secrets.all_needles(secrets)
    findings = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data, found = db_secrets.redact(path.read_bytes(), secrets, found=needles)
        url_hits = INLINE_PASSWORD.findall(data)
        if found or url_hits:
            data = INLINE_PASSWORD.sub(b"[REDACTED-URL]@", data)
            path.write_bytes(data)
            what = f"a secret of this run ({', '.join(found)})" if found else "a URL with an inline password"
            findings.append(f"{path.relative_to(folder).as_posix()}: contained {what} (redacted)")
    return findings


def redact_text(text: str, secrets: list[str]) -> str:
    """A text bound for the terminal or the manifest (a phase's error), with every form of every secret and
    every inline-password URL replaced."""
    data, _ = db_secrets.redact(text.encode("utf-8"), secrets)
    return INLINE_PASSWORD.sub(b"[REDACTED-URL]@", data).decode("utf-8", errors="replace")


def unfinished_runs(archive_dir: str, env: str) -> list[Path]:
    """Run folders of the env that no runner closed: no manifest (the runner was killed) or a manifest whose
    status is still 'running'."""
    base = _base(archive_dir) / env
    if not base.is_dir():
        return []
    found = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        manifest = folder / MANIFEST
        if not manifest.is_file():
            found.append(folder)
            continue
        try:
            status = json.loads(manifest.read_text(encoding="utf-8")).get("status")
        except (OSError, ValueError):
            status = None
        if status == "running":
            found.append(folder)
    return found


def scan_unfinished_runs(archive_dir: str, env: str, secrets: list[str],
                         skip: Path | None = None) -> dict[Path, list[str]]:
    """Scan (and redact) every run folder of the env that a killed or interrupted runner left unclosed; the
    findings per folder ({} when all are clean). Redaction is idempotent, so a folder scanned again (before
    its manifest is written) reports nothing new. Called by the runner at start; `skip` is the caller's own
    folder."""
    results = {}
    for folder in unfinished_runs(archive_dir, env):
        if skip is not None and folder.resolve() == skip.resolve():
            continue
        findings = scan_for_secrets(folder, secrets)
        if findings:
            results[folder] = findings
    return results


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
