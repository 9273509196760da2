"""The legacy demo database: the application's single-tenant schema before migration, with its quirks.

Quirks reproduced on purpose: `"user"` (a reserved word) with array columns of org ids and role ids;
`org_id` columns without foreign keys, some pointing at orgs that no longer exist; the legacy mapping's
ambiguities (emails equal but for case, a user whose org_user role disagrees with role_ids, org_ids
naming orgs that are gone, endpoints whose denormalised org_id differs from their workflow's); a composite primary
key (widgets); an updated_at trigger and a dependent view on workflows; a unique constraint that will
not include tenant_id; and knowledge_bases carrying a nullable tenant_id from an earlier hand-applied
attempt (a third of its rows filled, the rest NULL), so both backfill strategies run. The tables belong
to a non-superuser owner role (app_owner), as in a real deployment, and the legacy application connects
as its own login role (legacy_app) with read and write on every table. The Drizzle state is the
application's: 0000 (users/tenants/user_tenants) applied and recorded, 0001 pending.

All data is generated server-side with generate_series and arithmetic on the row number, so the same
arguments give the same rows on every run and every server version.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
from psycopg import sql

from . import paths
from .drizzle import Migration, journal

# Default table sizes; `rows` sets workflows, `scale` multiplies the rest (about 100k rows in total).
BASE_SIZES = {
    "org": 50,
    "user": 2000,
    "node_types": 40,
    "models": 8000,
    "rules": 30000,
    "decision_tables": 8000,
    "knowledge_bases": 12000,
    "templates": 1000,
    "widgets_per_template": 12,
    "endpoints": 6000,
}
DEFAULT_ROWS = 20000

# Tables first, keys and indexes after the data: bulk index builds are far faster than row-by-row
# maintenance (a 10M-row workflows table builds in minutes). Constraint names are PostgreSQL's defaults,
# the same as inline declarations would get.
SCHEMA_SQL = """
CREATE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := now(); RETURN NEW; END $$;

CREATE TABLE org (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  name text NOT NULL,
  slug text NOT NULL,
  plan text NOT NULL DEFAULT 'free',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  deleted_at timestamptz
);

