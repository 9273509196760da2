"""The secrets of a connection, and every form in which an archived file can hold one.

A password reaches the runbook by one of libpq's ways: in the DSN (URL or key=value), from PGPASSWORD, from
a .pgpass entry matching the connection (passfile=, PGPASSFILE or ~/.pgpass), or from a pg_service.conf
section (service= or PGSERVICE; PGSERVICEFILE, ~/.pg_service.conf or PGSYSCONFDIR/pg_service.conf).
`connection_secrets` collects them all; `needles` gives each in every encoding a notebook, its HTML or a
manifest can hold it (plain, URL-encoded, base64 at every alignment, JSON- and HTML-escaped, as a Python repr,
and the layers a notebook stacks: JSON-escaped HTML as .ipynb stores an HTML output, JSON inside JSON), for the
archive's scan (run/archive.py).

False positives: a secret of fewer than SHORT characters (and every form of it) is matched only as a whole
token, where neither neighbour is a letter or digit ("pw1" in "password=pw1" is found, in "pw12" or in a base64
image it is not); longer secrets are matched anywhere. Base64 inside a longer base64 string is looked for only
where at least MIN_B64 characters depend on the secret alone (secrets of 5 bytes or more); shorter secrets are
found base64-encoded as a whole token only. Only exact occurrences are redacted.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

from psycopg.conninfo import conninfo_to_dict

SHORT = 4      # secrets shorter than this are matched as whole tokens only
MIN_B64 = 6    # stable characters a base64 needle inside a longer base64 string needs
SECRET_OPTIONS = ("password", "sslpassword", "oauth_client_secret")  # conninfo options that hold a secret


# --- where passwords come from -------------------------------------------------------------------------
def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def service_file_sections(path: Path) -> dict[str, dict[str, str]]:
    """pg_service.conf as {service: {key: value}} (libpq's format: [name] headers, key=value lines)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return sections
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(), {})
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


def service_files(environ) -> list[Path]:
    """The service files libpq reads, the user's first."""
    files = [Path(environ["PGSERVICEFILE"])] if environ.get("PGSERVICEFILE") else [_home() / ".pg_service.conf"]
    if environ.get("PGSYSCONFDIR"):
        files.append(Path(environ["PGSYSCONFDIR"]) / "pg_service.conf")
    return files


def service_settings(name: str | None, environ) -> dict[str, str]:
    """The settings of one service (the user's file wins, as in libpq); {} when none is named or found."""
    if not name:
        return {}
    for path in service_files(environ):
        section = service_file_sections(path).get(name)
        if section is not None:
            return section
    return {}


