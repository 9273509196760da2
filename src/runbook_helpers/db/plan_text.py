"""A plan's statements as text a person or a migration linter reads: the one place placeholders become
PostgreSQL's own `$1`, `$2`, … and the SQL and JSON forms of `runbook plan` are written.
"""

from __future__ import annotations

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
