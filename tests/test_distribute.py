"""07_distribute on plain PostgreSQL (issue 18): the phase refuses without Citus and changes nothing; its plan follows
the order a Citus 13 cluster accepted; the parts that run on plain PostgreSQL (the key changes, the foreign key
drop/re-add cycle) are applied here, step by step, to a migrated clone, and the application's tenant-aware queries
still work after them. create_distributed_table and create_reference_table are never stubbed: here they are only
planned, and the phase refuses before any of them could run."""

import re

import psycopg
import pytest

import step_harness as harness

from runbook_helpers import params as params_mod
from runbook_helpers.errors import RunbookError
from runbook_helpers.phases import distribute, rollback
from runbook_helpers.phases.headless import run_phase
from runbook_helpers.run import runner
from runbook_helpers.distribution import citus

MIGRATED = ("inspect", "seed", "backfill", "constrain", "validate", "finalize")
# what the demo needs to be let through: the application agreed, its updated_at trigger goes along, "user" (which
# workflows.created_by references) becomes a reference table
AGREED = {"distribution": {"application_keys_agreed": True, "triggers": "enable_unsafe", "reference_tables": ["user"]}}
CITUS_CALLS = harness.CITUS_CALLS


def finalized(migrated_db, overrides=None):
    db = migrated_db(*MIGRATED)
    if overrides:
        db.params = params_mod.override(db.params, overrides)
    return db


def constraints(db) -> dict[str, str]:
    with db.connect() as conn:
        return dict(conn.execute(
            "SELECT c.conrelid::regclass::text || '.' || c.conname, pg_get_constraintdef(c.oid) || "
            "CASE WHEN c.convalidated THEN '' ELSE ' (not validated)' END FROM pg_constraint c JOIN pg_namespace n "
            "ON n.oid = c.connamespace WHERE n.nspname = 'public' AND c.contype IN ('p', 'u', 'f')").fetchall())


def ledger_changes(db) -> int:
    return db.scalar("SELECT count(*) FROM tenancy_runbook.distribution_changes")


def test_the_phase_refuses_without_citus_and_changes_nothing(migrated_db):
    db = finalized(migrated_db, AGREED)
    before = db.schema_dump(exclude_ledger=True)
    with pytest.raises(RunbookError) as refused:
        run_phase(db.session("distribute"))
    assert str(refused.value).startswith("this server has no citus extension (SELECT extversion FROM pg_extension "
                                         "WHERE extname = 'citus' returns no row): 07_distribute")
    assert str(refused.value).endswith("Nothing was changed.")
    assert db.schema_dump(exclude_ledger=True) == before
    assert ledger_changes(db) == 0
    # a dry run shows the plan on any server, and says a run would be refused
    out = run_phase(db.session("distribute", dry_run=True))
    assert set(out["applied"]["outcome"]) == {"dry run"}
    assert out["verdict"].startswith("dry run: nothing was changed; a run would be refused here: this server has no "
                                     "citus extension")
    assert out["target"].set_index("check").loc["citus extension", "found"] == "none"
    assert db.schema_dump(exclude_ledger=True) == before
    # it runs alone, as finalize does
    with pytest.raises(RunbookError, match="distribute runs alone: `runbook distribute --env ENV`"):
        runner.parse_phases("validate,distribute")
    assert runner.parse_phases("distribute") == ["distribute"]


