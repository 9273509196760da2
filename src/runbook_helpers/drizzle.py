"""The application's Drizzle migrations: which ones the database has, and the hand-over after validate.

Drizzle's migrator (drizzle-orm, PostgreSQL) reads `meta/_journal.json` and the `<tag>.sql` files, hashes
each file with sha256, looks up the newest `created_at` in `drizzle.__drizzle_migrations`, and applies
every journal entry whose `when` is newer, recording (hash, created_at = when). The runbook produces the
end state of some migrations itself (0001 in the demo: tenant_id everywhere) without running their SQL,
which would fail on tables with rows. Recording them with `created_at` equal to the journal's `when`
exactly is what makes the application's next `drizzle-kit migrate` skip them and still run every later one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection

from . import paths
from .db.catalog import relation_oid
from .db.sqltext import render
from .errors import RunbookError

COLUMNS = ["tag", "when", "hash", "state", "next migrate", "note"]
APPLIED, PENDING, DRIFTED = "applied", "pending", "DRIFTED"


@dataclass(frozen=True)
class Migration:
    tag: str
    when: int
    path: Path

    @property
    def sql_text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def hash(self) -> str:
        """Drizzle's own hash: sha256 of the migration file's text."""
        return hashlib.sha256(self.sql_text.encode("utf-8")).hexdigest()

    def statements(self) -> list[str]:
        return [s.strip() for s in self.sql_text.split("--> statement-breakpoint") if s.strip()]


def folder_of(p) -> Path | None:
    if not p.drizzle.folder:
        return None
    folder = Path(p.drizzle.folder)
    return folder if folder.is_absolute() else paths.project_root() / folder


def journal(folder: Path) -> list[Migration]:
    """The journal's entries in order, each with its .sql file; a missing file or journal is one message."""
    path = folder / "meta" / "_journal.json"
    if not path.is_file():
        raise RunbookError(f"no Drizzle journal at {path}: set drizzle.folder in params to the application's "
                           f"migrations folder (the one holding meta/_journal.json), or null to skip Drizzle")
    entries = json.loads(path.read_text(encoding="utf-8")).get("entries", [])
    out = [Migration(e["tag"], int(e["when"]), folder / f"{e['tag']}.sql") for e in entries]
    missing = [m.path.name for m in out if not m.path.is_file()]
    if missing:
        raise RunbookError(f"the Drizzle journal in {folder} names files that are not there: {', '.join(missing)}")
    return out


def _table(conn: Connection, p) -> str:
    return render(conn, sql.Identifier(p.drizzle.schema_, p.drizzle.table))


def recorded(conn: Connection, p) -> pd.DataFrame | None:
    """The migrations table's rows (id, hash, created_at), or None when the table does not exist."""
    if relation_oid(conn, p.drizzle.schema_, p.drizzle.table) is None:
        return None
    return pd.DataFrame(conn.execute(text(f"SELECT id, hash, created_at FROM {_table(conn, p)} ORDER BY id")).all(),
                        columns=["id", "hash", "created_at"])


def would_apply(migrations: list[Migration], rows: pd.DataFrame | None) -> list[str]:
    """Drizzle's rule: every journal entry newer than the newest recorded created_at (all when none)."""
    newest = None if rows is None or rows.empty or rows["created_at"].isna().all() else int(rows["created_at"].max())
    return [m.tag for m in migrations if newest is None or newest < m.when]


def status(rb) -> pd.DataFrame:
    """One row per journal entry: applied (its hash is recorded), pending, or DRIFTED (a row recorded at its
    `when` carries another hash: the file changed after it was applied), and whether the application's next
    `drizzle-kit migrate` would run it. Recorded rows that match no file are listed too."""
    folder = folder_of(rb.params)
    if folder is None:
        return pd.DataFrame(columns=COLUMNS)
    migrations = journal(folder)
    with rb.engine.connect() as conn:
        rows = recorded(conn, rb.params)
    hashes = set() if rows is None else set(rows["hash"])
    at_when = {} if rows is None else {int(r.created_at): r.hash for r in rows.itertuples() if pd.notna(r.created_at)}
    nxt = set(would_apply(migrations, rows))
    out = []
    for m in migrations:
        if m.hash in hashes:
            state, note = APPLIED, ""
        elif m.when in at_when:
            state, note = DRIFTED, f"recorded at its when with hash {at_when[m.when][:12]}…: the file changed since"
        else:
            state, note = PENDING, ""
        out.append({"tag": m.tag, "when": m.when, "hash": m.hash[:12], "state": state,
                    "next migrate": "runs" if m.tag in nxt else "skipped", "note": note})
    known = {m.hash for m in migrations}
    for r in ([] if rows is None else rows.itertuples()):
        if r.hash not in known and (pd.isna(r.created_at) or int(r.created_at) not in {m.when for m in migrations}):
            out.append({"tag": f"(row {r.id})", "when": r.created_at, "hash": r.hash[:12], "state": "unknown",
                        "next migrate": "", "note": "recorded in the database, in no file of the journal"})
    if rows is None:
        for row in out:
            row["note"] = row["note"] or f"{rb.params.drizzle.schema_}.{rb.params.drizzle.table} does not exist yet"
    return pd.DataFrame(out, columns=COLUMNS)


