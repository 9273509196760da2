"""Composite keys follow every foreign key between tenant tables (issue 27, item 4), also those that reference a
unique key other than the primary key: a two-column key to a composite UNIQUE (id, flow_id), one-column keys to a
UNIQUE uuid constraint and to a unique index that is no constraint. Each gets its (tenant_id, …) twin, validated,
with UNIQUE (tenant_id, <the referenced key>) built beside the parent's key; a child row pointing at another
tenant's parent is refused; the lint passes without an acceptance; a re-run plans nothing; rollback gives back the
schema exactly; 07_distribute's plain-PostgreSQL part swaps the keys and keeps the twins. A key that cannot be
twinned is named by the lint and readiness with what to do."""

import psycopg
import pytest

import step_harness as harness
from conftest import schema_spec
from runbook_helpers import params as params_mod
from runbook_helpers.distribution import readiness as readiness_mod
from runbook_helpers.phases import distribute, rollback
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.tenancy import lint

SCHEMA = """
CREATE TABLE flows (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TABLE steps (
  id bigserial PRIMARY KEY, flow_id bigint NOT NULL REFERENCES flows (id), uuid uuid NOT NULL UNIQUE,
  name text NOT NULL, UNIQUE (id, flow_id)
);
CREATE TABLE runs (
  id bigserial PRIMARY KEY, uuid uuid NOT NULL, flow_id bigint NOT NULL, step_id bigint NOT NULL,
  step_uuid uuid REFERENCES steps (uuid) ON DELETE SET NULL,
  FOREIGN KEY (step_id, flow_id) REFERENCES steps (id, flow_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX runs_uuid_idx ON runs (uuid);
CREATE TABLE run_notes (
  id bigserial PRIMARY KEY, run_uuid uuid NOT NULL REFERENCES runs (uuid), step_uuid uuid REFERENCES steps (uuid),
  note text
);
INSERT INTO flows (name) SELECT 'flow ' || g FROM generate_series(1, 3) g;
INSERT INTO steps (flow_id, uuid, name) SELECT 1 + g % 3, md5('step' || g)::uuid, 'step ' || g
FROM generate_series(1, 12) g;
INSERT INTO runs (uuid, flow_id, step_id, step_uuid)
SELECT md5('run' || g)::uuid, s.flow_id, s.id, CASE WHEN g % 4 <> 0 THEN s.uuid END
FROM generate_series(1, 40) g JOIN steps s ON s.id = 1 + g % 12;
INSERT INTO run_notes (run_uuid, step_uuid, note)
SELECT r.uuid, r.step_uuid, 'note ' || r.id FROM runs r;
"""
TABLES = ["flows", "steps", "runs", "run_notes"]
FK_RULE = "foreign keys between tenant tables include tenant_id"
# each foreign key to a unique key other than the primary key -> its twin's definition
TWINS = {
    "runs.runs_step_id_flow_id_fkey": "FOREIGN KEY (tenant_id, step_id, flow_id) REFERENCES steps(tenant_id, id, "
                                      "flow_id) ON UPDATE CASCADE ON DELETE CASCADE",
    "runs.runs_step_uuid_fkey": "FOREIGN KEY (tenant_id, step_uuid) REFERENCES steps(tenant_id, uuid) "
                                "ON UPDATE CASCADE ON DELETE SET NULL (step_uuid)",
    "run_notes.run_notes_run_uuid_fkey": "FOREIGN KEY (tenant_id, run_uuid) REFERENCES runs(tenant_id, uuid) "
                                         "ON UPDATE CASCADE",
    "run_notes.run_notes_step_uuid_fkey": "FOREIGN KEY (tenant_id, step_uuid) REFERENCES steps(tenant_id, uuid) "
                                          "ON UPDATE CASCADE",
}
UNIQUE_TWINS = {"steps.steps_tenant_id_id_flow_id_unique": "UNIQUE (tenant_id, id, flow_id)",
                "steps.steps_tenant_id_uuid_unique": "UNIQUE (tenant_id, uuid)",
                "runs.runs_tenant_id_uuid_unique": "UNIQUE (tenant_id, uuid)"}