def test_the_plan_follows_the_order_citus_accepted(migrated_db):
    db = finalized(migrated_db, AGREED)
    with db.session("distribute", dry_run=True) as rb:
        plan = distribute.plan(rb)
        stops = distribute.blockers(rb)
    assert stops.empty, stops.to_dict("records")

    def first(prefix):
        return min(i for i, a in enumerate(plan["action"]) if a.startswith(prefix))

    def last(prefix):
        return max(i for i, a in enumerate(plan["action"]) if a.startswith(prefix))

    # keys first, then the foreign keys dropped, the reference tables, the tenant tables, the foreign keys back
    assert last("swap ") < first("drop ") and last("drop ") < first("make tenants a reference table")
    assert last("make node_types a reference table") < first("distribute ") < last("distribute ") < first("re-add ")
    assert first("re-add ") < first("validate ")
    statements = list(plan["statement"])
    assert "SELECT create_reference_table('\"public\".\"tenants\"')" in statements
    assert "SELECT create_reference_table('\"public\".\"user\"')" in statements
    distributed = [s for s in statements if "create_distributed_table" in s]
    assert distributed[0] == ("SET LOCAL citus.enable_unsafe_triggers = on; SELECT create_distributed_table("
                              "'\"public\".\"workflows\"', 'tenant_id')")  # the table with the updated_at trigger
    assert len(distributed) == 8 and all("colocate_with => '\"public\".\"workflows\"'" in s for s in distributed[1:])
    # every swap is separate statements in one transaction: nothing Citus refuses
    assert not [s for s in statements if citus.refused_shape(s)]
    swap = plan[plan["action"] == "swap workflows_pkey to (tenant_id, id)"].iloc[0]
    assert swap["statement"].endswith('ALTER TABLE "public"."workflows" DROP CONSTRAINT "workflows_pkey"; ALTER TABLE '
                                      '"public"."workflows" ADD CONSTRAINT "workflows_pkey" PRIMARY KEY USING INDEX '
                                      '"workflows_pkey_with_tenant_id"')
    assert 'ALTER TABLE "public"."rules" DROP CONSTRAINT "rules_workflow_id_fkey"' in swap["statement"]
    # Citus's own cost: the bytes each copy moves, the table's size as pg_total_relation_size gives it
    moved = plan.dropna(subset=["data moved (bytes)"]).set_index("table")["data moved (bytes)"]
    assert moved["workflows"] == db.scalar("SELECT pg_total_relation_size('workflows')") > 0
    assert moved["tenants"] == db.scalar("SELECT pg_total_relation_size('tenants')")
    assert plan.loc[plan["action"].str.startswith("distribute "), "lock"].str.startswith("EXCLUSIVE on the table").all()


def test_the_phase_stops_while_the_application_relies_on_keys_without_tenant_id(migrated_db):
    db = finalized(migrated_db, {"distribution": {"triggers": "enable_unsafe", "reference_tables": ["user"]}})
    with db.session("distribute", dry_run=True) as rb:
        analysis = distribute.analyse(rb)
        stops = distribute.blockers(rb)
    assert analysis.agreement_missing.startswith("distribution.application_keys_agreed is false: the application "
                                                 "still relies on keys without tenant_id (decision_tables.")
    assert "workflows.workflows_pkey (id)" in analysis.agreement_missing
    assert list(stops["blocker"]) == ["the application has not agreed to the key changes"]


def test_the_blockers_name_what_to_do(migrated_db):
    db = migrated_db(*MIGRATED[:-1])  # before finalize: the rollout window is open
    with db.session("distribute", dry_run=True) as rb:
        stops = distribute.blockers(rb)
    found = stops.set_index("object")
    assert found.loc["workflows.tenancy_rollout_assign", "blocker"] == "the rollout window is open"
    assert found.loc["workflows.workflows_set_updated_at", "what to do"].startswith(
        "set distribution.triggers: enable_unsafe")
    assert found.loc["workflows.workflows_created_by_fkey", "what to do"].startswith(
        "name user in distribution.reference_tables")


run_plain_postgres_part = harness.plain_distribute  # every step but Citus's own calls, in plan order


