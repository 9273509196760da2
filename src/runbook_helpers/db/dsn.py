"""The shape of a DSN, checked before libpq sees it: libpq's parse errors quote the DSN (`invalid
percent-encoded token: "…"`, `missing "=" after "…"`), and a password holding '@' or '/' silently becomes a
host name or port that later errors quote. `parse` returns the settings, or raises one line naming what is
wrong with the shape and where, never any of its content.
"""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import RunbookError

URL_FIX = ("URL-encode the password (python3 -c 'import urllib.parse,sys; print(urllib.parse.quote(sys.argv[1], "
           "safe=\"\"))' PASS), or leave it out of the URL and put it in ~/.pgpass")
KEYVALUE_FIX = (r"put the value in single quotes, writing \' for a quote and \\ for a backslash inside it "
                "(password='…'), or leave the password out and put it in ~/.pgpass")
URL_SCHEME = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)
BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _known_options() -> set[str]:
    return {o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults()}


def _url_problem(dsn: str) -> str | None:
    """What libpq's URI rules make of the DSN, part by part (libpq: credentials run to the first '@' before any
    '/'; the host part then runs to '/', '?')."""
    rest = URL_SCHEME.sub("", dsn, count=1)
    slash = rest.find("/")
    authority_end = len(rest) if slash < 0 else slash
    query_at = rest.find("?")
    if 0 <= query_at < authority_end:
        authority_end = query_at
    at = rest.find("@", 0, authority_end)
    if at >= 0:
        userinfo, hostpart = rest[:at], rest[at + 1:authority_end]
    else:
        userinfo, hostpart = "", rest[:authority_end]
    tail = rest[authority_end:]
    path, _, query = tail.partition("?")
    user, colon, password = userinfo.partition(":")
    if BAD_PERCENT.search(password):
        return "a '%' not followed by two hex digits in the password part"
    if BAD_PERCENT.search(user):
        return "a '%' not followed by two hex digits in the user name part"
    if "@" in hostpart:
        return "more than one '@' before the host: an '@' in the password or user name"
    if at < 0 and "@" in path:
        return "an '@' after the first '/': a '/' (or '?') in the password or user name ends the host part early"
    if BAD_PERCENT.search(hostpart):
        return "a '%' not followed by two hex digits in the host part (a '%' in the password or user name?)"
    if BAD_PERCENT.search(path):
        return "a '%' not followed by two hex digits in the database name part"
    if BAD_PERCENT.search(query):
        return "a '%' not followed by two hex digits in the query part (after '?')"
    for item in filter(None, query.split("&")):
        key, eq, _ = item.partition("=")
        if not eq:
            return "a query parameter (after '?') without '='"
        if key not in _known_options() and key not in ("ssl",):
            return "a query parameter (after '?') that is not a libpq connection option"
    return None


def _keyvalue_problem(dsn: str) -> str | None:
    """libpq's key=value rules: words separated by blanks, each key=value, a value either bare (backslash
    escapes the next character) or in single quotes."""
    known = _known_options()
    i, n, previous = 0, len(dsn), None

    def after() -> str:
        return f"after the value of {previous}" if previous else "at the start"

    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            return None
        start = i
        while i < n and dsn[i] != "=" and not dsn[i].isspace():
            i += 1
        key = dsn[start:i]
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n or dsn[i] != "=":
            return (f"a word without '=' {after()} (a blank or quote in an unquoted value, such as the "
                    f"password, splits it)")
        if key not in known:
            return f"a name {after()} that is not a libpq connection option (a blank in an unquoted value?)"
        i += 1
        while i < n and dsn[i].isspace():
            i += 1
        if i < n and dsn[i] == "'":
            i += 1
            while i < n and dsn[i] != "'":
                i += 2 if dsn[i] == "\\" else 1
            if i >= n:
                return f"the single-quoted value of {key} is not closed (an unescaped quote inside it?)"
            i += 1
        else:
            while i < n and not dsn[i].isspace():
                i += 2 if dsn[i] == "\\" else 1
        previous = key


def _settings_problem(settings: dict[str, str], url: bool) -> str | None:
    for port in (settings.get("port") or "").split(","):
        if port and not port.strip().isdigit():
            return ("the port is not a number" + (" (a ':', '/' or '@' in the password or user name moves part of it "
                                                  "into the host and port)" if url else ""))
    if "@" in (settings.get("host") or ""):
        return "an '@' in the host name (an '@' in the password or user name?)"
    return None


def parse(dsn: str, source: str) -> dict[str, str]:
    """The DSN's settings (conninfo_to_dict), or a RunbookError naming what is wrong with its shape; `source`
    says where it came from (e.g. '$RUNBOOK_STAGING_DSN'). No part of the DSN is ever in the message."""
    url = bool(URL_SCHEME.match(dsn.strip()))
    try:
        settings = conninfo_to_dict(dsn)
    except psycopg.Error:
        settings = None
    problem = _settings_problem(settings, url) if settings is not None else None
    if settings is None or problem:
        problem = problem or (_url_problem(dsn.strip()) if url else _keyvalue_problem(dsn)) or (
            "libpq cannot parse it (its own message is not shown: it would quote part of the string)")
        raise RunbookError(f"{source} is not a valid connection string: {problem}; "
                           f"{URL_FIX if url else KEYVALUE_FIX}. Nothing was changed.") from None
    return {k: str(v) for k, v in settings.items() if v is not None}