def key_params(ci_params, **changes):
    """The ci params (RLS and composite keys on) with this schema's spec in place of the demo's, and nothing
    accepted in the lint."""
    return schema_spec(ci_params, TABLES, [
        {"name": "runs with their step", "sql": "SELECT count(*) FROM runs r JOIN steps s ON (s.id, s.flow_id) = "
                                                "(r.step_id, r.flow_id)"}], **changes)


@pytest.fixture
def migrated(migrated_db, ci_params):
    """The schema migrated through constrain (a copy of this worker's migrated template), with its dump as built."""
    p = key_params(ci_params)
    db = migrated_db("inspect", "seed", "backfill", "constrain", params=p, schema=SCHEMA)
    db.schema_before = migrated_db(params=p, schema=SCHEMA).schema_dump(exclude_ledger=True)
    return db


def constraints(db, contype: str) -> dict[str, tuple[str, bool]]:
    """table.constraint -> (definition, validated) of the given type with tenant_id in it, or of every foreign key."""
    with db.connect() as conn:
        return {f"{t}.{n}": (d, v) for t, n, d, v in conn.execute(
            "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), c.convalidated "
            "FROM pg_constraint c WHERE c.connamespace = 'public'::regnamespace AND c.contype = %s", (contype,))}


def twin_of(fk: str) -> str:
    """The twin's name as constrain gives it (Drizzle's default)."""
    table, name = fk.split(".")
    with_tenant = {"runs_step_id_flow_id_fkey": "runs_tenant_id_step_id_flow_id_steps_tenant_id_id_flow_id_fk",
                   "runs_step_uuid_fkey": "runs_tenant_id_step_uuid_steps_tenant_id_uuid_fk",
                   "run_notes_run_uuid_fkey": "run_notes_tenant_id_run_uuid_runs_tenant_id_uuid_fk",
                   "run_notes_step_uuid_fkey": "run_notes_tenant_id_step_uuid_steps_tenant_id_uuid_fk"}
    return f"{table}.{with_tenant[name]}"


def test_inspect_plans_the_twins_and_the_unique_keys_they_reference(migrated_db, ci_params):
    db = migrated_db(params=key_params(ci_params), schema=SCHEMA)
    out = db.run("inspect")["inspect"]
    plan = out["plan"][out["plan"]["phase"] == "constrain"]
    steps = plan[plan["table"] == "steps"]
    built = " ;; ".join(steps["statement"])
    assert 'CREATE UNIQUE INDEX CONCURRENTLY "steps_tenant_id_id_flow_id_unique" ON "public"."steps" ' \
           '("tenant_id", "id", "flow_id")' in built
    assert 'ADD CONSTRAINT "steps_tenant_id_id_flow_id_unique" UNIQUE USING INDEX "steps_tenant_id_id_flow_id_unique"' \
        in built
    assert list(steps["action"]).count("build the unique index on (tenant_id, uuid)") == 1  # two keys, one unique
    assert "add UNIQUE (tenant_id, uuid) using that index" in set(plan[plan["table"] == "runs"]["action"])
    for fk in TWINS:
        table, name = twin_of(fk).split(".")
        assert {f"add {name} NOT VALID", f"validate {name}"} <= set(plan[plan["table"] == table]["action"]), fk
    # the lint says what will close each of them
    found = out["lint"].set_index(["rule", "object"])
    row = found.loc[(FK_RULE, "runs.runs_step_id_flow_id_fkey")]
    assert row["status"] == lint.FAIL
    assert row["finding"].endswith("a row can point at another tenant's row; 04_constrain adds its (tenant_id, …) "
                                   "twin, and UNIQUE (tenant_id, id, flow_id) on steps where missing, with "
                                   "distribution.composite_keys")


