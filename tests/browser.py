"""A real browser for the tests: Debian's Chromium driven by Playwright's Python package, and JupyterLab for it.

Playwright's own browser builds are never downloaded: the tests launch the system's Chromium (/usr/bin/chromium,
or $RUNBOOK_CHROMIUM), which `.ci/run` installs when it is missing. Without Chromium or without the playwright
package the browser tests skip, saying how to install them. What a page shows is read from its DOM (and, in
Lab, from the notebook model the page exposes), the way a person would see it: outputs, tables, images.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("RUNBOOK_CHROMIUM") or "/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections (updates, sync, field trials) are refused by a
# closed network and slow every page down; a root user needs --no-sandbox.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"   # git-ignored
ERROR_MIME = "application/vnd.jupyter.stderr"


def require_browser() -> None:
    """Skip, saying how to get them, when Chromium or Playwright's Python package is missing (fail under CI, whose
    .ci/run installs both: missing there means an install failed)."""
    missing = _missing()
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(missing)


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return (f"no Chromium at {CHROMIUM}: install it (Debian: apt-get install chromium; .ci/run does) or point "
                f"RUNBOOK_CHROMIUM at one; the browser tests drive it headless")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("the playwright package is missing: pip install playwright (it is in the dev extras: "
                "pip install -e '.[dev]'); Playwright's own browsers are not needed, Debian's Chromium is used")
    return None


@contextmanager
def chromium(user_data_dir: Path) -> Iterator:
    """A headless Chromium with a fresh profile; every request off this machine is refused before it leaves."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(user_data_dir), executable_path=str(CHROMIUM),
                                                        args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT)
        context.route("**/*", _local_only)
        try:
            yield context
        finally:
            context.close()


def _local_only(route) -> None:
    url = route.request.url
    if url.startswith(("file:", "data:", "blob:", "http://127.0.0.1:", "ws://127.0.0.1:")):
        route.continue_()
    else:  # an archive's CDN scripts (MathJax, require.js): a closed network must not stall the page
        route.abort()


@dataclass
class Lab:
    """A running JupyterLab: its address, its token (a throwaway, never printed) and the folder it serves."""
    url: str
    token: str
    root: Path
    log: Path

    def tree(self, notebook: str) -> str:
        """The notebook's address in a fresh workspace of its own, so no other notebook's tab is restored."""
        workspace = Path(notebook).stem.replace("_", "-")
        return f"{self.url}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={self.token}"

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self) -> None:
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def jupyter_lab(notebooks: Path, state: Path, env: dict[str, str], timeout_s: float = 90) -> Iterator[Lab]:
    """The project's own `jupyter lab` (as root it needs --allow-root) on a free port with a token, no browser
    of its own, its config, data and runtime folders under `state`, serving `notebooks`. Its kernels inherit
    `env` (e.g. RUNBOOK_HOME and RUNBOOK_ENV naming the test's database)."""
    config, data, runtime = (state / name for name in ("config", "data", "runtime"))
    for folder in (config, data, runtime):
        folder.mkdir(parents=True, exist_ok=True)
    # the page exposes its app (window.jupyterapp) so the test reads the notebook's model; no news or update checks
    (config / "jupyter_server_config.json").write_text(json.dumps({
        "LabApp": {"expose_app_in_browser": True, "news_url": None,
                   "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"},
        "ServerApp": {"terminals_enabled": False},
    }))
    notification = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)   # no "get notified about Jupyter news?" toast over the outputs
    (notification / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                                "checkForUpdates": False}))
    port, token = free_port(), secrets.token_hex(16)
    # a person watches Lab: its kernels are never headless nor part of a runner's run, whatever started the test
    inherited = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_HEADLESS", "RUNBOOK_RUN_ID")}
    full_env = {**inherited, **env, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(data),
                "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTER_TOKEN": token}
    log = state / "jupyter-lab.log"
    jupyter = Path(sys.executable).with_name("jupyter")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(jupyter), "lab", "--allow-root", "--no-browser", "--ip=127.0.0.1",
                                 f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={notebooks}"],
                                env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token, notebooks, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                lab.api("GET", "/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"jupyter lab did not answer in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield lab
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # the server and the kernels it started (its own process group)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- a notebook in Lab

_KERNEL_IDLE = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle';
}"""
_PENDING_CELLS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt'))
  .filter(p => p.textContent.includes('*')).length"""
_ALL_RAN = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  let unrun = 0, failed = false;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    if (cell.executionCount === null) unrun++;
    if (cell.outputs.toJSON().some(o => o.output_type === 'error')) failed = true;
  }
  return unrun === 0 || failed;
}"""
_MODEL_ERRORS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const found = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    for (const output of cell.outputs.toJSON())
      if (output.output_type === 'error') found.push(`cell ${i + 1}: ${output.ename}: ${output.evalue}`);
  }
  return found;
}"""


def wait_for(page, script: str, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(script):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        page.wait_for_timeout(200)


def open_notebook(page, lab: Lab, notebook: str, timeout_s: float = 60) -> None:
    """Open the notebook in Lab and wait until its kernel is up and idle."""
    page.goto(lab.tree(notebook))
    page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=timeout_s * 1000)
    wait_for(page, _KERNEL_IDLE, f"{notebook}: the kernel did not start", timeout_s)


