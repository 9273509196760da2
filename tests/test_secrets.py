"""Secrets (issue 16): every way a password reaches the runbook is collected, the archive's scan finds and
redacts it in every encoding a notebook, its HTML or a manifest can hold it, a malformed DSN is one line
without any of its content, a connection error keeps host and port, and a killed run's folder is scanned by
the next run."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from urllib.parse import quote, quote_plus

import markupsafe
import nbformat
import pytest

from conftest import runbook_cli, staging_dsn
from runbook_helpers import params as params_mod
from runbook_helpers.db import database, secrets
from runbook_helpers.db.server import PORT
from runbook_helpers.errors import RunbookError
from runbook_helpers.run import archive

# every character class an encoding changes: blank, quotes, <&>, '/', '%', '+', a non-ASCII letter
PASSWORD = "Pä ss'<&>\"/x%y+z-4711"


def _lower_hex(text: str) -> str:
    head, *rest = text.split("%")
    return head + "".join("%" + p[:2].lower() + p[2:] for p in rest)


def _b64_inside(shift: int) -> str:
    """The password inside a longer base64 string (an embedded image), at one of the three alignments."""
    raw = b"\x89PNG\r\n"[:shift] + PASSWORD.encode() + b"IEND\xaeB`\x82"
    return base64.b64encode(b"\x00\x01\x02" * 20 + raw).decode()


FORMS = {  # name the scan reports -> the password as a file holds it
    "plain": PASSWORD,
    "URL-encoded": quote(PASSWORD, safe=""),
    "URL-encoded/plus": quote_plus(PASSWORD, safe=""),
    "URL-encoded/lower": _lower_hex(quote(PASSWORD, safe="")),
    "base64": base64.b64encode(PASSWORD.encode()).decode(),
    "base64/shift0": _b64_inside(0),
    "base64/shift1": _b64_inside(1),
    "base64/shift2": _b64_inside(2),
    "JSON-escaped": json.dumps(PASSWORD)[1:-1],
    "JSON-escaped/unicode": json.dumps(PASSWORD, ensure_ascii=False)[1:-1],
    "HTML-escaped": html.escape(PASSWORD),
    "HTML-escaped/noquote": html.escape(PASSWORD, quote=False),
    "HTML-escaped/markupsafe": str(markupsafe.escape(PASSWORD)),
    "HTML numeric entities": "".join(f"&#{ord(c)};" for c in PASSWORD),
    "HTML hex entities": "".join(f"&#x{ord(c):x};" for c in PASSWORD),
    "JSON-escaped HTML": json.dumps(html.escape(PASSWORD))[1:-1],
}


def base64_hit(text: str) -> bool:
    return any(needle.data.decode() in text for needle in secrets.needles(PASSWORD) if needle.encoding == "base64")


@pytest.mark.parametrize("name", list(FORMS))
def test_each_encoding_in_an_html_file_is_found_named_and_redacted(tmp_path, name):
    form = str(FORMS[name])
    (tmp_path / "01_inspect.html").write_text(f"<html><pre>connected: {form}</pre></html>", encoding="utf-8")
    findings = archive.scan_for_secrets(tmp_path, [PASSWORD])
    assert findings == [f"01_inspect.html: contained a secret of this run ({name.split('/')[0]}) (redacted)"]
    left = (tmp_path / "01_inspect.html").read_text(encoding="utf-8")
    assert form not in left and "[REDACTED]" in left and not base64_hit(left)
    assert "connected: " in left  # only the secret went
    assert not any(part in findings[0] for part in ("4711", "ss'", "Pä"))  # the report never holds the secret


@pytest.mark.parametrize("name", list(FORMS))
def test_each_encoding_in_a_notebook_output_is_found_and_redacted(tmp_path, name):
    """As nbformat stores it: the output's text JSON-escaped once more inside the .ipynb, in a stream, a
    text/html and an application/json output."""
    form = str(FORMS[name])
    book = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(x)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"dsn is {form}\n"),
                    nbformat.v4.new_output("display_data", data={"text/html": f"<b>{form}</b>",
                                                                 "application/json": {"dsn": form}})]
    book.cells.append(cell)
    nbformat.write(book, tmp_path / "01_inspect.ipynb")
    findings = archive.scan_for_secrets(tmp_path, [PASSWORD])
    assert len(findings) == 1 and findings[0].startswith("01_inspect.ipynb: contained a secret of this run (")
    back = nbformat.read(tmp_path / "01_inspect.ipynb", as_version=4)  # still a valid notebook
    outputs = back.cells[0].outputs
    shown = outputs[0].text + outputs[1].data["text/html"] + json.dumps(outputs[1].data["application/json"])
    assert form not in shown and not base64_hit(shown) and "[REDACTED]" in outputs[0].text


def test_a_real_notebook_and_its_nbconvert_html_hold_no_form_of_the_password(tmp_path):
    """The archive's own pipeline: a notebook printing the password and showing it in an HTML table, exported
    by nbconvert, then scanned: no encoding of it is left in either file."""
    book = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("show()")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"password {PASSWORD}\n"),
                    nbformat.v4.new_output("display_data", data={"text/html": f"<td>{html.escape(PASSWORD)}</td>",
                                                                 "text/plain": repr(PASSWORD)})]
    book.cells.append(cell)
    nbformat.write(book, tmp_path / "01_inspect.ipynb")
    archive.export_html(tmp_path / "01_inspect.ipynb")
    findings = archive.scan_for_secrets(tmp_path, [PASSWORD])
    assert [f.split(":")[0] for f in findings] == ["01_inspect.html", "01_inspect.ipynb"]
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert not [n.encoding for n in secrets.needles(PASSWORD) if n.data in data], path.name
        assert b"4711" not in data


def test_a_short_secret_is_redacted_only_where_it_stands_alone(tmp_path):
    """A 3-character password is still scanned, but only whole tokens are redacted (documented in
    db/secrets.py): 'pw1' in 'password=pw1' goes; 'pw12' and 'xpw1' stay."""
    (tmp_path / "a.txt").write_text("password=pw1 and pw12 and xpw1 and 'pw1'", encoding="utf-8")
    findings = archive.scan_for_secrets(tmp_path, ["pw1"])
    assert findings == ["a.txt: contained a secret of this run (plain) (redacted)"]
    assert (tmp_path / "a.txt").read_text() == "password=[REDACTED] and pw12 and xpw1 and '[REDACTED]'"
    (tmp_path / "b.txt").write_text("cHcx is pw1 in base64", encoding="utf-8")
    assert archive.scan_for_secrets(tmp_path, ["pw1"]) == ["b.txt: contained a secret of this run (base64, plain) "
                                                           "(redacted)"]


# --- where secrets come from -----------------------------------------------------------------------------
@pytest.fixture
def no_libpq_env(monkeypatch, tmp_path):
    for var in ("PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGSYSCONFDIR", "PGHOST", "PGPORT",
                "PGUSER", "PGDATABASE", "PGSSLPASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass or ~/.pg_service.conf of the machine's user


def test_the_dsn_password_and_pgpassword_are_collected(no_libpq_env, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "from-the-environment")
    found = secrets.connection_secrets("postgresql://app:p%40ss%2Fw@db.internal:5433/app?sslpassword=key-pass")
    assert {"p@ss/w", "from-the-environment", "key-pass"} <= set(found)
    assert "postgresql://app:p%40ss%2Fw@db.internal:5433/app?sslpassword=key-pass" in found
    found = secrets.connection_secrets("host=db.internal password='it\\'s' user=app")
    assert "it's" in found


def test_a_matching_pgpass_entry_is_collected_and_others_are_not(no_libpq_env, monkeypatch, tmp_path):
    passfile = tmp_path / "pgpass"
    passfile.write_text("# comment\n"
                        "db.internal:5433:app:app:right\\:one\n"       # matches (escaped ':')
                        "*:*:other_db:app:wrong-database\n"
                        "db.internal:5432:app:app:wrong-port\n"
                        "*:5433:*:app:wildcard-match\n"
                        "elsewhere:5433:app:app:wrong-host\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    found = secrets.connection_secrets("postgresql://app@db.internal:5433/app")
    assert "right:one" in found and "wildcard-match" in found
    assert not {"wrong-database", "wrong-port", "wrong-host"} & set(found)
    monkeypatch.delenv("PGPASSFILE")
    (tmp_path / ".pgpass").write_text("localhost:5432:app:app:home-pgpass\n")  # ~/.pgpass; no host: localhost
    assert "home-pgpass" in secrets.connection_secrets("dbname=app user=app")


def test_a_service_file_password_and_its_pgpass_entry_are_collected(no_libpq_env, monkeypatch, tmp_path):
    service_file = tmp_path / "services.conf"
    service_file.write_text("[other]\npassword=not-this-one\n\n[staging]\nhost=db.internal\nport=6000\n"
                            "dbname=app\nuser=app\npassword=service-secret\n")
    (tmp_path / "pgpass").write_text("db.internal:6000:app:app:pgpass-for-service\n")
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "pgpass"))
    found = secrets.connection_secrets("service=staging")
    assert "service-secret" in found and "pgpass-for-service" in found and "not-this-one" not in found
    monkeypatch.setenv("PGSERVICE", "staging")
    assert "service-secret" in secrets.connection_secrets("postgresql:///app")
    monkeypatch.delenv("PGSERVICEFILE")
    (tmp_path / ".pg_service.conf").write_text("[staging]\npassword=home-service-secret\n")
    assert "home-service-secret" in secrets.connection_secrets("postgresql:///app")


def test_the_env_known_secrets_include_every_source(no_libpq_env, monkeypatch, tmp_path):
    monkeypatch.setenv("RUNBOOK_STAGING_DSN", "postgresql://app:dsn-pass@db.internal:5433/app")
    monkeypatch.setenv("PGPASSWORD", "env-pass")
    (tmp_path / ".pgpass").write_text("db.internal:5433:app:app:file-pass\n")
    found = database.known_secrets(params_mod.load("staging"))
    assert {"dsn-pass", "env-pass", "file-pass"} <= set(found)


# --- malformed DSNs and connection errors ---------------------------------------------------------------
URL_PASSWORD = "d6466@:%#fbed315"
KV_PASSWORD = "d6466 fbed315'\"x"
MALFORMED = {
    "url, '%' and '@' in the password": (f"postgresql://app:{URL_PASSWORD}@db.internal:5433/app",
                                         "more than one '@' before the host"),
    "url, bad '%' only": ("postgresql://app:abc%zz4711@db.internal/app",
                          "a '%' not followed by two hex digits in the password part"),
    "url, '/' in the password": ("postgresql://app:ab/cd4711@db.internal/app", "the port is not a number"),
    "key=value, blank and quotes": (f"host=db.internal password={KV_PASSWORD} dbname=app",
                                    "a word without '=' after the value of password"),
    "key=value, unclosed quote": ("host=db.internal password='abc4711 dbname=app",
                                  "the single-quoted value of password is not closed"),
}
FRAGMENTS = ["d6466", "fbed315", "@:%#", "%#fbed", "abc", "4711", "zz4711", "cd4711", "'\"x"]


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_dsn_is_one_line_naming_its_shape_and_no_part_of_it(case, monkeypatch):
    dsn, shape = MALFORMED[case]
    monkeypatch.setenv("RUNBOOK_STAGING_DSN", dsn)
    with pytest.raises(RunbookError) as err:
        database.conninfo(params_mod.load("staging"))
    message = str(err.value)
    assert message.startswith(f"$RUNBOOK_STAGING_DSN is not a valid connection string: {shape}")
    assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__
    assert not [f for f in FRAGMENTS if f in message.replace("python3 -c", "")], message


@pytest.mark.parametrize("case", ["url, '%' and '@' in the password", "key=value, blank and quotes"])
def test_the_cli_prints_one_line_for_a_malformed_dsn(case):
    dsn, shape = MALFORMED[case]
    result = runbook_cli("run", "--env", "staging", env={"RUNBOOK_STAGING_DSN": dsn})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert shape in result.stderr
    out = (result.stdout + result.stderr).replace("python3 -c", "")
    assert not [f for f in FRAGMENTS if f in out], out


def test_a_closed_port_keeps_host_port_and_every_line_of_libpq(monkeypatch):
    monkeypatch.setenv("RUNBOOK_STAGING_DSN", "postgresql://app:s3cr3t-pw@127.0.0.1:1/app")
    with pytest.raises(RunbookError) as err:
        database.connect_raw(params_mod.load("staging"))
    message = str(err.value)
    assert message.startswith("cannot connect to the staging database named by $RUNBOOK_STAGING_DSN "
                              "(host 127.0.0.1, port 1): ")
    assert "Connection refused" in message and "Is the server running on that host and accepting TCP/IP" in message
    assert "s3cr3t" not in message and "\n" not in message


def test_the_servers_message_is_kept(db, monkeypatch):
    """A real server's refusal (a database that does not exist) reaches the operator whole, with host and port."""
    url = staging_dsn(db, password="pw-never-shown").replace(f"/{db.name}", "/no_such_database")
    monkeypatch.setenv("RUNBOOK_STAGING_DSN", url)
    with pytest.raises(RunbookError) as err:
        database.connect_raw(params_mod.load("staging"))
    message = str(err.value)
    assert f"(host {db.server.socket_dir()}, port {PORT}): " in message, message
    assert 'database "no_such_database" does not exist' in message and "pw-never-shown" not in message