CREATE TABLE "user" (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  email text NOT NULL,
  display_name text,
  org_ids bigint[] NOT NULL DEFAULT '{}',
  role_ids bigint[] NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE org_user (
  org_id bigint NOT NULL,
  user_id bigint NOT NULL,
  role text NOT NULL DEFAULT 'member',
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE node_types (
  id serial NOT NULL,
  key text NOT NULL,
  label text NOT NULL,
  schema jsonb NOT NULL
);

CREATE TABLE workflows (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  org_id bigint,
  name text NOT NULL,
  status text NOT NULL DEFAULT 'draft',
  definition jsonb NOT NULL DEFAULT '{}',
  created_by bigint,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE models (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  org_id bigint,
  name text NOT NULL,
  kind text NOT NULL,
  version integer NOT NULL DEFAULT 1,
  definition jsonb NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rules (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  workflow_id bigint NOT NULL,
  name text NOT NULL,
  expression text NOT NULL,
  priority integer NOT NULL DEFAULT 0,
  enabled boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE decision_tables (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  model_id bigint NOT NULL,
  name text NOT NULL,
  hit_policy text NOT NULL DEFAULT 'FIRST',
  rows jsonb NOT NULL DEFAULT '[]',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE knowledge_bases (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  org_id bigint,
  name text NOT NULL,
  documents jsonb NOT NULL DEFAULT '[]',
  embedding_model text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE templates (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  name text NOT NULL,
  category text NOT NULL,
  body jsonb NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE widgets (
  template_id bigint NOT NULL,
  position integer NOT NULL,
  kind text NOT NULL,
  config jsonb NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE endpoints (
  id bigserial NOT NULL,
  uuid uuid NOT NULL,
  workflow_id bigint,
  org_id bigint,
  method text NOT NULL,
  path text NOT NULL,
  auth text NOT NULL DEFAULT 'token',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
"""

KEYS_SQL = """
ALTER TABLE org ADD PRIMARY KEY (id), ADD UNIQUE (uuid), ADD UNIQUE (slug);
ALTER TABLE "user" ADD PRIMARY KEY (id), ADD UNIQUE (uuid);
ALTER TABLE org_user ADD PRIMARY KEY (org_id, user_id),
  ADD FOREIGN KEY (org_id) REFERENCES org(id), ADD FOREIGN KEY (user_id) REFERENCES "user"(id);
ALTER TABLE node_types ADD PRIMARY KEY (id), ADD UNIQUE (key);
ALTER TABLE workflows ADD PRIMARY KEY (id), ADD UNIQUE (uuid),
  ADD FOREIGN KEY (created_by) REFERENCES "user"(id),
  ADD CONSTRAINT workflows_org_id_name_key UNIQUE (org_id, name);
CREATE TRIGGER workflows_set_updated_at BEFORE UPDATE ON workflows
  FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE VIEW active_workflows AS
  SELECT id, uuid, org_id, name, updated_at FROM workflows WHERE status = 'active';
ALTER TABLE models ADD PRIMARY KEY (id), ADD UNIQUE (uuid);
ALTER TABLE rules ADD PRIMARY KEY (id), ADD UNIQUE (uuid),
  ADD FOREIGN KEY (workflow_id) REFERENCES workflows(id) ON DELETE CASCADE;
CREATE INDEX rules_workflow_id_idx ON rules (workflow_id);
ALTER TABLE decision_tables ADD PRIMARY KEY (id), ADD UNIQUE (uuid),
  ADD FOREIGN KEY (model_id) REFERENCES models(id);
ALTER TABLE knowledge_bases ADD PRIMARY KEY (id), ADD UNIQUE (uuid);
ALTER TABLE templates ADD PRIMARY KEY (id), ADD UNIQUE (uuid);
ALTER TABLE widgets ADD PRIMARY KEY (template_id, position),
  ADD FOREIGN KEY (template_id) REFERENCES templates(id) ON DELETE CASCADE;
ALTER TABLE endpoints ADD PRIMARY KEY (id), ADD UNIQUE (uuid),
  ADD FOREIGN KEY (workflow_id) REFERENCES workflows(id),
  ADD CONSTRAINT endpoints_method_path_key UNIQUE (method, path)
"""

# Every value derives from the row number i and the seed s: md5 for uuids, mod() for references.
DATA_SQL = """
INSERT INTO org (uuid, name, slug, plan, created_at, updated_at, deleted_at)
SELECT md5('org-' || %(s)s || '-' || i)::uuid, 'Org ' || i, 'org-' || i,
       (ARRAY['free','team','enterprise'])[1 + mod(i, 3)],
       timestamptz '2021-01-01 00:00+00' + i * interval '3 days',
       timestamptz '2021-06-01 00:00+00' + i * interval '3 days',
       CASE WHEN mod(i, 25) = 0 THEN timestamptz '2024-01-01 00:00+00' END
FROM generate_series(1, %(org)s::int) AS i;

INSERT INTO "user" (uuid, email, display_name, org_ids, role_ids, created_at, updated_at)
SELECT md5('user-' || %(s)s || '-' || i)::uuid,
       CASE WHEN mod(i, 97) = 0 THEN 'User' || (i - 1) || '@Example.com' ELSE 'user' || i || '@example.com' END,
       'User ' || i,
       CASE WHEN mod(i, 5) = 0
            THEN ARRAY[1 + mod(i * 7 + %(s)s, %(org)s::int), 1 + mod(i * 13 + %(s)s, %(org)s::int)]::bigint[]
            ELSE ARRAY[1 + mod(i * 7 + %(s)s, %(org)s::int)]::bigint[] END
         || CASE WHEN mod(i, 50) = 0 THEN ARRAY[9100 + mod(i, 3)]::bigint[] ELSE '{}'::bigint[] END,
       ARRAY[1 + mod(i, 4)]::bigint[],
       timestamptz '2022-01-01 00:00+00' + i * interval '1 hour',
       timestamptz '2023-01-01 00:00+00' + i * interval '1 hour'
FROM generate_series(1, %(user)s::int) AS i;

INSERT INTO org_user (org_id, user_id, role, created_at)
SELECT DISTINCT ON (o.org_id, u.id) o.org_id, u.id,
       CASE WHEN mod(u.id, 40) = 0 AND o.k = 2 THEN 'viewer'
            ELSE (ARRAY['owner','admin','editor','viewer'])[1 + mod(u.id::int, 4)] END,
       u.created_at
FROM "user" u CROSS JOIN LATERAL unnest(u.org_ids) WITH ORDINALITY AS o(org_id, k)
WHERE o.org_id IN (SELECT id FROM org)
ORDER BY o.org_id, u.id, o.k DESC;

INSERT INTO node_types (key, label, schema)
SELECT 'node.' || i, 'Node type ' || i, jsonb_build_object('inputs', mod(i, 4) + 1, 'outputs', mod(i, 3) + 1)
FROM generate_series(1, %(node_types)s::int) AS i;

INSERT INTO workflows (uuid, org_id, name, status, definition, created_by, created_at, updated_at)
SELECT md5('workflow-' || %(s)s || '-' || i)::uuid,
       CASE WHEN mod(i, 500) = 0 THEN NULL
            WHEN mod(i, 333) = 0 THEN 9000 + mod(i, 7)
            ELSE 1 + mod(i * 7919 + %(s)s, %(org)s::int) END,
       'Workflow ' || i,
       (ARRAY['draft','active','archived'])[1 + mod(i, 3)],
       jsonb_build_object('nodes', jsonb_build_array(jsonb_build_object('type', 'node.' || (1 + mod(i, %(node_types)s::int)))),
                          'version', 1 + mod(i, 5)),
       1 + mod(i * 31, %(user)s::int),
       timestamptz '2023-01-01 00:00+00' + i * interval '37 seconds',
       timestamptz '2024-01-01 00:00+00' + i * interval '41 seconds'
FROM generate_series(1, %(workflows)s::bigint) AS i;

INSERT INTO models (uuid, org_id, name, kind, version, definition, created_at, updated_at)
SELECT md5('model-' || %(s)s || '-' || i)::uuid, 1 + mod(i * 104729 + %(s)s, %(org)s::int), 'Model ' || i,
       (ARRAY['dmn','pmml','python'])[1 + mod(i, 3)], 1 + mod(i, 9),
       jsonb_build_object('inputs', mod(i, 11), 'outputs', mod(i, 4)),
       timestamptz '2023-02-01 00:00+00' + i * interval '53 seconds',
       timestamptz '2024-02-01 00:00+00' + i * interval '59 seconds'
FROM generate_series(1, %(models)s::int) AS i;

INSERT INTO rules (uuid, workflow_id, name, expression, priority, enabled, created_at, updated_at)
SELECT md5('rule-' || %(s)s || '-' || i)::uuid, 1 + mod(i * 7907 + %(s)s, %(workflows)s::bigint),
       'Rule ' || i, 'amount > ' || mod(i * 17, 10000), mod(i, 10), mod(i, 11) <> 0,
       timestamptz '2023-03-01 00:00+00' + i * interval '23 seconds',
       timestamptz '2024-03-01 00:00+00' + i * interval '29 seconds'
FROM generate_series(1, %(rules)s::int) AS i;

INSERT INTO decision_tables (uuid, model_id, name, hit_policy, rows, created_at, updated_at)
SELECT md5('decision-' || %(s)s || '-' || i)::uuid, 1 + mod(i * 613 + %(s)s, %(models)s::int),
       'Decision table ' || i, (ARRAY['FIRST','UNIQUE','COLLECT'])[1 + mod(i, 3)],
       jsonb_build_array(jsonb_build_object('when', mod(i, 100), 'then', 'outcome-' || mod(i, 7))),
       timestamptz '2023-04-01 00:00+00' + i * interval '61 seconds',
       timestamptz '2024-04-01 00:00+00' + i * interval '67 seconds'
FROM generate_series(1, %(decision_tables)s::int) AS i;

INSERT INTO knowledge_bases (uuid, org_id, name, documents, embedding_model, created_at, updated_at)
SELECT md5('kb-' || %(s)s || '-' || i)::uuid, 1 + mod(i * 211 + %(s)s, %(org)s::int), 'Knowledge base ' || i,
       jsonb_build_array(jsonb_build_object('title', 'Doc ' || i, 'pages', 1 + mod(i, 40))),
       CASE WHEN mod(i, 4) = 0 THEN NULL ELSE 'text-embedding-' || (1 + mod(i, 3)) END,
       timestamptz '2023-05-01 00:00+00' + i * interval '71 seconds',
       timestamptz '2024-05-01 00:00+00' + i * interval '73 seconds'
FROM generate_series(1, %(knowledge_bases)s::int) AS i;

INSERT INTO templates (uuid, name, category, body, created_at, updated_at)
SELECT md5('template-' || %(s)s || '-' || i)::uuid, 'Template ' || i,
       (ARRAY['approval','scoring','routing','alerting'])[1 + mod(i, 4)],
       jsonb_build_object('layout', 'grid', 'columns', 1 + mod(i, 4)),
       timestamptz '2023-06-01 00:00+00' + i * interval '2 hours',
       timestamptz '2024-06-01 00:00+00' + i * interval '2 hours'
FROM generate_series(1, %(templates)s::int) AS i;

INSERT INTO widgets (template_id, position, kind, config, created_at, updated_at)
SELECT t, p, (ARRAY['chart','table','form','text'])[1 + mod(t + p, 4)],
       jsonb_build_object('w', 1 + mod(p, 3), 'h', 1 + mod(t, 2)),
       timestamptz '2023-06-01 00:00+00' + t * interval '2 hours' + p * interval '1 minute',
       timestamptz '2024-06-01 00:00+00' + t * interval '2 hours' + p * interval '1 minute'
FROM generate_series(1, %(templates)s::int) AS t, generate_series(0, %(widgets_per_template)s::int - 1) AS p;

INSERT INTO endpoints (uuid, workflow_id, org_id, method, path, auth, created_at, updated_at)
SELECT md5('endpoint-' || %(s)s || '-' || i)::uuid, w.id,
       CASE WHEN mod(i, 101) = 0 THEN 1 + mod(coalesce(w.org_id, 0), %(org)s::int) ELSE w.org_id END,
       (ARRAY['GET','POST','PUT','DELETE'])[1 + mod(i, 4)], '/api/v1/hooks/' || i,
       (ARRAY['token','oauth','none'])[1 + mod(i, 3)],
       timestamptz '2023-07-01 00:00+00' + i * interval '83 seconds',
       timestamptz '2024-07-01 00:00+00' + i * interval '89 seconds'
FROM generate_series(1, %(endpoints)s::int) AS i
JOIN workflows w ON w.id = 1 + mod(i * 3571 + %(s)s, %(workflows)s::bigint)
ORDER BY i;
"""

# The earlier hand-applied attempt: a nullable tenant_id on knowledge_bases, the System Tenant inserted
# by hand, and a third of the rows pointed at it before the attempt was abandoned.
PARTIAL_ATTEMPT_SQL = """
ALTER TABLE knowledge_bases ADD COLUMN tenant_id bigint;
INSERT INTO tenants (uuid, name, created_at, updated_at)
VALUES (%(system_uuid)s::uuid, %(system_name)s, timestamptz '2025-01-15 09:00+00', timestamptz '2025-01-15 09:00+00');
UPDATE knowledge_bases SET tenant_id = (SELECT id FROM tenants WHERE uuid = %(system_uuid)s::uuid)
WHERE mod(id, 3) = 0;
"""

# The application's tables belong to its own owner role, not to a superuser: the runbook (a superuser or a
# BYPASSRLS role) migrates them, and FORCE ROW LEVEL SECURITY has an owner to hold to the policies.
APP_OWNER = "app_owner"
OWNERSHIP_SQL = """
DO $$ BEGIN
  CREATE ROLE app_owner NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT c.oid::regclass AS rel, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname IN ('public', 'drizzle') AND c.relkind IN ('r', 'v') LOOP
    EXECUTE format('ALTER %s %s OWNER TO app_owner', CASE r.relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END, r.rel);
  END LOOP;
END $$;
ALTER FUNCTION set_updated_at() OWNER TO app_owner;
ALTER SCHEMA drizzle OWNER TO app_owner;
GRANT USAGE, CREATE ON SCHEMA public TO app_owner
"""

# The legacy application connects as its own login role, which may read and write every table: the role
# rls.legacy_role names in local and ci, whose contract row level security then keeps (tenancy/rls.py).
LEGACY_ROLE = "legacy_app"
LEGACY_ROLE_SQL = """
DO $$ BEGIN
  CREATE ROLE legacy_app LOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
ALTER ROLE legacy_app LOGIN;
ALTER ROLE legacy_app RESET ALL;
GRANT USAGE ON SCHEMA public TO legacy_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO legacy_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO legacy_app
"""

DRIZZLE_TABLE_SQL = """
CREATE SCHEMA drizzle;
CREATE TABLE drizzle.__drizzle_migrations (id SERIAL PRIMARY KEY, hash text NOT NULL, created_at bigint);
"""


def drizzle_dir() -> Path:
    return paths.project_root() / "demo" / "drizzle"


def drizzle_migrations(folder: Path | None = None) -> list[Migration]:
    return journal(folder or drizzle_dir())


def sizes(rows: int = DEFAULT_ROWS, scale: float = 1.0) -> dict[str, int]:
    out = {k: max(1, round(v * scale)) for k, v in BASE_SIZES.items()}
    out["org"] = max(out["org"], 10)
    out["widgets_per_template"] = BASE_SIZES["widgets_per_template"]
    out["workflows"] = rows
    return out


def build(admin_conninfo: str, database: str, *, system_uuid: str, system_name: str = "System Tenant",
          rows: int = DEFAULT_ROWS, scale: float = 1.0, seed: int = 42, log=print) -> dict[str, int]:
    """Drop and recreate `database` as the legacy demo database. Returns rows per table."""
    started = time.monotonic()
    with psycopg.connect(admin_conninfo, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    target = psycopg.conninfo.make_conninfo(admin_conninfo, dbname=database)
    args = dict(sizes(rows, scale), s=seed, system_uuid=system_uuid, system_name=system_name)
    migrations = drizzle_migrations()
    with psycopg.connect(target) as conn:
        conn.execute("SET client_min_messages = warning")
        conn.execute(SCHEMA_SQL)
        for statement in DATA_SQL.split(";\n\n"):
            conn.execute(statement, args)
        conn.execute(KEYS_SQL)
        for statement in migrations[0].statements():
            conn.execute(statement)
        for statement in PARTIAL_ATTEMPT_SQL.strip().split(";\n"):
            conn.execute(statement, args)
        conn.execute(DRIZZLE_TABLE_SQL)
        conn.execute(
            "INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES (%s, %s)",
            (migrations[0].hash, migrations[0].when),
        )
        conn.execute(OWNERSHIP_SQL)
        conn.execute(LEGACY_ROLE_SQL)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
        counts = table_counts(conn)
    log(f"demo database {database}: {sum(counts.values()):,} rows in {len(counts)} tables "
        f"({time.monotonic() - started:.1f} s)")
    return counts


def table_counts(conn: psycopg.Connection, schema: str = "public") -> dict[str, int]:
    tables = [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r','p') ORDER BY c.relname", (schema,))]
    return {t: conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
        sql.Identifier(schema), sql.Identifier(t))).fetchone()[0] for t in tables}
