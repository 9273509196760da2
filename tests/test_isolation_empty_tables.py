"""Every table probed (issue 27, item 3): where a tenant table is empty, the isolation suite makes its own probe rows
(parents first, following the table's foreign keys to probe rows it also made) inside its rolled-back transaction,
so no table needs an isolation acceptance for being empty, and a broken policy on an empty table goes red.

A tracker schema of our own: a board, its tickets and their comments all empty (an empty child of an empty parent,
and its child), each with what makes a row hard to make up: NOT NULL foreign keys, an enum, jsonb, a text array, a
unique varchar, a unique uuid, a unique timestamp, CHECK constraints the obvious value breaks, a NOT NULL foreign key
to a shared table, and an empty partitioned table whose only partition lies in 2030. A table with a single row is
copied twice (each copy with fresh keys), not left unprobed for lacking a second."""

import pytest

from runbook_helpers import params as params_mod
from runbook_helpers.phases import validate

TRACKER_SCHEMA = """
CREATE TYPE ticket_state AS ENUM ('open', 'in progress', 'closed');
CREATE TABLE person (person_id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE board (board_id integer PRIMARY KEY, slug varchar(30) NOT NULL UNIQUE, external_id uuid NOT NULL UNIQUE,
                    settings jsonb NOT NULL, priority integer NOT NULL CHECK (priority BETWEEN 10 AND 20),
                    created_at timestamptz NOT NULL DEFAULT now(), archived boolean NOT NULL DEFAULT false);
CREATE TABLE ticket (ticket_id uuid PRIMARY KEY, board_id integer NOT NULL REFERENCES board,
                     state ticket_state NOT NULL, kind text NOT NULL CHECK (kind IN ('bug', 'feature')),
                     labels text[] NOT NULL, estimate numeric(6, 2) NOT NULL CHECK (estimate > 0),
                     opened_at timestamp NOT NULL UNIQUE, due date, done boolean NOT NULL,
                     parent_id uuid REFERENCES ticket, reporter_id integer NOT NULL REFERENCES person,
                     assignee_id integer REFERENCES person);
CREATE TABLE comment (comment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                      ticket_id uuid NOT NULL REFERENCES ticket, seq integer NOT NULL, body text NOT NULL,
                      UNIQUE (ticket_id, seq));
CREATE TABLE event (event_id bigserial, ticket_id uuid REFERENCES ticket, at timestamptz NOT NULL, payload jsonb,
                    PRIMARY KEY (event_id, at)) PARTITION BY RANGE (at);
CREATE TABLE event_2030 PARTITION OF event FOR VALUES FROM ('2030-01-01 00:00+00') TO ('2031-01-01 00:00+00');
CREATE TABLE project (project_id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE milestone (milestone_id integer PRIMARY KEY, title text NOT NULL UNIQUE);
INSERT INTO milestone VALUES (1, 'the only one');
INSERT INTO person SELECT i, 'person ' || i FROM generate_series(1, 5) i;
INSERT INTO project (name) SELECT 'project ' || i FROM generate_series(1, 8) i;
ALTER TYPE ticket_state OWNER TO app_owner;  -- a non-superuser owner, as the demo's: the FORCE case means something
ALTER TABLE person OWNER TO app_owner; ALTER TABLE board OWNER TO app_owner; ALTER TABLE ticket OWNER TO app_owner;
ALTER TABLE comment OWNER TO app_owner; ALTER TABLE event OWNER TO app_owner; ALTER TABLE event_2030 OWNER TO app_owner;
ALTER TABLE project OWNER TO app_owner; ALTER TABLE milestone OWNER TO app_owner;
"""
EMPTY = ["board", "ticket", "comment", "event"]
ONE_ROW = "milestone"           # one row to copy: each probe tenant gets two copies of it, with fresh keys
TABLES = EMPTY + ["project", ONE_ROW]  # an empty table first: the cases that need committed rows must look further
PROBE_ROWS = "probe rows created"
MADE = "2 per probe tenant (made for the empty table, with fresh keys)"
PER_TABLE_CASES = ["tenant sees exactly its own rows", "cross-tenant SELECT by key", "cross-tenant UPDATE by key",
                   "cross-tenant DELETE by key", "INSERT with another tenant's id",
                   "UPDATE moving a row to another tenant", "System Tenant rows not writable by a tenant"]