def test_the_key_changes_and_the_foreign_key_cycle_run_online_on_plain_postgres(migrated_db):
    db = finalized(migrated_db, AGREED)
    before = constraints(db)
    actions = run_plain_postgres_part(db)
    after = constraints(db)
    # every primary and unique key of a tenant table now leads with tenant_id, under its old name
    assert after["workflows.workflows_pkey"] == "PRIMARY KEY (tenant_id, id)"
    assert after["workflows.workflows_uuid_key"] == "UNIQUE (tenant_id, uuid)"
    assert after["workflows.workflows_org_id_name_key"] == "UNIQUE (tenant_id, org_id, name)"
    assert after["endpoints.endpoints_method_path_key"] == "UNIQUE (tenant_id, method, path)"
    assert after["widgets.widgets_pkey"] == 'PRIMARY KEY (tenant_id, template_id, "position")'
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE "
                            "c.relnamespace = 'public'::regnamespace AND NOT i.indisvalid").fetchone()[0] == 0
    # the single-column foreign keys between tenant tables are gone, their (tenant_id, …) twins enforce them
    assert "rules.rules_workflow_id_fkey" in before and "rules.rules_workflow_id_fkey" not in after
    # (re-added without ON UPDATE CASCADE, which Citus refuses where the key holds tenant_id: a distributed row's
    # tenant_id cannot change)
    assert before["rules.rules_tenant_id_workflow_id_workflows_tenant_id_id_fk"] == (
        "FOREIGN KEY (tenant_id, workflow_id) REFERENCES workflows(tenant_id, id) ON UPDATE CASCADE ON DELETE CASCADE")
    assert after["rules.rules_tenant_id_workflow_id_workflows_tenant_id_id_fk"] == (
        "FOREIGN KEY (tenant_id, workflow_id) REFERENCES workflows(tenant_id, id) ON DELETE CASCADE")
    # every other foreign key went and came back, validated (the cycle around distribution): exactly, but for the
    # ON UPDATE action of those that hold tenant_id
    dropped = {a.split()[1].rstrip(":") for a in actions if a.startswith("drop ")}
    cycled = [k for k in before if k.split(".")[1] in dropped and k in after]
    assert len(cycled) >= 12 and all(after[k] == before[k].replace(" ON UPDATE CASCADE", "") for k in cycled)
    assert not [d for d in after.values() if d.endswith("(not validated)")]
    # 04's composite UNIQUE (tenant_id, id) beside the primary key that became (tenant_id, id): dropped, recorded
    redundant = [k for k in before if k.split(".")[1] in dropped and k not in after]
    assert set(redundant) == {f"{t}.{t}_tenant_id_id_unique" for t in db.params.tables if t != "widgets"} | {
        "widgets.widgets_tenant_id_template_id_position_unique"}, redundant
    assert ledger_changes(db) == len(cycled) + len(redundant) + sum(a.startswith("swap ") for a in actions)
    # the application's tenant-aware queries work; what it agreed to give up does not
    with db.connect(autocommit=True) as conn:
        tenant, workflow, org = conn.execute("SELECT tenant_id, id, org_id FROM workflows ORDER BY id LIMIT 1").fetchone()
        for query in db.params.validate_.smoke_queries:
            conn.execute(query.sql).fetchall()
        new = conn.execute("INSERT INTO workflows (uuid, org_id, name, definition, tenant_id) VALUES "
                           "(gen_random_uuid(), %s, 'distributed', '{}', %s) RETURNING id", (org, tenant)).fetchone()[0]
        conn.execute("INSERT INTO rules (uuid, workflow_id, name, expression, tenant_id) VALUES (gen_random_uuid(), %s, 'r', "
                     "'true', %s)",
                     (new, tenant))
        conn.execute("INSERT INTO workflows (id, uuid, org_id, name, definition, tenant_id) VALUES (%s, gen_random_uuid(), "
                     "%s, 'renamed', '{}', %s) ON CONFLICT (tenant_id, id) DO UPDATE SET name = EXCLUDED.name",
                     (new, org, tenant))
        assert conn.execute("SELECT name FROM workflows WHERE tenant_id = %s AND id = %s", (tenant, new)).fetchone() == \
            ("renamed",)
        other = conn.execute("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'other') RETURNING id").fetchone()[0]
        with pytest.raises(psycopg.errors.ForeignKeyViolation):  # a rule may not point at another tenant's workflow
            conn.execute("INSERT INTO rules (uuid, workflow_id, name, expression, tenant_id) VALUES (gen_random_uuid(), "
                         "%s, 'x', 'true', %s)",
                         (workflow, other))
        with pytest.raises(psycopg.errors.InvalidColumnReference):  # ON CONFLICT (id) has no key any more
            conn.execute("INSERT INTO workflows (id, uuid, org_id, name, definition, tenant_id) VALUES (%s, "
                         "gen_random_uuid(), %s, 'x', '{}', %s) ON CONFLICT (id) DO NOTHING", (new, org, tenant))
        conn.execute("DELETE FROM workflows WHERE tenant_id = %s AND id = %s", (tenant, new))
        assert conn.execute("SELECT count(*) FROM rules WHERE workflow_id = %s", (new,)).fetchone()[0] == 0  # cascades
    # a re-plan has no key change left; 99_rollback refuses, naming what changed, and changes nothing
    with db.session("distribute", dry_run=True) as rb:
        assert not [s for s in distribute.analyse(rb).steps if s.action.startswith(("swap ", "build "))]
    dump = db.schema_dump(exclude_ledger=True)
    with pytest.raises(RunbookError, match=r"07_distribute changed this database \(key decision_tables\.decision_tables"
                                           r"_pkey.*99_rollback does not undo distribution"):
        with db.session("rollback", dry_run=True) as rb:
            rollback.plan(rb)
    assert db.schema_dump(exclude_ledger=True) == dump


