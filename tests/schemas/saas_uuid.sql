-- A SaaS of our own making with uuid keys (issue 27): keys from gen_random_uuid() where the application leaves them
-- out, snake_case names, a membership table keyed by both ids (no id of its own), a tenant source whose key is its
-- uuid, a chain three levels deep from the account down (accounts > boards > cards > comments), and a table of a
-- feature nobody uses yet (attachments, empty). Deterministic: the data names its keys (md5 of a label, as a uuid).
DO $$ BEGIN CREATE ROLE board_owner NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE board_legacy LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT CREATE, USAGE ON SCHEMA public TO board_owner;
GRANT USAGE ON SCHEMA public TO board_legacy;

SET ROLE board_owner;

CREATE TABLE accounts (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name text NOT NULL,
  plan text NOT NULL DEFAULT 'free' CHECK (plan IN ('free', 'team', 'enterprise')),
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE people (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  email text NOT NULL UNIQUE,
  full_name text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE account_people (
  account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  person_id uuid NOT NULL REFERENCES people (id) ON DELETE CASCADE,
  role text NOT NULL DEFAULT 'member',
  PRIMARY KEY (account_id, person_id)
);

CREATE TABLE boards (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  title text NOT NULL,
  archived boolean NOT NULL DEFAULT false
);

CREATE TABLE cards (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  board_id uuid NOT NULL REFERENCES boards (id) ON DELETE CASCADE,
  title text NOT NULL,
  position numeric(12, 4) NOT NULL,
  assignee_id uuid REFERENCES people (id) ON DELETE SET NULL,
  due_on date
);
CREATE INDEX cards_board_id_idx ON cards (board_id);

CREATE TABLE comments (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  card_id uuid NOT NULL REFERENCES cards (id) ON DELETE CASCADE,
  author_id uuid NOT NULL REFERENCES people (id),
  body text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- no rows yet
CREATE TABLE attachments (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  card_id uuid NOT NULL REFERENCES cards (id) ON DELETE CASCADE,
  file_name text NOT NULL,
  bytes bigint NOT NULL CHECK (bytes > 0),
  uploaded_by uuid REFERENCES people (id)
);

INSERT INTO accounts (id, name, plan)
SELECT md5('account' || i)::uuid, 'Account ' || i, (ARRAY['free', 'team', 'enterprise'])[1 + i % 3]
FROM generate_series(1, 4) i;

INSERT INTO people (id, email, full_name)
SELECT md5('person' || i)::uuid, format('person%s@example.org', i), 'Person ' || i
FROM generate_series(1, 8) i;

-- person i in account 1 + i % 4; persons 1 and 2 also in account 1 (person 1 already is: only person 2 is added)
INSERT INTO account_people (account_id, person_id, role)
SELECT md5('account' || (1 + i % 4))::uuid, md5('person' || i)::uuid, (ARRAY['admin', 'member'])[1 + i % 2]
FROM generate_series(1, 8) i
UNION ALL
SELECT md5('account1')::uuid, md5('person2')::uuid, 'member';

INSERT INTO boards (id, account_id, title)
SELECT md5('board' || i)::uuid, md5('account' || (1 + i % 4))::uuid, 'Board ' || i
FROM generate_series(1, 8) i;

INSERT INTO cards (id, board_id, title, position, assignee_id, due_on)
SELECT md5('card' || i)::uuid, md5('board' || (1 + i % 8))::uuid, 'Card ' || i, i * 1.5,
       CASE WHEN i % 4 = 0 THEN NULL ELSE md5('person' || (1 + i % 8))::uuid END, DATE '2026-12-01' + i
FROM generate_series(1, 40) i;

INSERT INTO comments (id, card_id, author_id, body)
SELECT md5('comment' || i)::uuid, md5('card' || (1 + i % 40))::uuid, md5('person' || (1 + i % 8))::uuid, 'Comment ' || i
FROM generate_series(1, 80) i;

RESET ROLE;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO board_legacy;
