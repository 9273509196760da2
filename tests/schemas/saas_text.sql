-- A SaaS of our own making in the shape an ORM such as Prisma gives one (issue 27): text (cuid) keys the application
-- generates, quoted camelCase names, enums, jsonb, arrays, an ownership chain five levels deep from the organization
-- down (Organization > Project > Environment > Flag > FlagRule), users who join organizations through a membership
-- table, a composite foreign key onto a unique key (id, "projectId") that is not the primary key, tables of features
-- nobody uses yet (empty), and the ORM's own migrations table.
DO $$ BEGIN CREATE ROLE saas_owner NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE saas_legacy LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT CREATE, USAGE ON SCHEMA public TO saas_owner;
GRANT USAGE ON SCHEMA public TO saas_legacy;

SET ROLE saas_owner;

CREATE TYPE "MembershipRole" AS ENUM ('OWNER', 'ADMIN', 'MEMBER', 'VIEWER');
CREATE TYPE "FlagKind" AS ENUM ('BOOLEAN', 'STRING', 'NUMBER');

CREATE TABLE "_prisma_migrations" (
  id varchar(36) PRIMARY KEY,
  checksum varchar(64) NOT NULL,
  finished_at timestamptz,
  migration_name varchar(255) NOT NULL,
  started_at timestamptz NOT NULL DEFAULT now(),
  applied_steps_count integer NOT NULL DEFAULT 0
);

CREATE TABLE "Organization" (
  id text PRIMARY KEY,
  name text NOT NULL,
  slug text NOT NULL,
  "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
  "updatedAt" timestamp(3) NOT NULL
);
CREATE UNIQUE INDEX "Organization_slug_key" ON "Organization"(slug);

CREATE TABLE "User" (
  id text PRIMARY KEY,
  email text NOT NULL,
  name text,
  "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
  "updatedAt" timestamp(3) NOT NULL
);
CREATE UNIQUE INDEX "User_email_key" ON "User"(email);