def record_plan(rb, tags: list[str], source: str = "the command") -> list[Migration]:
    """The journal entries named by `tags` that are not recorded yet; every tag must be in the journal, and
    none may be recorded at its `when` with another hash (its file changed since)."""
    folder = folder_of(rb.params)
    if folder is None:
        raise RunbookError("drizzle.folder is not set for this env: there is no migrations folder to record from")
    migrations = {m.tag: m for m in journal(folder)}
    unknown = [t for t in tags if t not in migrations]
    if unknown:
        raise RunbookError(f"{source} names {', '.join(unknown)}, which the journal in {folder} does not have; "
                           f"the tags are: {', '.join(migrations)}. Nothing was recorded.")
    with rb.engine.connect() as conn:
        rows = recorded(conn, rb.params)
    if rows is None:
        raise RunbookError(f"{rb.params.drizzle.schema_}.{rb.params.drizzle.table} does not exist: the application "
                           f"has never run drizzle-kit migrate here; nothing to hand over to")
    hashes = set(rows["hash"])
    drifted = [t for t in tags if migrations[t].hash not in hashes
               and migrations[t].when in set(rows["created_at"].dropna().astype(int))]
    if drifted:
        raise RunbookError(f"{', '.join(drifted)}: a row is recorded at its `when` with another hash (the file "
                           f"changed since); resolve that with the application team before handing over")
    return [migrations[t] for t in tags if migrations[t].hash not in hashes]


def hand_over_plan(rb) -> list[Migration]:
    """The migrations params name (drizzle.record_after_validate) that are not recorded yet."""
    if folder_of(rb.params) is None or not rb.params.drizzle.record_after_validate:
        return []
    return record_plan(rb, list(rb.params.drizzle.record_after_validate), "drizzle.record_after_validate")


def record(rb, todo: list[Migration]) -> pd.DataFrame:
    """Record migrations whose end state the runbook produced, as drizzle-kit migrate would have: (hash,
    created_at = the journal's when). The ledger keeps which ones, so rollback can take them back. In a dry
    run, lists what it would record."""
    out = []
    for m in todo:
        if not rb.dry_run:
            with rb.engine.begin() as conn:
                conn.execute(text(f"INSERT INTO {_table(conn, rb.params)} (hash, created_at) VALUES (:h, :w)"),
                             {"h": m.hash, "w": m.when})
                if relation_oid(conn, rb.params.ledger_schema, "drizzle_records") is not None:
                    conn.exec_driver_sql(render(conn, sql.SQL(
                        "INSERT INTO {} (tag, hash, created_at) VALUES (%s, %s, %s) ON CONFLICT (tag) DO UPDATE SET "
                        "hash = EXCLUDED.hash, created_at = EXCLUDED.created_at").format(
                        sql.Identifier(rb.params.ledger_schema, "drizzle_records"))), (m.tag, m.hash, m.when))
        out.append({"tag": m.tag, "when": m.when, "hash": m.hash[:12],
                    "outcome": "dry run" if rb.dry_run else "recorded"})
    return pd.DataFrame(out, columns=["tag", "when", "hash", "outcome"])


def hand_over(rb) -> pd.DataFrame:
    """Record the migrations params name (drizzle.record_after_validate). Runs after validate passed (the
    notebook calls it after the verdict). Idempotent: recorded ones are skipped."""
    return record(rb, hand_over_plan(rb))


def recorded_by_runbook(conn: Connection, p) -> list[Migration]:
    """The runbook's records still present (the ledger's drizzle_records, and the hand-over's tags, with hash
    and created_at as the runbook wrote them): rollback removes them, so Drizzle sees those migrations as
    pending again once the schema is back."""
    folder = folder_of(p)
    if folder is None:
        return []
    rows = recorded(conn, p)
    if rows is None:
        return []
    tags = set(p.drizzle.record_after_validate)
    if relation_oid(conn, p.ledger_schema, "drizzle_records") is not None:
        tags |= {r[0] for r in conn.exec_driver_sql(render(conn, sql.SQL("SELECT tag FROM {}").format(
            sql.Identifier(p.ledger_schema, "drizzle_records"))))}
    pairs = {(r.hash, int(r.created_at)) for r in rows.itertuples() if pd.notna(r.created_at)}
    return [m for m in journal(folder) if m.tag in tags and (m.hash, m.when) in pairs]


def forget_statement(p, m: Migration) -> sql.Composed:
    return sql.SQL("DELETE FROM {} WHERE hash = {} AND created_at = {}").format(
        sql.Identifier(p.drizzle.schema_, p.drizzle.table), sql.Literal(m.hash), sql.Literal(m.when))


def forget(control: Connection, p) -> None:
    """After rollback: the ledger's record of what the runbook recorded goes with the records."""
    if relation_oid(control, p.ledger_schema, "drizzle_records") is not None:
        control.exec_driver_sql(render(control, sql.SQL("DELETE FROM {}").format(
            sql.Identifier(p.ledger_schema, "drizzle_records"))))