def run_all_cells(page, timeout_s: float = 240) -> None:
    """Lab's menu Run > Run All Cells, as a person would; returns once no cell is queued or running, the kernel is
    idle, and every code cell ran or one raised (Lab drops the cells queued after it)."""
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
    deadline = time.monotonic() + timeout_s
    settled = 0
    while settled < 3:   # three looks in a row: between two cells the kernel is idle for a moment
        if time.monotonic() > deadline:
            raise AssertionError(f"Run All Cells: cells still running after {timeout_s:.0f} s")
        page.wait_for_timeout(250)
        done = page.evaluate(_PENDING_CELLS) == 0 and page.evaluate(_KERNEL_IDLE) and page.evaluate(_ALL_RAN)
        settled = settled + 1 if done else 0


def model_errors(page) -> list[str]:
    """Error outputs in the open notebook's model ("cell N: Ename: message"), whatever the DOM shows of them."""
    return page.evaluate(_MODEL_ERRORS)


# -- what any rendering of a notebook shows (Lab and nbconvert's HTML use the same classes)

def error_outputs(page) -> list[str]:
    """Tracebacks shown on the page (stderr-styled outputs containing one) and papermill's failure banner."""
    texts = page.evaluate(f"""() => Array.from(document.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="{ERROR_MIME}"]')).map(e => e.textContent)""")
    found = [_gist(text) for text in texts if "Traceback" in text]
    if page.get_by_text("An Exception was encountered at").count():
        found.append("papermill: An Exception was encountered (the notebook's failing cell is marked)")
    return found


def _gist(traceback: str) -> str:
    """A traceback in a line: its first (the exception's name) and its last (name: message)."""
    lines = [line.strip() for line in traceback.splitlines() if line.strip().strip("-")]
    return lines[0] if len(lines) < 2 else f"{lines[0]} … {lines[-1]}"[:400]


def stderr_outputs(page) -> list[str]:
    """Outputs shown as stderr (the pink boxes) that are not tracebacks: warnings, progress bars, empty strips."""
    texts = page.evaluate(f"""() => Array.from(document.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="{ERROR_MIME}"]')).map(e => e.textContent)""")
    return [text.strip()[:120] for text in texts if "Traceback" not in text]


def broken_images(page) -> list[str]:
    """Output images that did not load (no pixels), each named by the start of its src."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.jp-OutputArea-output img'))
      .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => (i.getAttribute('src') || '(no src)').slice(0, 60))""")


def code_cell(page, code: str):
    """The code cell whose source contains `code`."""
    return page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=code))


def shown(locator, what: str):
    """Scroll `locator` into view and check a person sees it there; returns it."""
    from playwright.sync_api import expect

    if locator.count() == 0:
        raise AssertionError(f"{what}: not on the page")
    locator.scroll_into_view_if_needed()
    expect(locator, f"{what}: not visible").to_be_visible()
    expect(locator, f"{what}: not in the viewport after scrolling to it").to_be_in_viewport()
    return locator


def plan_table(page):
    """The plan's table (01_inspect's `full_plan` cell), checked visible, with real statements in it."""
    table = shown(code_cell(page, "full_plan(").locator(".jp-OutputArea-output table").first, "the plan table")
    text = table.inner_text()
    if "ALTER TABLE" not in text:
        raise AssertionError(f"the plan table shows no ALTER TABLE statement: {text[:300]!r}")
    return table


def chart_image(page, code: str):
    """The chart that the cell calling `code` draws, checked visible and loaded (naturalWidth > 0)."""
    image = shown(code_cell(page, code).locator(".jp-OutputArea-output img").first, f"the chart of {code!r}")
    width = image.evaluate("i => i.complete ? i.naturalWidth : 0")
    if not width:
        raise AssertionError(f"the chart of {code!r} did not load: no pixels (naturalWidth 0)")
    return image


def screenshot_pages(page, folder: Path, stem: str, scroller: str | None = None, limit: int = 80) -> list[Path]:
    """The whole document, one viewport at a time (stem-00.png, -01, …), scrolling `scroller` (Lab's notebook
    panel) or the window (an HTML page). Lab lays a notebook out in a fixed-height panel, so a full-page shot
    would hold only the first screen."""
    folder.mkdir(parents=True, exist_ok=True)
    target = f"document.querySelector({json.dumps(scroller)})" if scroller else "document.scrollingElement"
    visible_bottom = "box.getBoundingClientRect().bottom" if scroller else "window.innerHeight"
    shots, top = [], 0
    while len(shots) < limit:
        page.evaluate(f"y => {{ {target}.scrollTop = y; }}", top)
        page.wait_for_timeout(150)
        path = folder / f"{stem}-{len(shots):02d}.png"
        page.screenshot(path=str(path))
        shots.append(path)
        height, client, last_cell_shown = page.evaluate(f"""() => {{
            const box = {target}, cells = box.querySelectorAll('.jp-Cell');
            const last = cells.length && cells[cells.length - 1].getBoundingClientRect().bottom;
            return [box.scrollHeight, box.clientHeight, !!last && last <= {visible_bottom}];
        }}""")
        if top + client >= height or last_cell_shown:   # Lab leaves a screen of blank space past the last cell
            break
        top += client - 60   # a little overlap, so no line is cut in two unseen
    return shots


LAB_SCROLLER = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer"
