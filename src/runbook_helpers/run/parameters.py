"""The notebooks' parameters, checked before a session opens: a typo must never run a phase for real.

papermill only warns "Passed unknown parameter" and injects the name anyway (`-p dryrun True` assigns
`dryrun`, and `dry_run` keeps its default, False). The injected cell is an ordinary cell the kernel ran, headed
by papermill's comment `# Parameters`: its source is in IPython's input history, so the names it assigned are
read back from there (with `ast`, nothing is executed) and compared with the ones the phase's notebook declares.
This works whoever started the kernel (`runbook run`, `papermill` by hand, a papermill output opened in
JupyterLab) and needs nothing from the runner. The values are checked for type as well (`-p dry_run false`
is the string "false", which Python would take for true).
"""

from __future__ import annotations

import ast
import difflib
import json
from typing import Any

from ..errors import RunbookError

INJECTED_HEADER = "# Parameters"  # papermill's translate_parameters(comment="Parameters") for Python
COMMON = ("env", "dry_run", "run_id", "overrides")
BY_PHASE = {"finalize": ("since", "force"), "rollback": ("force",)}


def declared(phase: str) -> tuple[str, ...]:
    """The names the phase's parameters cell declares (tests/test_parameters.py holds the notebooks to it)."""
    return COMMON + BY_PHASE.get(phase, ())


def injected_names(history: list[str]) -> list[str]:
    """The names papermill's last injected cell assigned, in order ([] when none ran: JupyterLab by hand)."""
    for source in reversed(history):
        if source.lstrip().startswith(INJECTED_HEADER):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return []
            return [t.id for node in tree.body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)]
    return []


def _kernel_history() -> list[str]:
    try:
        from IPython import get_ipython
    except ImportError:
        return []
    shell = get_ipython()
    if shell is None:
        return []
    return list(shell.user_ns.get("In") or shell.history_manager.input_hist_raw or [])


def check_names(phase: str, history: list[str] | None = None) -> None:
    """Raise, before anything connects, when papermill injected a name the notebook does not declare."""
    names = injected_names(_kernel_history() if history is None else history)
    known = declared(phase)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RunbookError(
            f"unknown notebook parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: this notebook takes "
            f"{', '.join(known)}. Nothing was run and nothing was changed; fix the -p/-y of the papermill call.")


def overrides_dict(overrides: Any) -> dict[str, Any]:
    """`overrides` as a dict: papermill's `-p overrides '{"backfill": {...}}'` passes a JSON string."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as exc:
            raise RunbookError(f"the overrides parameter is not valid JSON ({exc.msg} at character {exc.pos}); "
                               f"pass a JSON object, e.g. '{{\"backfill\": {{\"batch_size\": 5000}}}}'. "
                               f"Nothing was changed.") from None
    if not isinstance(overrides, dict):
        raise RunbookError(f"the overrides parameter must be a mapping (a dict, or a JSON object), got "
                           f"{type(overrides).__name__}. Nothing was changed.")
    return overrides


def check_types(dry_run: Any, run_id: Any, env: Any) -> None:
    if not isinstance(dry_run, bool):
        raise RunbookError(f"dry_run must be True or False, got {dry_run!r} ({type(dry_run).__name__}): papermill "
                           f"passes `-p dry_run True` as a boolean, `-p dry_run true` as a string. Nothing was run "
                           f"and nothing was changed.")
    if run_id is not None and not isinstance(run_id, str):
        raise RunbookError(f"run_id must be a string or None, got {run_id!r}. Nothing was changed.")
    if env is not None and not isinstance(env, str):
        raise RunbookError(f"env must be the name of a params file, got {env!r}. Nothing was changed.")
