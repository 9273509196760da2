"""A plan's statements as text a person or a migration linter reads: the one place placeholders become
PostgreSQL's own `$1`, `$2`, … and the SQL and JSON forms of `runbook plan` are written.
"""

from __future__ import annotations

import html
import json
import re

import pandas as pd

from .names import SYSTEM_TENANT_ID_UNKNOWN

_PLACEHOLDER = re.compile(r"%%|%s|" + re.escape(SYSTEM_TENANT_ID_UNKNOWN))
SYSTEM_TENANT_PARAM = "the System Tenant's id (02_seed inserts it; its uuid is system_tenant.uuid in params)"


def statement_text(rendered: str, held: tuple[str, ...] = ()) -> tuple[str, list[dict]]:
    """The statement with each placeholder as $n, and [{"param": "$n", "holds": …}]. `held` says what each %s
    holds (a step with none has no %s: its text is taken as it is, a literal % included); the System Tenant's
    id, before seed inserted it, becomes a parameter too."""
    params: list[dict] = []
    held_left = list(held)

    def number(match: re.Match) -> str:
        token = match.group(0)
        if token == "%%":
            return "%" if held else token
        if token == "%s" and not held:
            return token
        what = SYSTEM_TENANT_PARAM if token == SYSTEM_TENANT_ID_UNKNOWN else held_left.pop(0)
        for p in params:  # the System Tenant's id is one parameter however often it appears
            if p["holds"] == what == SYSTEM_TENANT_PARAM:
                return p["param"]
        params.append({"param": f"${len(params) + 1}", "holds": what})
        return params[-1]["param"]

    return _PLACEHOLDER.sub(number, rendered), params


def records(frame: pd.DataFrame) -> list[dict]:
    """The plan as a list of objects (the JSON form)."""
    out = []
    for r in frame.to_dict("records"):
        out.append({"phase": r["phase"], "table": r["table"] or None, "action": r["action"],
                    "statement": r["statement"], "lock": r["lock"], "lock_mode": r["lock mode"],
                    "lock_target": [{"relation": rel, "mode": mode} for rel, mode in r["locks"].items()],
                    "brief": r["brief"], "why": r["why safe"], "params": r["params"]})
    return out


def to_json(frame: pd.DataFrame) -> str:
    return json.dumps(records(frame), indent=2, ensure_ascii=False) + "\n"


def _comment(text: str) -> str:
    return "\n".join(f"-- {line}".rstrip() for line in text.splitlines() or [""])


def to_sql(frame: pd.DataFrame, header: str = "", lock_timeout_ms: int | None = None) -> str:
    """Every statement as it will run, `;`-terminated, each after a `--` comment with its phase, table, lock and
    why it is safe; a statement the batch engine runs once per batch says what its $n bounds hold. With
    `lock_timeout_ms`, first the session's lock_timeout as the ladder's first try sets it."""
    parts = [_comment(header)] if header else []
    if lock_timeout_ms is not None:
        parts.append(_comment("every statement waits this long for its lock on its first try, twice as long on each "
                              "next one (locks.first_lock_timeout_ms up to locks.lock_timeout_ms)")
                     + f"\nSET lock_timeout = '{int(lock_timeout_ms)}ms';")
    for i, r in enumerate(frame.to_dict("records"), 1):
        lines = [f"{i}. {r['phase']}" + (f" · {r['table']}" if r["table"] else "") + f": {r['action']}",
                 f"lock: {r['lock']}", f"why: {r['why safe']}"]
        lines += [f"{p['param']}: {p['holds']}" for p in r["params"]]
        statement = r["statement"].rstrip().rstrip(";")
        parts.append(_comment("\n".join(lines)) + "\n" + statement + ";")
    return "\n\n".join(parts) + "\n"


# --- for reading in a notebook (JupyterLab, the archived HTML) and in a terminal ------------------------------

# What each mode in the short lock column means for the application (the legend under a plan table).
MODE_MEANING = {
    "ACCESS EXCLUSIVE": "blocks every read and write of the table while held",
    "EXCLUSIVE": "blocks writes and most reads while held",
    "SHARE ROW EXCLUSIVE": "blocks writes to the table (not reads) while held",
    "SHARE": "blocks writes to the table (not reads) while held",
    "SHARE UPDATE EXCLUSIVE": "reads and writes continue; only other DDL, VACUUM and ANALYZE wait",
    "ROW EXCLUSIVE": "what the application's own writes take: reads and writes continue (row locks only)",
    "ROW SHARE": "reads and writes continue; only ACCESS EXCLUSIVE and EXCLUSIVE wait",
    "ACCESS SHARE": "a read: only ACCESS EXCLUSIVE waits",
    "none": "no lock on an existing table",
}
BRIEF = ("(brief): a catalog change, held for milliseconds; each try waits for the lock at most lock_timeout "
         "(a short, growing ladder), so the application queues behind it for tens of milliseconds at most")

