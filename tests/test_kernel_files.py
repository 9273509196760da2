"""A notebook executed outside a run (`runbook notebooks`, a test) starts its kernel where jupyter's runtime folder
is: on a fresh machine that folder does not exist yet, and the kernel's connection file must not fail on it."""

import nbformat

from runbook_helpers.run.runner import execute_notebook


def test_a_kernel_starts_when_the_runtime_folder_does_not_exist_yet(tmp_path, monkeypatch):
    runtime = tmp_path / "not-yet" / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    source = tmp_path / "one.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("print(6 * 7)"))
    nbformat.write(nb, source)
    execute_notebook(source, source, None)
    outputs = nbformat.read(source, as_version=4).cells[0].outputs
    assert outputs[0]["text"].strip() == "42"
    assert runtime.is_dir() and not list(runtime.glob("kernel-*.json"))  # removed again when the kernel ended