def test_a_swap_interrupted_after_its_index_resumes(migrated_db):
    """The unique index built, the swap not run (killed between them): a re-plan keeps the index and swaps."""
    db = finalized(migrated_db, AGREED)
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY models_uuid_key_with_tenant_id ON models (tenant_id, uuid)")
    with db.session("distribute", dry_run=True) as rb:
        actions = [s.action for s in distribute.analyse(rb).steps if s.table == "models"]
    assert "build the unique index on (tenant_id, uuid)" not in actions
    assert "swap models_uuid_key to (tenant_id, uuid)" in actions


def test_a_run_that_failed_after_dropping_the_foreign_keys_resumes_to_the_same_end_state(migrated_db):
    """On a Citus cluster 07 dropped every foreign key it records, then re-adding one failed (issue 25): the re-run
    must read the foreign keys to tenants that 07 itself dropped (the ledger's distribution_changes) as its own work
    to finish, not as a missing precondition, and complete to the end state of a run that was never interrupted."""
    uninterrupted = finalized(migrated_db, AGREED)
    run_plain_postgres_part(uninterrupted)
    db = finalized(migrated_db, AGREED)
    with db.session("distribute", params=db.params) as rb:
        steps = [s for s in distribute.analyse(rb).steps
                 if not any(call in str(s.statement.as_string(None)) for call in CITUS_CALLS)]
        last_drop = max(i for i, s in enumerate(steps) if s.action.startswith("drop "))
        rb.executor().run_all(steps[:last_drop + 1])
    dropped = db.scalar("SELECT count(*) FROM tenancy_runbook.distribution_changes WHERE kind = 'foreign key' AND "
                        "definition LIKE 'FOREIGN KEY (tenant_id) REFERENCES tenants(id)%%' AND table_name = ANY(%s)",
                        (db.params.tables,))
    assert dropped == len(db.params.tables)  # every tenant table's key to tenants is gone, recorded
    with db.session("distribute", dry_run=True) as rb:  # stopped here (killed): a re-run may start
        assert distribute.blockers(rb).to_dict("records") == []  # before: 8 x "tenant_id is not NOT NULL with …"
    # the application writes a row that breaks one of them meanwhile: its VALIDATE fails, the run stops there
    org = db.scalar("SELECT org_id FROM workflows ORDER BY id LIMIT 1")
    db.execute("INSERT INTO workflows (uuid, org_id, name, definition, tenant_id) VALUES (gen_random_uuid(), %s, "
               "'orphan', '{}', 999999)", (org,))
    with pytest.raises(RunbookError, match="validate workflows_tenant_id_tenants_id_fk failed"):
        run_plain_postgres_part(db)
    with db.session("distribute", dry_run=True) as rb:
        stops = distribute.blockers(rb)
    assert stops.empty, stops.to_dict("records")  # before: workflows, its key to tenants re-added NOT VALID
    db.execute("DELETE FROM workflows WHERE name = 'orphan'")
    run_plain_postgres_part(db)
    assert constraints(db) == constraints(uninterrupted)
    assert ledger_changes(db) == ledger_changes(uninterrupted)

    def replanned(one):
        with one.session("distribute", dry_run=True) as rb:
            return [re.sub(r" \((moves|copies) [\d,]+ bytes[^)]*\)", "", s.action) for s in distribute.analyse(rb).steps]
    # what is left is what a run never interrupted leaves (the orphan's dead row makes workflows a page larger)
    assert replanned(db) == replanned(uninterrupted)