def _pgpass_fields(line: str) -> list[str]:
    """One .pgpass line split on unescaped ':' (\\: and \\\\ are escapes)."""
    fields, current, escaped = [], [], False
    for ch in line:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def pgpass_passwords(path: Path, hosts: list[str], ports: list[str], dbname: str, user: str) -> list[str]:
    """Passwords of the .pgpass entries matching the connection (hostname:port:database:username:password,
    '*' matches anything; a socket directory or no host matches 'localhost', as in libpq)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    wanted_hosts = {("localhost" if not h or h.startswith("/") else h) for h in hosts} or {"localhost"}
    found = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = _pgpass_fields(line)
        if len(fields) < 5:
            continue
        host, port, db, usr, password = fields[0], fields[1], fields[2], fields[3], ":".join(fields[4:])
        if ((host == "*" or host in wanted_hosts) and (port == "*" or port in ports)
                and (db == "*" or db == dbname) and (usr == "*" or usr == user) and password):
            found.append(password)
    return found


def connection_secrets(conninfo: str | None, environ=None) -> list[str]:
    """Every secret libpq could use for this connection: the DSN itself, its password (and sslpassword,
    oauth_client_secret), PGPASSWORD, the matching .pgpass entries and the service's password. The DSN must
    parse (db/dsn.py checks its shape first); an unparsable one is returned as it is, as a whole."""
    environ = os.environ if environ is None else environ
    found: list[str] = []
    settings: dict[str, str] = {}
    if conninfo:
        found.append(conninfo)
        try:
            settings = {k: str(v) for k, v in conninfo_to_dict(conninfo).items() if v is not None}
        except Exception:  # noqa: BLE001 - never let the collector leak a parse error
            settings = {}
    service = service_settings(settings.get("service") or environ.get("PGSERVICE"), environ)
    merged = {**service, **settings}  # the DSN's own settings win over the service's
    for option in SECRET_OPTIONS:
        for source in (settings, service):
            if source.get(option):
                found.append(source[option])
    for var in ("PGPASSWORD", "PGSSLPASSWORD"):
        if environ.get(var):
            found.append(environ[var])
    hosts = (merged.get("host") or environ.get("PGHOST") or "").split(",")
    ports = (merged.get("port") or environ.get("PGPORT") or "5432").split(",")
    ports = [p or "5432" for p in ports]
    user = merged.get("user") or environ.get("PGUSER") or _os_user()
    dbname = merged.get("dbname") or environ.get("PGDATABASE") or user
    passfile = merged.get("passfile") or environ.get("PGPASSFILE") or str(_home() / ".pgpass")
    found += pgpass_passwords(Path(passfile), hosts, ports, dbname, user)
    return [s for s in dict.fromkeys(found) if s]


def _os_user() -> str:
    import getpass
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


# --- the forms an archive can hold ---------------------------------------------------------------------
@dataclass(frozen=True)
class Needle:
    encoding: str   # what the scan reports: "plain", "URL-encoded", "base64", "JSON-escaped", …
    data: bytes
    whole_token: bool  # match only where neither neighbour is a letter or digit


def _html_forms(text: str) -> dict[str, str]:
    markup = (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
              .replace('"', "&#34;").replace("'", "&#39;"))  # markupsafe's (jinja's, so nbconvert's) escaping
    return {
        "HTML-escaped": html.escape(text, quote=True),
        "HTML-escaped (no quotes)": html.escape(text, quote=False),
        "HTML-escaped (markupsafe)": markup,
        "HTML numeric entities": "".join(f"&#{ord(c)};" for c in text),
        "HTML hex entities": "".join(f"&#x{ord(c):x};" for c in text),
    }


def _json_forms(text: str) -> list[str]:
    return [json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]]


def _url_forms(text: str) -> list[str]:
    forms = [quote(text, safe=""), quote_plus(text, safe=""), quote(text), quote_plus(text)]
    lowered = []
    for form in forms:  # %2F and %2f are the same byte to a decoder
        parts = form.split("%")
        lowered.append(parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:]))
    return forms + lowered


def base64_forms(raw: bytes) -> list[tuple[bytes, bool]]:
    """(needle, whole token?): the secret's own base64 (with and without padding), and, for each of the three
    alignments inside a longer base64 string, the characters that depend on the secret's bytes alone."""
    forms = [(base64.b64encode(raw), True), (base64.b64encode(raw).rstrip(b"="), True)]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        start = -(-8 * shift // 6)              # the first character made of the secret's bits only
        end = (8 * (shift + len(raw))) // 6      # after it, characters depend on what follows
        stable = encoded[start:end]
        if len(stable) >= MIN_B64:
            forms.append((stable, False))
    return forms


def needles(secret: str) -> list[Needle]:
    """The secret in every encoding an archived file can hold it, longest first, each byte string once
    (named by its simplest encoding)."""
    short = len(secret) < SHORT
    forms: dict[str, list[str]] = {"plain": [secret], "URL-encoded": _url_forms(secret)}
    # the text itself and as Python shows it in a text/plain output (repr of a str, a DataFrame cell)
    texts = {"": secret, "Python repr": repr(secret)[1:-1], "Python ascii": ascii(secret)[1:-1]}
    for label, text in texts.items():
        def named(name: str) -> str:
            return f"{label}, {name}" if label else name
        if label:
            forms.setdefault(label, []).append(text)
        forms.setdefault(named("JSON-escaped"), []).extend(_json_forms(text))
        html_forms = _html_forms(text)
        for name, form in html_forms.items():
            forms.setdefault(named(name), []).append(form)
        forms.setdefault(named("JSON-escaped HTML"), []).extend(j for f in html_forms.values() for j in _json_forms(f))
        # a JSON string shown by a notebook, stored in the .ipynb: JSON inside JSON (of the text or of its HTML)
        forms.setdefault(named("JSON-escaped twice"), []).extend(
            j2 for t in [text, *html_forms.values()] for j in _json_forms(t) for j2 in _json_forms(j))
    seen: dict[bytes, Needle] = {}
    for name, variants in forms.items():
        for text in variants:
            data = text.encode("utf-8")
            if data and data not in seen:
                seen[data] = Needle(name.split(" (")[0], data, short)
    for data, whole in base64_forms(secret.encode("utf-8")):
        if data and data not in seen:
            seen[data] = Needle("base64", data, whole or short)
    return sorted(seen.values(), key=lambda n: len(n.data), reverse=True)


def all_needles(secrets: list[str]) -> list[Needle]:
    """Every form of every secret, each byte string once, longest first (a DSN is redacted before the
    password inside it)."""
    unique: dict[bytes, Needle] = {}
    for secret in secrets:
        if secret:
            for needle in needles(secret):
                unique.setdefault(needle.data, needle)
    return sorted(unique.values(), key=lambda n: len(n.data), reverse=True)


def redact(data: bytes, secrets: list[str], replacement: bytes = b"[REDACTED]",
           found: list[Needle] | None = None) -> tuple[bytes, list[str]]:
    """`data` with every form of every secret replaced, and the encodings that were found (in order of first
    appearance). `found` may pass all_needles(secrets), computed once for many files."""
    import re

    candidates = found if found is not None else all_needles(secrets)
    present = [n for n in candidates if n.data in data]  # a fast substring test first; the regex for hits only
    if not present:
        return data, []
    encoding = {n.data: n.encoding for n in present}
    pattern = re.compile(b"|".join(rb"(?<![A-Za-z0-9])" + re.escape(n.data) + rb"(?![A-Za-z0-9])" if n.whole_token
                                   else re.escape(n.data) for n in present))
    names: list[str] = []
    for match in pattern.finditer(data):
        if encoding[match.group(0)] not in names:
            names.append(encoding[match.group(0)])
    return (pattern.sub(replacement, data) if names else data), names


# --- text that may quote a malformed DSN ---------------------------------------------------------------
def fragments(dsn: str) -> list[str]:
    """The pieces of a DSN an error message could quote when libpq could not parse it (split on the
    characters its syntax uses), except option names and the scheme: a traceback scrubbed of these holds no
    part of the password even when the password's boundaries are unknown."""
    import re

    from psycopg import pq
    names = {o.keyword.decode() for o in pq.Conninfo.get_defaults()} | {"postgresql", "postgres"}
    pieces = re.split(r"[\s'\"@:/?&=%#,\\]+", dsn)
    return sorted({p for p in pieces if len(p) >= 3 and p not in names}, key=len, reverse=True)