CREATE TABLE "Membership" (
  id text PRIMARY KEY,
  "userId" text NOT NULL,
  "organizationId" text NOT NULL,
  role "MembershipRole" NOT NULL DEFAULT 'MEMBER',
  "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE UNIQUE INDEX "Membership_userId_organizationId_key" ON "Membership"("userId", "organizationId");
ALTER TABLE "Membership" ADD CONSTRAINT "Membership_userId_fkey" FOREIGN KEY ("userId") REFERENCES "User"(id)
  ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "Membership" ADD CONSTRAINT "Membership_organizationId_fkey" FOREIGN KEY ("organizationId")
  REFERENCES "Organization"(id) ON DELETE CASCADE ON UPDATE CASCADE;

CREATE TABLE "Project" (
  id text PRIMARY KEY,
  "organizationId" text NOT NULL,
  name text NOT NULL,
  settings jsonb NOT NULL DEFAULT '{}',
  "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
  "updatedAt" timestamp(3) NOT NULL
);
ALTER TABLE "Project" ADD CONSTRAINT "Project_organizationId_fkey" FOREIGN KEY ("organizationId")
  REFERENCES "Organization"(id) ON DELETE CASCADE ON UPDATE CASCADE;

CREATE TABLE "Environment" (
  id text PRIMARY KEY,
  "projectId" text NOT NULL,
  name text NOT NULL,
  "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE UNIQUE INDEX "Environment_id_projectId_key" ON "Environment"(id, "projectId");
ALTER TABLE "Environment" ADD CONSTRAINT "Environment_projectId_fkey" FOREIGN KEY ("projectId") REFERENCES "Project"(id)
  ON DELETE CASCADE ON UPDATE CASCADE;

CREATE TABLE "Flag" (
  id text PRIMARY KEY,
  "environmentId" text NOT NULL,
  key text NOT NULL,
  kind "FlagKind" NOT NULL DEFAULT 'BOOLEAN',
  value jsonb NOT NULL,
  tags text[] NOT NULL DEFAULT '{}',
  "updatedAt" timestamp(3) NOT NULL
);
CREATE UNIQUE INDEX "Flag_environmentId_key_key" ON "Flag"("environmentId", key);
ALTER TABLE "Flag" ADD CONSTRAINT "Flag_environmentId_fkey" FOREIGN KEY ("environmentId") REFERENCES "Environment"(id)
  ON DELETE CASCADE ON UPDATE CASCADE;

CREATE TABLE "FlagRule" (
  id text PRIMARY KEY,
  "flagId" text NOT NULL,
  position integer NOT NULL,
  condition jsonb NOT NULL
);
ALTER TABLE "FlagRule" ADD CONSTRAINT "FlagRule_flagId_fkey" FOREIGN KEY ("flagId") REFERENCES "Flag"(id)
  ON DELETE CASCADE ON UPDATE CASCADE;

CREATE TABLE "Deployment" (
  id text PRIMARY KEY,
  "environmentId" text NOT NULL,
  "projectId" text NOT NULL,
  "deployedById" text,
  status text NOT NULL,
  "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);
ALTER TABLE "Deployment" ADD CONSTRAINT "Deployment_environmentId_projectId_fkey"
  FOREIGN KEY ("environmentId", "projectId") REFERENCES "Environment"(id, "projectId") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "Deployment" ADD CONSTRAINT "Deployment_deployedById_fkey" FOREIGN KEY ("deployedById") REFERENCES "User"(id)
  ON DELETE SET NULL ON UPDATE CASCADE;

-- features nobody uses yet: no rows
CREATE TABLE "ApiKey" (
  id text PRIMARY KEY,
  "organizationId" text NOT NULL,
  "hashedKey" text NOT NULL,
  scopes text[] NOT NULL,
  "expiresAt" timestamp(3)
);
CREATE UNIQUE INDEX "ApiKey_hashedKey_key" ON "ApiKey"("hashedKey");
ALTER TABLE "ApiKey" ADD CONSTRAINT "ApiKey_organizationId_fkey" FOREIGN KEY ("organizationId")
  REFERENCES "Organization"(id) ON DELETE CASCADE ON UPDATE CASCADE;

CREATE TABLE "Webhook" (
  id text PRIMARY KEY,
  "projectId" text NOT NULL,
  url text NOT NULL,
  events text[] NOT NULL
);
ALTER TABLE "Webhook" ADD CONSTRAINT "Webhook_projectId_fkey" FOREIGN KEY ("projectId") REFERENCES "Project"(id)
  ON DELETE CASCADE ON UPDATE CASCADE;

CREATE TABLE "WebhookDelivery" (
  id text PRIMARY KEY,
  "webhookId" text NOT NULL,
  "statusCode" integer CHECK ("statusCode" BETWEEN 100 AND 599),
  payload jsonb NOT NULL,
  "deliveredAt" timestamp(3)
);
ALTER TABLE "WebhookDelivery" ADD CONSTRAINT "WebhookDelivery_webhookId_fkey" FOREIGN KEY ("webhookId")
  REFERENCES "Webhook"(id) ON DELETE CASCADE ON UPDATE CASCADE;

-- the data: cuid-like keys ('c' and 24 hex digits), 5 organizations, 12 users
INSERT INTO "_prisma_migrations" (id, checksum, finished_at, migration_name, applied_steps_count)
SELECT md5('migration' || i)::uuid::text, md5('checksum' || i), now(), format('2026%s_step_%s', lpad(i::text, 4, '0'), i), 1
FROM generate_series(1, 3) i;

INSERT INTO "Organization" (id, name, slug, "updatedAt")
SELECT 'c' || substr(md5('org' || i), 1, 24), 'Organization ' || i, 'org-' || i, '2026-01-01'::timestamp + i * interval '1 day'
FROM generate_series(1, 5) i;

INSERT INTO "User" (id, email, name, "updatedAt")
SELECT 'c' || substr(md5('user' || i), 1, 24), format('user%s@example.com', i), 'User ' || i, '2026-02-01'
FROM generate_series(1, 12) i;

-- each user in the organization of its number; users 1 to 3 also in organization 5 (user 2 with another role)
INSERT INTO "Membership" (id, "userId", "organizationId", role)
SELECT 'c' || substr(md5('member' || i), 1, 24), 'c' || substr(md5('user' || i), 1, 24),
       'c' || substr(md5('org' || (1 + i % 4)), 1, 24), (ARRAY['OWNER', 'ADMIN', 'MEMBER', 'VIEWER'])[1 + i % 4]::"MembershipRole"
FROM generate_series(1, 12) i
UNION ALL
SELECT 'c' || substr(md5('member5-' || i), 1, 24), 'c' || substr(md5('user' || i), 1, 24),
       'c' || substr(md5('org5'), 1, 24), (ARRAY['OWNER', 'VIEWER', 'MEMBER'])[i]::"MembershipRole"
FROM generate_series(1, 3) i;

INSERT INTO "Project" (id, "organizationId", name, settings, "updatedAt")
SELECT 'c' || substr(md5('project' || i), 1, 24), 'c' || substr(md5('org' || (1 + i % 5)), 1, 24), 'Project ' || i,
       jsonb_build_object('color', 'blue', 'n', i), '2026-03-01'
FROM generate_series(1, 10) i;

INSERT INTO "Environment" (id, "projectId", name)
SELECT 'c' || substr(md5('env' || i), 1, 24), 'c' || substr(md5('project' || (1 + i % 10)), 1, 24),
       (ARRAY['production', 'staging'])[1 + i / 10]
FROM generate_series(0, 19) i;

INSERT INTO "Flag" (id, "environmentId", key, kind, value, tags, "updatedAt")
SELECT 'c' || substr(md5('flag' || i), 1, 24), 'c' || substr(md5('env' || (i % 20)), 1, 24), 'flag-' || (i / 20),
       (ARRAY['BOOLEAN', 'STRING', 'NUMBER'])[1 + i % 3]::"FlagKind", to_jsonb(i % 2 = 0), ARRAY['t' || (i % 3)], '2026-03-02'
FROM generate_series(0, 59) i;

INSERT INTO "FlagRule" (id, "flagId", position, condition)
SELECT 'c' || substr(md5('rule' || i), 1, 24), 'c' || substr(md5('flag' || (i % 60)), 1, 24), i / 60,
       jsonb_build_object('attribute', 'country', 'in', jsonb_build_array('DE', 'FR'))
FROM generate_series(0, 119) i;

INSERT INTO "Deployment" (id, "environmentId", "projectId", "deployedById", status)
SELECT 'c' || substr(md5('deploy' || i), 1, 24), e.id, e."projectId",
       CASE WHEN i % 3 = 0 THEN NULL ELSE 'c' || substr(md5('user' || (1 + i % 12)), 1, 24) END,
       (ARRAY['succeeded', 'failed'])[1 + i % 2]
FROM generate_series(0, 39) i JOIN "Environment" e ON e.id = 'c' || substr(md5('env' || (i % 20)), 1, 24);

RESET ROLE;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO saas_legacy;
