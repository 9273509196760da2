"""The hand-over in Drizzle's terms: what the application's schema.ts declares once the runbook is done.

Read from the catalog, per core table: tenantId with its reference to tenants and its index (what 0001
declares), the composite unique keys and (tenant_id, …) foreign keys when distribution.composite_keys made
them, every policy and `.enableRLS()` when row level security is on, and the views' options. The result is
TypeScript the team pastes (one block per table, as `runbook drizzle schema` prints it and the archive
keeps it), and, where params name the application's schema file (`drizzle.schema_file`), the same changes
applied to it and shown as a unified diff. Policy expressions are written exactly as PostgreSQL prints
them, so drizzle-kit compares them without a difference. Names assume Drizzle's usual camelCase for table
variables and properties.

What Drizzle cannot express is listed as notes, each with how the application keeps drizzle-kit from
fighting it: FORCE ROW LEVEL SECURITY, the rollout triggers, the runbook's ledger schema, the roles and
their grants.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection

from . import paths
from .db import catalog, names
from .db.names import TENANT_COLUMN
from .errors import RunbookError

ACTIONS = {"c": "cascade", "n": "set null", "d": "set default", "r": "restrict"}
COMMANDS = {"r": "select", "a": "insert", "w": "update", "d": "delete", "*": "all"}
NOTES = [
    "FORCE ROW LEVEL SECURITY: Drizzle has no way to declare it and drizzle-kit does not read it back, so it "
    "neither adds nor removes it; it stays as constrain set it (keep it in a custom migration, "
    "`drizzle-kit generate --custom`, if you rebuild the database from migrations).",
    "The rollout triggers (tenancy_rollout_*) and their functions live until 06_finalize; drizzle-kit does not "
    "manage triggers or functions and leaves them alone.",
    "The runbook's ledger schema (tenancy_runbook) and Drizzle's own (drizzle): keep `schemaFilter: [\"public\"]` "
    "in drizzle.config.ts so drizzle-kit never proposes to drop them.",
    "Roles (the application role, the legacy role) and their grants: drizzle-kit manages roles only with "
    "`entities: { roles: true }`; leave that off (the default), and policies name the roles as strings.",
]


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _tagged(expr: str) -> str:
    """A PostgreSQL expression as a Drizzle sql`` template (backticks and ${ escaped)."""
    return "sql`" + expr.replace("\\", "\\\\").replace("`", "\\`").replace("${", "\\${") + "`"


@dataclass
class TableHandover:
    table: str
    columns: list[str] = field(default_factory=list)  # lines of the columns object
    extras: list[str] = field(default_factory=list)   # entries of the extra-config array (@t@: its parameter)
    rls: bool = False

    @property
    def variable(self) -> str:
        return camel(self.table)


@dataclass
class Handover:
    tables: list[TableHandover]
    views: dict[str, dict[str, bool]]  # view -> options to declare with .with({...})
    notes: list[str]

    @property
    def imports(self) -> list[str]:
        used = " ".join(line for t in self.tables for line in t.columns + t.extras)
        names = {n for n in ("bigint", "foreignKey", "index", "pgPolicy", "unique") if re.search(rf"\b{n}\(", used)}
        return sorted(names)


POLICIES_SQL = text("""
SELECT p.polname, p.polcmd, p.polpermissive, pg_get_expr(p.polqual, p.polrelid) AS using_expr,
       pg_get_expr(p.polwithcheck, p.polrelid) AS check_expr,
       (SELECT array_agg(CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r) END ORDER BY 1) FROM unnest(p.polroles) r)
         AS roles