def test_an_unexpected_error_in_the_cli_prints_a_traceback_without_the_dsn(monkeypatch, capsys):
    from runbook_helpers import cli
    dsn = f"host=db.internal password={KV_PASSWORD}"
    monkeypatch.setenv("RUNBOOK_STAGING_DSN", dsn)

    def boom(*_a, **_k):
        raise ValueError(f"a bug quoting {dsn!r} and 'fbed315'")
    monkeypatch.setattr(cli, "_audit", boom)
    assert cli.main(["audit", "list", "--env", "staging"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError" in err
    assert not [f for f in ("d6466", "fbed315") if f in err], err


# --- a killed run's folder --------------------------------------------------------------------------------
def test_a_killed_runs_folder_is_scanned_by_the_next_run(db, home):
    password = "Killed Run&pw-0815"
    killed = home / "runs" / "staging" / "20260101T000000Z-deadbeef"
    killed.mkdir(parents=True)
    book = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(dsn)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{quote(password)} {password}\n")]
    book.cells.append(cell)
    nbformat.write(book, killed / "01_inspect.ipynb")
    closed = home / "runs" / "staging" / "20260101T000001Z-cafecafe"  # a closed run is left alone
    closed.mkdir()
    (closed / "note.txt").write_text(password)
    archive.write_manifest(closed, {"run_id": "cafecafe", "status": "failed"})
    result = runbook_cli("run", "--env", "staging", "--phases", "inspect", "--dry-run",
                         env={"RUNBOOK_STAGING_DSN": staging_dsn(db, password=quote(password, safe="")),
                              "RUNBOOK_HOME": str(home)})
    assert ("SECRET FOUND in the unclosed run 20260101T000000Z-deadbeef: 01_inspect.ipynb: contained a secret of "
            "this run (URL-encoded, plain) (redacted)") in result.stdout, result.stdout + result.stderr
    assert password not in (killed / "01_inspect.ipynb").read_text()
    assert quote(password) not in (killed / "01_inspect.ipynb").read_text()
    assert (closed / "note.txt").read_text() == password and archive.verify(closed) == []
    new = next(p for p in (home / "runs" / "staging").iterdir() if p.name not in (killed.name, closed.name))
    manifest = json.loads((new / "manifest.json").read_text())
    assert list(manifest["unclosed_runs_secret_scan"]) == [killed.name]


def test_unfinished_runs_are_those_without_a_manifest_or_still_running(tmp_path):
    base = tmp_path / "runs" / "ci"
    for name, status in (("a", None), ("b", "running"), ("c", "succeeded"), ("d", "failed")):
        folder = base / name
        folder.mkdir(parents=True)
        (folder / "x.txt").write_text("secret-value-1")
        if status:
            archive.write_manifest(folder, {"status": status})
    assert [p.name for p in archive.unfinished_runs(str(tmp_path / "runs"), "ci")] == ["a", "b"]
    found = archive.scan_unfinished_runs(str(tmp_path / "runs"), "ci", ["secret-value-1"])
    assert {p.name: f for p, f in found.items()} == {
        "a": ["x.txt: contained a secret of this run (plain) (redacted)"],
        "b": ["x.txt: contained a secret of this run (plain) (redacted)"]}
    assert archive.scan_unfinished_runs(str(tmp_path / "runs"), "ci", ["secret-value-1"]) == {}  # idempotent
    assert (base / "c" / "x.txt").read_text() == "secret-value-1"
    assert os.path.exists(base / "d" / "manifest.json")
    assert Path(base / "a" / "x.txt").read_text() == "[REDACTED]"


def test_a_failed_phases_error_reaches_neither_terminal_nor_manifest_with_the_password(db, home):
    """A notebook cell that raises with the DSN in its message: the runner's error line and the manifest's
    phase record hold it redacted (the executed notebook is redacted by the scan, which fails the run)."""
    password = "Phase-Error-pw-2718"
    notebook = home / "notebooks" / "01_inspect.ipynb"
    book = json.loads(notebook.read_text())
    book["cells"].insert(3, {"cell_type": "code", "execution_count": None, "id": "leaky", "metadata": {},
                             "outputs": [], "source": ["import os\n",
                                                       "raise RuntimeError(os.environ['RUNBOOK_STAGING_DSN'])"]})
    notebook.write_text(json.dumps(book))
    result = runbook_cli("run", "--env", "staging", "--phases", "inspect", "--dry-run",
                         env={"RUNBOOK_STAGING_DSN": staging_dsn(db, password=password), "RUNBOOK_HOME": str(home)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RuntimeError: [REDACTED]" in result.stdout
    assert password not in result.stdout + result.stderr
    folder = next((home / "runs" / "staging").iterdir())
    manifest = (folder / "manifest.json").read_text()
    assert password not in manifest and "RuntimeError: [REDACTED]" in manifest