def test_every_foreign_key_gets_its_twin_validated_and_a_cross_tenant_child_is_refused(migrated):
    db = migrated
    fks, uniques = constraints(db, "f"), constraints(db, "u")
    for name, definition in UNIQUE_TWINS.items():
        assert uniques[name] == (definition, True), name
    for fk, definition in TWINS.items():
        assert fks[twin_of(fk)] == (definition, True), fk
        assert fks[fk][1], fk  # the application's own key stays, validated
    assert db.scalar("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                     "WHERE c.relnamespace = 'public'::regnamespace AND NOT i.indisvalid") == 0

    own = db.scalar("SELECT DISTINCT tenant_id FROM steps")
    other = db.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'other') RETURNING id")
    with db.connect(autocommit=True, options="-c tenancy_runbook.session=runbook") as conn:
        flow = conn.execute("INSERT INTO flows (name, tenant_id) VALUES ('theirs', %s) RETURNING id", (other,)
                            ).fetchone()[0]
        step, step_uuid = conn.execute("INSERT INTO steps (flow_id, uuid, name, tenant_id) VALUES (%s, "
                                       "gen_random_uuid(), 'theirs', %s) RETURNING id, uuid", (flow, other)).fetchone()
        run_uuid = conn.execute("INSERT INTO runs (uuid, flow_id, step_id, step_uuid, tenant_id) VALUES "
                                "(gen_random_uuid(), %s, %s, %s, %s) RETURNING uuid",
                                (flow, step, step_uuid, other)).fetchone()[0]  # within its tenant: accepted
        mine = conn.execute("SELECT flow_id, id FROM steps WHERE tenant_id = %s LIMIT 1", (own,)).fetchone()
        refused = {
            "runs.runs_step_id_flow_id_fkey": ("INSERT INTO runs (uuid, flow_id, step_id, tenant_id) VALUES "
                                               "(gen_random_uuid(), %s, %s, %s)", (flow, step, own)),
            "runs.runs_step_uuid_fkey": ("INSERT INTO runs (uuid, flow_id, step_id, step_uuid, tenant_id) VALUES "
                                         "(gen_random_uuid(), %s, %s, %s, %s)", (*mine, step_uuid, own)),
            "run_notes.run_notes_run_uuid_fkey": ("INSERT INTO run_notes (run_uuid, tenant_id) VALUES (%s, %s)",
                                                  (run_uuid, own)),
            "run_notes.run_notes_step_uuid_fkey": ("INSERT INTO run_notes (run_uuid, step_uuid, tenant_id) "
                                                   "SELECT uuid, %s, tenant_id FROM runs WHERE tenant_id = %s "
                                                   "LIMIT 1", (step_uuid, own)),
        }
        for fk, (query, args) in refused.items():
            with pytest.raises(psycopg.errors.ForeignKeyViolation) as err:  # 23503
                conn.execute(query, args)
            assert err.value.diag.constraint_name == twin_of(fk).split(".")[1], fk


def test_the_lint_passes_without_an_acceptance_and_a_rerun_plans_nothing(migrated):
    db = migrated
    out = db.run("validate")["validate"]
    assert out["checks"]["passed"].all(), out["checks"][~out["checks"]["passed"]].to_dict("records")
    assert out["isolation"]["passed"].all(), out["isolation"][~out["isolation"]["passed"]].to_dict("records")
    frame = out["lint"]
    assert lint.clean(frame) and not (frame["status"] == lint.ACCEPTED).any(), frame[frame["status"] != lint.PASS]
    rows = frame[frame["rule"] == FK_RULE].set_index("object")
    for fk in TWINS:
        assert rows.loc[fk, "status"] == lint.PASS
        assert rows.loc[fk, "finding"].endswith(f"{twin_of(fk).split('.')[1]} beside it includes tenant_id"), fk
    assert db.run("constrain")["constrain"]["plan"].empty


def test_rollback_gives_back_the_schema_exactly(migrated):
    db = migrated
    assert set(UNIQUE_TWINS) <= set(constraints(db, "u"))  # what is to go: the twins and their unique keys
    assert {twin_of(fk) for fk in TWINS} <= set(constraints(db, "f"))
    assert run_phase(db.session("rollback"))["verdict"].startswith(rollback.ROLLED_BACK)
    assert db.schema_dump(exclude_ledger=True) == db.schema_before