FROM pg_policy p WHERE p.polrelid = :oid ORDER BY p.polname
""")

UNIQUES_SQL = text("""
SELECT con.conname, (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS cols
FROM pg_constraint con WHERE con.conrelid = :oid AND con.contype = 'u' ORDER BY con.conname
""")

VIEWS_SQL = text("""
SELECT DISTINCT v.relname AS view, coalesce((SELECT option_value FROM pg_options_to_table(v.reloptions)
                                               WHERE option_name = 'security_invoker'), 'false') AS invoker
FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE d.classid = 'pg_rewrite'::regclass AND n.nspname = :schema AND c.relname = ANY(:tables) AND v.oid <> c.oid
  AND v.relkind = 'v' ORDER BY 1
""")


def _table(conn: Connection, schema: str, st: catalog.TableState, fks: list[catalog.ForeignKey]) -> TableHandover:
    out = TableHandover(st.name)
    if not st.has_column:
        return out
    reference = ".references(() => tenants.id)" if st.fk_name == f"{st.name}_{TENANT_COLUMN}_tenants_id_fk" else ""
    out.columns.append(f'{camel(TENANT_COLUMN)}: bigint("{TENANT_COLUMN}", {{ mode: "number" }})'
                       f'{".notNull()" if st.not_null else ""}{reference},')
    if st.fk_name and not reference:
        out.extras.append(f'foreignKey({{ columns: [@t@.tenantId], foreignColumns: [tenants.id], name: "{st.fk_name}" }}),')
    index = names.index_name(st.name)  # the runbook's (another index led by tenant_id may be a composite key's)
    if conn.execute(text("SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = :oid "
                         "AND c.relname = :name AND i.indisvalid"), {"oid": st.oid, "name": index}).first():
        out.extras.append(f'index("{index}").on(@t@.tenantId),')
    for row in conn.execute(UNIQUES_SQL, {"oid": st.oid}).mappings():
        if TENANT_COLUMN in row["cols"]:
            cols = ", ".join(f"@t@.{camel(c)}" for c in row["cols"])
            out.extras.append(f'unique("{row["conname"]}").on({cols}),')
    attnum = dict(conn.execute(text("SELECT attname, attnum FROM pg_attribute WHERE attrelid = :oid AND attnum > 0"),
                               {"oid": st.oid}).all())
    for fk in fks:
        if fk.child != st.name or TENANT_COLUMN not in fk.cols or fk.parent == "tenants":
            continue
        # column pairs in the child's column order: drizzle-kit 0.31 reads a foreign key's columns back in that
        # order, and would otherwise propose to drop and re-add an unchanged key (the same key either way)
        pairs = sorted(zip(fk.cols, fk.ref_cols), key=lambda pair: attnum[pair[0]])
        fk = replace(fk, cols=[c for c, _ in pairs], ref_cols=[r for _, r in pairs])
        actions = "".join(f'.on{kind}("{ACTIONS[code]}")' for kind, code in (("Update", fk.on_update),
                                                                              ("Delete", fk.on_delete))
                          if code in ACTIONS)
        out.extras.append(
            f"foreignKey({{ columns: [{', '.join(f'@t@.{camel(c)}' for c in fk.cols)}], foreignColumns: "
            f"[{', '.join(f'{camel(fk.parent)}.{camel(c)}' for c in fk.ref_cols)}], name: \"{fk.name}\" }}){actions},")
    for pol in conn.execute(POLICIES_SQL, {"oid": st.oid}).mappings():
        roles = list(pol["roles"] or ["public"])
        to = f'"{roles[0]}"' if len(roles) == 1 else "[" + ", ".join(f'"{r}"' for r in roles) + "]"
        parts = [f'as: "{"permissive" if pol["polpermissive"] else "restrictive"}"',
                 f'for: "{COMMANDS[pol["polcmd"]]}"', f"to: {to}"]
        if pol["using_expr"] is not None:
            parts.append(f"using: {_tagged(pol['using_expr'])}")
        if pol["check_expr"] is not None:
            parts.append(f"withCheck: {_tagged(pol['check_expr'])}")
        out.extras.append(f'pgPolicy("{pol["polname"]}", {{ {", ".join(parts)} }}),')
    out.rls = st.rls_enabled
    return out


def build(rb) -> Handover:
    """The hand-over for the database as it is now."""
    with rb.engine.connect() as conn:
        tenants_oid = catalog.relation_oid(conn, rb.schema, "tenants")
        fks = catalog.foreign_keys(conn, rb.schema, rb.params.tables + ["tenants"])
        tables = [_table(conn, rb.schema, catalog.table_state(conn, rb.schema, name, tenants_oid), fks)
                  for name in rb.params.tables]
        views = {r["view"]: {"securityInvoker": True} for r in conn.execute(
            VIEWS_SQL, {"schema": rb.schema, "tables": rb.params.tables}).mappings()
            if r["invoker"].lower() in ("true", "on", "1")}
    notes = list(NOTES) if any(t.rls for t in tables) else NOTES[1:]
    return Handover(tables, views, notes)


# --- the hand-over as text ---------------------------------------------------------------------------

def markdown(handover: Handover) -> str:
    """What to declare, table by table, as the team pastes it."""
    lines = ["# The runbook's end state in Drizzle's terms", "",
             "Declare these in the application's schema.ts (beside what it has), then run "
             "`drizzle-kit generate` and record the migration it writes with `runbook drizzle record`, so "
             "`drizzle-kit migrate` skips it. Imports from drizzle-orm/pg-core: " + ", ".join(handover.imports)
             + (" (and `sql` from drizzle-orm)" if "pgPolicy" in handover.imports else "") + ".", ""]
    for t in handover.tables:
        if not (t.columns or t.extras or t.rls):
            continue
        lines += [f"## {t.table} (`{t.variable}`)", "", "```ts",
                  f'export const {t.variable} = pgTable("{t.table}", {{', "  // …its columns, and:"]
        lines += [f"  {c}" for c in t.columns]
        lines += ["}, (t) => [", "  // …its other keys and indexes, and:"]
        lines += [f"  {e.replace('@t@', 't')}" for e in t.extras]
        lines += ["]" + (").enableRLS();" if t.rls else ");"), "```", ""]
    for view, options in handover.views.items():
        opts = ", ".join(f"{k}: {str(v).lower()}" for k, v in options.items())
        lines += [f"## view {view}", "", "```ts", f'pgView("{view}").with({{ {opts} }}).as(/* as before */)',
                  "```", ""]
    lines += ["## What Drizzle does not express", ""] + [f"- {n}" for n in handover.notes] + [""]
    return "\n".join(lines)


def _skip_literal(src: str, i: int) -> int:
    quote = src[i]
    i += 1
    while i < len(src) and src[i] != quote:
        i += 2 if src[i] == "\\" else 1
    return i


def _closing(src: str, start: int) -> int:
    """The index of the bracket that closes the one at `start`, skipping string and template literals."""
    pairs = {"{": "}", "[": "]", "(": ")"}
    stack = [pairs[src[start]]]
    i = start + 1
    while i < len(src):
        ch = src[i]
        if ch in "'\"`":
            i = _skip_literal(src, i)
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch == stack[-1]:
            stack.pop()
            if not stack:
                return i
        i += 1
    raise RunbookError("schema.ts: an unbalanced bracket; fix the file before applying the hand-over")


def _normal(line: str) -> str:
    return re.sub(r"\s+", "", line).rstrip(",")


def apply(source: str, handover: Handover) -> str:
    """The schema.ts source with the hand-over applied: each table's missing columns, extras and .enableRLS(),
    the views' options, the imports. Lines already there (whitespace aside) are not added again."""
    for t in handover.tables:
        found = re.search(rf'pgTable\(\s*"{re.escape(t.table)}"\s*,\s*\{{', source)
        if found is None:
            raise RunbookError(f'schema.ts has no pgTable("{t.table}", {{ … }}); declare the table, or apply the '
                               f"hand-over by hand (runbook drizzle schema prints it)")
        call_open = source.index("(", found.start())
        cols_open = found.end() - 1
        cols_close = _closing(source, cols_open)
        body = source[cols_open:cols_close]
        missing = [c for c in t.columns if not any(_normal(c).split(":")[0] == _normal(line).split(":")[0]
                                                    for line in body.splitlines())]
        if missing:
            source = source[:cols_close] + "".join(f"  {c}\n" for c in missing) + source[cols_close:]
            cols_close += sum(len(f"  {c}\n") for c in missing)
        rest = re.match(r"\s*,\s*\(\s*(\w+)\s*\)\s*=>\s*\[", source[cols_close + 1:])
        if rest is None:
            extras = "".join(f"  {e.replace('@t@', 't')}\n" for e in t.extras)
            source = source[:cols_close + 1] + (f", (t) => [\n{extras}]" if extras else "") + source[cols_close + 1:]
        else:
            param = rest.group(1)
            arr_open = cols_close + 1 + rest.end() - 1
            arr_close = _closing(source, arr_open)
            present = {_normal(line) for line in source[arr_open + 1:arr_close].splitlines()}
            todo = [e.replace("@t@", param) for e in t.extras if _normal(e.replace("@t@", param)) not in present]
            if todo:
                prefix = "" if source[:arr_close].rstrip().endswith((",", "[")) else ","
                source = source[:arr_close].rstrip() + prefix + "\n" + "".join(f"  {e}\n" for e in todo) + \
                    source[arr_close:].lstrip(" ")
        call_close = _closing(source, call_open)
        if t.rls and not source[call_close + 1:].lstrip().startswith(".enableRLS()"):
            source = source[:call_close + 1] + ".enableRLS()" + source[call_close + 1:]
    for view, options in handover.views.items():
        opts = ", ".join(f"{k}: {str(v).lower()}" for k, v in options.items())
        source = re.sub(rf'pgView\(\s*"{re.escape(view)}"\s*\)(?!\.with)', f'pgView("{view}").with({{ {opts} }})', source)
    return _imports(source, handover)


def _imports(source: str, handover: Handover) -> str:
    block = re.search(r'import\s*\{([^}]*)\}\s*from\s*"drizzle-orm/pg-core";', source)
    if block is not None:
        have = {n.strip() for n in block.group(1).split(",") if n.strip()}
        names = sorted(have | set(handover.imports), key=str.lower)
        if names != sorted(have, key=str.lower):
            lines, line = [], " "
            for n in names:
                if len(line) + len(n) + 2 > 110:
                    lines.append(line.rstrip())
                    line = " "
                line += f" {n},"
            lines.append(line.rstrip())
            source = source[:block.start()] + "import {\n" + "\n".join(lines) + '\n} from "drizzle-orm/pg-core";' + \
                source[block.end():]
    if "pgPolicy" in handover.imports and not re.search(r'import\s*\{[^}]*\bsql\b[^}]*\}\s*from\s*"drizzle-orm";', source):
        source = 'import { sql } from "drizzle-orm";\n' + source
    return source


def schema_file(p) -> Path | None:
    if not p.drizzle.schema_file:
        return None
    path = Path(p.drizzle.schema_file)
    return path if path.is_absolute() else paths.project_root() / path


def diff(p, handover: Handover) -> str:
    """The unified diff of the application's schema file with the hand-over applied ('' when params name none)."""
    path = schema_file(p)
    if path is None:
        return ""
    if not path.is_file():
        raise RunbookError(f"drizzle.schema_file names {path}, which does not exist; fix the path or set it to null")
    before = path.read_text(encoding="utf-8")
    after = apply(before, handover)
    name = str(p.drizzle.schema_file)
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))