_CELL = "text-align:left;vertical-align:top;"
LONG_STATEMENT_LINES = 25
_COLUMNS = (("#", "2.5em"), ("phase", "5.5em"), ("table", "8em"), ("action and why it is safe", "16em"),
            ("lock", "11.5em"), ("statement", None))


def _cell(content: str, extra: str = "", title: str | None = None) -> str:
    tip = f' title="{html.escape(title, quote=True)}"' if title else ""
    return f'<td style="{_CELL}{extra}"{tip}>{content}</td>'


def plan_html(frame: pd.DataFrame) -> str:
    """A plan table for reading: whole statements in monospace, wrapped, left-aligned, inside the output's width;
    the lock in its short form, the whole sentence on hover, and a legend of the modes below. Inline styles only,
    so it looks the same in JupyterLab and in the archive's HTML (nbconvert)."""
    if frame.empty:
        return "<p><em>Nothing to do: the catalog shows every statement of this plan already applied.</em></p>"
    cols = "".join(f'<col style="width:{w}">' if w else "<col>" for _, w in _COLUMNS)
    head = "".join(f'<th style="{_CELL}font-weight:bold">{name}</th>' for name, _ in _COLUMNS)
    rows = []
    for i, r in enumerate(frame.to_dict("records"), 1):
        statement = html.escape(r["statement"])
        if r.get("params"):
            statement += "\n" + html.escape("\n".join(f"-- {p['param']}: {p['holds']}" for p in r["params"]))
        pre = (f'<pre style="margin:0;white-space:pre-wrap;overflow-wrap:break-word;text-align:left;'
               f'font-family:var(--jp-code-font-family, monospace);font-size:0.85em;background:none">{statement}</pre>')
        lines = r["statement"].count("\n") + 1
        if lines > LONG_STATEMENT_LINES:  # whole, folded: a trigger function's body would fill the screen
            pre = (f'<details><summary style="cursor:pointer">{lines} lines: '
                   f'<code>{html.escape(r["statement"].splitlines()[0][:80])}</code> …</summary>{pre}</details>')
        rows.append('<tr style="border-top:1px solid #ccc">' + _cell(str(i)) + _cell(html.escape(r["phase"])) + _cell(html.escape(r["table"] or ""))
                    + _cell(f'{html.escape(r["action"])}<div style="color:#666;font-size:0.9em;margin-top:0.3em">'
                            f'{html.escape(r["why safe"])}</div>')
                    + _cell(html.escape(r.get("lock mode") or r["lock"]), title=r["lock"])
                    + _cell(pre) + "</tr>")
    table = (f'<table style="table-layout:fixed;width:100%;border-collapse:collapse;font-size:0.9em">'
             f"<colgroup>{cols}</colgroup><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return f'<div style="max-width:100%;overflow-x:auto">{table}{_legend_html(frame)}</div>'


def legend(frame: pd.DataFrame) -> list[str]:
    """One line per lock mode the plan's short column shows: what it means for the application."""
    shorts = list(dict.fromkeys(frame.get("lock mode", frame["lock"])))
    modes = list(dict.fromkeys(s.removesuffix(" (brief)") for s in shorts))
    lines = [f"{m}: {MODE_MEANING.get(m, '')}" for m in modes]
    if any(s.endswith(" (brief)") for s in shorts):
        lines.append(BRIEF)
    return lines + ["hover over a lock for the tables it names; `runbook plan --format sql|json` has them all"]


def _legend_html(frame: pd.DataFrame) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in legend(frame))
    return f'<div style="text-align:left;font-size:0.85em;margin-top:0.5em"><b>lock</b><ul>{items}</ul></div>'


def plan_listing(frame: pd.DataFrame) -> str:
    """The plain-text form (a terminal, nbval): each step with its lock and its whole statement, indented."""
    if frame.empty:
        return "Nothing to do: the catalog shows every statement of this plan already applied."
    out = []
    for i, r in enumerate(frame.to_dict("records"), 1):
        where = f" · {r['table']}" if r["table"] else ""
        out.append(f"{i:>3}. {r['phase']}{where}: {r['action']}\n     lock: {r['lock']}\n     why: {r['why safe']}")
        text = r["statement"] + "".join(f"\n-- {p['param']}: {p['holds']}" for p in r.get("params") or [])
        out.append("\n".join("       " + line for line in text.splitlines()))
    return "\n".join(out)


class PlanFrame(pd.DataFrame):
    """A plan DataFrame that a notebook shows for reading (plan_html) and a terminal as a listing; selections
    and other operations give plain DataFrames."""

    @property
    def _constructor(self):
        return pd.DataFrame

    def _repr_html_(self) -> str:
        return plan_html(self)

    def __repr__(self) -> str:
        return plan_listing(self)