def test_a_key_that_cannot_be_twinned_is_named_with_what_to_do(migrated):
    """A key whose parent side holds tenant_id and whose child side does not: its twin would name tenant_id twice."""
    db = migrated
    db.execute("ALTER TABLE runs ADD COLUMN step_tenant bigint")
    db.execute("UPDATE runs SET step_tenant = tenant_id")
    db.execute("ALTER TABLE runs ADD CONSTRAINT runs_step_tenant_fkey FOREIGN KEY (step_tenant, step_id) "
               "REFERENCES steps (tenant_id, id)")
    todo = ("no (tenant_id, …) twin can be built: it references steps (tenant_id, id), which holds tenant_id, from "
            "(step_tenant, step_id), which is not runs's own tenant_id; make it reference steps from runs.tenant_id "
            "(FOREIGN KEY (tenant_id, …)), or accept it in cross_tenant.foreign_keys (runs.runs_step_tenant_fkey: "
            "wins: child, with the reason)")
    with db.session("validate") as rb:
        row = lint.run(rb).set_index(["rule", "object"]).loc[(FK_RULE, "runs.runs_step_tenant_fkey")]
        ready = readiness_mod.readiness(rb).set_index(["check", "object"]).loc[(FK_RULE, "runs.runs_step_tenant_fkey")]
    assert row["status"] == lint.FAIL
    assert row["finding"] == f"(step_tenant, step_id) -> steps: a row can point at another tenant's row; {todo}"
    assert not ready["ready"] and ready["what to do"] == todo
    assert db.run("constrain")["constrain"]["plan"].empty  # nothing planned for it, nothing else either


def test_07_swaps_the_referenced_keys_and_keeps_the_twins(migrated):
    """07_distribute's plain-PostgreSQL part (every step but Citus's own calls): the referenced unique keys become
    (tenant_id, …) under their own names, the composite UNIQUE beside each is dropped as redundant, the application's
    keys without tenant_id go, and the twins, re-added without ON UPDATE CASCADE (Citus refuses it), still refuse
    a cross-tenant child."""
    db = migrated
    db.run("validate", "finalize")
    db.params = params_mod.override(db.params, {"distribution": {"application_keys_agreed": True}})
    with db.session("distribute", params=db.params) as rb:
        # runs.step_uuid's ON DELETE SET NULL: Citus refuses it on its (tenant_id, step_uuid) twin, so 07 refuses first
        refused = distribute.blockers(rb)
    assert refused["object"].tolist() == [f"runs.{twin_of('runs.runs_step_uuid_fkey').split('.')[1]}"], refused
    # the DBA's fix: the application's key without SET NULL, 04_constrain's twin made again from it
    db.execute("ALTER TABLE runs DROP CONSTRAINT runs_step_uuid_fkey, ADD CONSTRAINT runs_step_uuid_fkey "
               "FOREIGN KEY (step_uuid) REFERENCES steps (uuid)")
    db.execute(f"ALTER TABLE runs DROP CONSTRAINT \"{twin_of('runs.runs_step_uuid_fkey').split('.')[1]}\"")
    db.run("constrain")
    with db.session("distribute", params=db.params) as rb:
        assert distribute.blockers(rb).empty
        # a run that stopped after the key swaps: the re-plan keeps the application's keys, drops 04's twins
        rb.executor().run_all([s for s in distribute.analyse(rb).steps if s.action.startswith(("build ", "swap "))])
    with db.session("distribute", dry_run=True, params=db.params) as rb:
        drops = {s.action for s in distribute.analyse(rb).steps if ": the same columns as " in s.action}
    assert {"drop steps_tenant_id_id_flow_id_unique: the same columns as steps_id_flow_id_key (tenant_id, id, flow_id)",
            "drop steps_tenant_id_uuid_unique: the same columns as steps_uuid_key (tenant_id, uuid)",
            "drop runs_tenant_id_uuid_unique: the same columns as runs_uuid_idx (tenant_id, uuid)"} <= drops, drops
    harness.plain_distribute(db)
    fks, uniques = constraints(db, "f"), constraints(db, "u")
    assert uniques["steps.steps_id_flow_id_key"] == ("UNIQUE (tenant_id, id, flow_id)", True)
    assert uniques["steps.steps_uuid_key"] == ("UNIQUE (tenant_id, uuid)", True)
    assert not set(UNIQUE_TWINS) & set(uniques), uniques
    assert db.scalar("SELECT pg_get_indexdef('runs_uuid_idx'::regclass)").endswith("(tenant_id, uuid)")
    for fk, definition in TWINS.items():
        assert fk not in fks
        assert fks[twin_of(fk)] == (definition.replace(" ON UPDATE CASCADE", "").replace(
            " ON DELETE SET NULL (step_uuid)", ""), True), fk
    other = db.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'other') RETURNING id")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("INSERT INTO runs (uuid, flow_id, step_id, tenant_id) SELECT gen_random_uuid(), flow_id, id, %s "
                   "FROM steps LIMIT 1", (other,))