def tracker_params(ci_params) -> params_mod.Params:
    """The ci params with the tracker's tables, RLS and composite keys on, and no isolation acceptance at all."""
    spec = ci_params.model_dump(by_alias=True)
    spec.update(core_tables={t: {} for t in TABLES}, shared_tables=["person"])
    spec["validate"]["smoke_queries"] = []
    spec["drizzle"].update(folder=None, record_after_validate=[], schema_file=None)
    spec["rls"].update(isolation_accept=[], lint_accept=[])
    return params_mod.Params.model_validate(spec)


@pytest.fixture
def tracker(migrated_db, ci_params):
    params = tracker_params(ci_params)
    assert params.rls.enabled and params.distribution.composite_keys and not params.rls.isolation_accept
    return migrated_db("inspect", "seed", "backfill", "constrain", params=params, schema=TRACKER_SCHEMA)


def suite(db):
    with db.session("validate") as rb:
        return validate.isolation_suite(rb)


def failing(frame):
    return {(r.case, r.table) for r in frame[~frame["passed"]].itertuples()}


def row_counts(db) -> dict[str, int]:
    return {t: db.scalar(f"SELECT count(*) FROM {t}") for t in TABLES + ["person", "event_2030"]}


def test_every_empty_table_is_probed_without_an_acceptance_and_nothing_stays(tracker):
    before = row_counts(tracker)
    assert {t: before[t] for t in EMPTY} == {t: 0 for t in EMPTY}
    results = suite(tracker)

    assert results["passed"].all(), results[~results["passed"]].to_dict("records")
    assert not results["actual"].str.contains("cannot run|accepted").any()
    made = results[results["case"] == PROBE_ROWS].set_index("table")["actual"].to_dict()
    copies = "2 per probe tenant (copies with fresh keys)"
    assert made == {**{t: MADE for t in EMPTY}, "project": copies, ONE_ROW: copies}
    ran = {(r.case, r.table) for r in results.itertuples()}
    assert {(case, table) for case in PER_TABLE_CASES for table in TABLES} <= ran
    # the cases run once, on the first table, take the empty board; those that read committed rows, the project
    once = results[~results["case"].isin(PER_TABLE_CASES + [PROBE_ROWS])].set_index("case")["table"].to_dict()
    assert once["setting empty"] == once["COPY … TO exports only the tenant's rows"] == "board"
    owner = results.set_index("case").loc["table owner isolated too (FORCE)"]
    assert (owner["table"], owner["actual"]) == ("board", "2 rows")  # the owner, subject to RLS, made its own rows
    assert once["negative control: owner without FORCE sees both tenants' rows"] == "board"
    assert once["pooled connection reused after a tenant's transaction"] == "project"
    assert once["setting never set in this session"] == "project"
    assert once["child row referencing another tenant's parent"] in {"comment -> ticket", "event -> ticket",
                                                                     "ticket -> board"}

    # nothing stays: the probe rows went with their transaction, the probe tenants were deleted
    assert row_counts(tracker) == before
    assert tracker.scalar("SELECT count(*) FROM tenants WHERE name LIKE 'isolation probe%'") == 0


def test_a_fail_open_policy_on_an_empty_table_goes_red(tracker):
    tracker.execute("DROP POLICY tenant_isolation_select ON ticket")
    tracker.execute("CREATE POLICY tenant_isolation_select ON ticket FOR SELECT USING (true)")
    results = suite(tracker)
    red = failing(results)
    assert {("tenant sees exactly its own rows", "ticket"), ("cross-tenant SELECT by key", "ticket")} <= red
    assert {table for _, table in red} == {"ticket"}, red
    seen = results.set_index(["case", "table"]).loc[("tenant sees exactly its own rows", "ticket"), "actual"]
    assert seen == "4 rows"  # both probe tenants' made rows, and nothing else: the table is empty
    assert tracker.scalar("SELECT count(*) FROM ticket") == 0


def test_a_leaking_update_policy_on_an_empty_grandchild_goes_red(tracker):
    tracker.execute("DROP POLICY tenant_isolation_update ON comment")
    tracker.execute("CREATE POLICY tenant_isolation_update ON comment FOR UPDATE USING "
                    "(tenant_id = NULLIF(current_setting('app.current_tenant_id', true), '')::bigint) WITH CHECK (true)")
    assert failing(suite(tracker)) == {("UPDATE moving a row to another tenant", "comment")}
    assert tracker.scalar("SELECT count(*) FROM comment") == 0
