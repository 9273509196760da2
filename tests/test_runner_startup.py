"""The runner's start-up: every import happens on its main thread before the HTML thread starts, so two threads
never import the same packages at once (which once ended `runbook run` at start-up with `cannot import name
'AsyncKernelManager' from partially initialized module 'jupyter_client.manager'`)."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

# In a fresh interpreter: start-up as the runner does it, then render every committed notebook on the HTML
# thread, as the runner renders the executed ones while the next phase runs; print what that imported.
RENDER_IMPORTS = """
import shutil, sys, tempfile
from pathlib import Path
from runbook_helpers.run import archive, runner
html = runner.start_html_renderer()
before = set(sys.modules)
with tempfile.TemporaryDirectory() as tmp:
    for notebook in sorted(Path("notebooks").glob("*.ipynb")):
        copy = Path(tmp) / notebook.name
        shutil.copy(notebook, copy)
        html.submit(archive.export_html, copy).result()
html.shutdown()
print(sorted(set(sys.modules) - before))
"""


def test_rendering_on_the_html_thread_imports_nothing_after_start_up():
    out = subprocess.run([sys.executable, "-c", RENDER_IMPORTS], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", f"imported on the HTML thread: {out.stdout}"


# One process imports what the runner's module itself needs (pandas, SQLAlchemy, the runbook), jsonschema, IPython
# and Pygments' lexers (seconds of their own, on no other thread in either version of the runner's start-up), never papermill,
# nbconvert, nbclient, nbformat or jupyter_client; then it forks the runner's start-up RUNS times, PARALLEL at a
# time, each child importing those packages afresh. A child that fails writes its traceback; the parent prints
# "<failures> <runs>".
STARTUP_BURST = """
import os, sys, time, traceback
import jsonschema, IPython
from pygments.lexers import get_lexer_by_name
from runbook_helpers.run import runner
for language in ("ipython3", "diff", "sql", "json", "yaml", "sh"):  # their regexes compiled once, here
    list(get_lexer_by_name(language).get_tokens("x"))
racing = ("papermill", "nbconvert", "nbclient", "nbformat", "jupyter_client")
assert not [m for m in sys.modules if m.split(".")[0] in racing], "already imported: the children would not race"
runs, parallel, errors = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
children, failures, started = {}, 0, 0
while started < runs or children:
    while started < runs and len(children) < parallel:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                time.sleep((started % 10) * 0.005)  # spread the children's phases against each other
                runner.start_html_renderer().shutdown()
            except BaseException:
                with open(os.path.join(errors, str(os.getpid())), "w") as f:
                    f.write(traceback.format_exc())
                code = 3
            os._exit(code)
        children[pid] = started
        started += 1
    pid, status = os.wait()
    children.pop(pid)
    failures += os.waitstatus_to_exitcode(status) != 0
print(failures, runs)
"""


@pytest.mark.matrix  # about 4 minutes on 2 cores: make test-matrix
@pytest.mark.timeout(900)
def test_the_runners_start_up_200_times_in_parallel_never_fails(tmp_path):
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", STARTUP_BURST, "200", "8", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    tracebacks = [p.read_text() for p in sorted(tmp_path.iterdir())]
    assert out.stdout.split() == ["0", "200"], (tracebacks[:1], out.stdout)
    print(f"200 start-ups, 8 at a time: {elapsed:.1f} s")