PARTITIONED = """
CREATE TABLE accounts (id bigserial PRIMARY KEY, code uuid NOT NULL UNIQUE);
CREATE TABLE events (
  id bigserial, occurred_on date NOT NULL, uuid uuid NOT NULL, account_code uuid NOT NULL REFERENCES accounts (code),
  PRIMARY KEY (id, occurred_on), UNIQUE (uuid, occurred_on)
) PARTITION BY RANGE (occurred_on);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_other PARTITION OF events DEFAULT;
CREATE TABLE event_notes (
  id bigserial PRIMARY KEY, event_uuid uuid NOT NULL, event_on date NOT NULL,
  FOREIGN KEY (event_uuid, event_on) REFERENCES events (uuid, occurred_on)
);
INSERT INTO accounts (code) SELECT md5('account' || g)::uuid FROM generate_series(1, 5) g;
INSERT INTO events (occurred_on, uuid, account_code)
SELECT date '2024-06-01' + g * 3, md5('event' || g)::uuid, md5('account' || (1 + g % 5))::uuid
FROM generate_series(1, 200) g;
INSERT INTO event_notes (event_uuid, event_on) SELECT uuid, occurred_on FROM events WHERE id % 4 = 0;
"""


def test_a_partitioned_child_and_a_partitioned_parent_get_theirs_too(migrated_db, ci_params):
    """events (partitioned) references accounts (code); event_notes references events (uuid, occurred_on): the
    unique key on the partitioned parent is built per partition and attached, the twin on the partitioned child
    per partition and attached; validate passes, rollback gives back the schema."""
    data = key_params(ci_params).model_dump(by_alias=True)
    data["core_tables"] = {"accounts": {}, "events": {}, "event_notes": {}}
    data["validate"]["smoke_queries"] = [{"name": "notes", "sql": "SELECT count(*) FROM event_notes"}]
    p = params_mod.Params.model_validate(data)
    before = migrated_db(params=p, schema=PARTITIONED).schema_dump(exclude_ledger=True)
    db = migrated_db("inspect", "seed", "backfill", "constrain", params=p, schema=PARTITIONED)
    fks, uniques = constraints(db, "f"), constraints(db, "u")
    assert uniques["accounts.accounts_tenant_id_code_unique"] == ("UNIQUE (tenant_id, code)", True)
    assert uniques["events.events_tenant_id_uuid_occurred_on_unique"] == ("UNIQUE (tenant_id, uuid, occurred_on)", True)
    for leaf in ("events_2024", "events_other"):  # each partition's part of it, attached
        assert db.scalar("SELECT count(*) FROM pg_constraint c JOIN pg_constraint p ON p.oid = c.conparentid WHERE "
                         "c.conrelid = %s::regclass AND p.conname = 'events_tenant_id_uuid_occurred_on_unique'",
                         (leaf,)) == 1, leaf
    assert fks["events.events_tenant_id_account_code_accounts_tenant_id_code_fk"] == (
        "FOREIGN KEY (tenant_id, account_code) REFERENCES accounts(tenant_id, code) ON UPDATE CASCADE", True)
    long_name = "event_notes_tenant_id_event_uuid_event_on_events_tenant_id_uuid_occurred_on_fk"[:63]  # as PostgreSQL
    assert fks[f"event_notes.{long_name}"] == (
        "FOREIGN KEY (tenant_id, event_uuid, event_on) REFERENCES events(tenant_id, uuid, occurred_on) "
        "ON UPDATE CASCADE", True)
    out = db.run("validate")["validate"]
    assert out["checks"]["passed"].all(), out["checks"][~out["checks"]["passed"]].to_dict("records")
    assert lint.clean(out["lint"]) and not (out["lint"]["status"] == lint.ACCEPTED).any()
    assert db.run("constrain")["constrain"]["plan"].empty
    assert run_phase(db.session("rollback"))["verdict"].startswith(rollback.ROLLED_BACK)
    assert db.schema_dump(exclude_ledger=True) == before
