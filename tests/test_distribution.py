"""Distribution readiness and the composite-key step: online, resumable, and keeping each foreign key's
ON DELETE behaviour."""

from runbook_helpers.tenancy import distribution
from runbook_helpers import params as params_mod


def readiness(db, params=None):
    with db.session("inspect", params=params) as rb:
        return distribution.readiness(rb)


def test_readiness_before_and_after_composite_keys(db):
    before = readiness(db)
    not_ready = set(before[~before["ready"]]["check"])
    assert {"primary key includes tenant_id", "foreign keys between tenant tables include tenant_id",
            "unique keys include tenant_id"} <= not_ready
    assert set(before[before["check"] == "shared tables as reference tables"]["object"]) == {"node_types"}
    db.run("inspect", "seed", "backfill", "constrain")
    after = readiness(db)
    ready = after.set_index(["check", "object"])["ready"]
    for table in db.params.tables:
        assert ready[("primary key includes tenant_id", table)], table
    fks = after[after["check"] == "foreign keys between tenant tables include tenant_id"]
    assert len(fks) >= 4 and fks["ready"].all()


def test_composite_keys_keep_the_foreign_keys_behaviour(db):
    db.run("inspect", "seed", "backfill", "constrain")
    with db.connect() as conn:
        pk = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'widgets'::regclass "
                          "AND contype = 'p'").fetchone()[0]
        assert pk == "PRIMARY KEY (tenant_id, template_id, \"position\")"
        fk = conn.execute("SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
                          "WHERE conrelid = 'rules'::regclass AND contype = 'f' AND confrelid = 'workflows'::regclass"
                          ).fetchall()
        assert fk == [("rules_tenant_id_workflow_id_workflows_fk",
                       "FOREIGN KEY (tenant_id, workflow_id) REFERENCES workflows(tenant_id, id) ON DELETE CASCADE",
                       True)]
    workflow = db.scalar("SELECT workflow_id FROM rules LIMIT 1")
    db.execute("DELETE FROM endpoints WHERE workflow_id = %s", (workflow,))
    db.execute("DELETE FROM workflows WHERE id = %s", (workflow,))
    assert db.scalar("SELECT count(*) FROM rules WHERE workflow_id = %s", (workflow,)) == 0  # still cascades


def test_composite_keys_resume_from_an_interrupted_run(db):
    db.run("inspect", "seed", "backfill")
    off = params_mod.override(db.params, {"distribution": {"composite_keys": False}, "rls": {"enabled": False}})
    db.run("constrain", params=off)
    # interrupted: one composite index left INVALID, one composite FK added NOT VALID, its old FK still there
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY models_tenant_id_pkey_idx ON models (tenant_id, id)")
        conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'models_tenant_id_pkey_idx'::regclass")
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY templates_tenant_id_pkey_idx ON templates (tenant_id, id)")
        conn.execute("ALTER TABLE widgets ADD CONSTRAINT widgets_tenant_id_template_id_templates_fk FOREIGN KEY "
                     "(tenant_id, template_id) REFERENCES templates (tenant_id, id) ON DELETE CASCADE NOT VALID")
    applied = db.run("constrain")["constrain"]["applied"]
    actions = list(applied["action"])
    assert "drop INVALID index models_tenant_id_pkey_idx left by an interrupted build" in actions
    assert "add widgets_tenant_id_template_id_templates_fk NOT VALID" not in actions
    assert "validate widgets_tenant_id_template_id_templates_fk" in actions
    after = readiness(db)
    assert after[after["check"].isin(["primary key includes tenant_id",
                                      "foreign keys between tenant tables include tenant_id"])]["ready"].all()
    assert db.scalar("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n "
                     "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND NOT i.indisvalid") == 0


def test_a_primary_key_referenced_from_outside_the_spec_is_kept_and_said_so(db):
    """A table the spec leaves out references workflows(id): swapping the primary key would mean dropping
    that foreign key, so the key stays (id), the composite keys reference the (tenant_id, id) unique index,
    and readiness names what holds it. Constrain and validate still pass."""
    db.execute("CREATE TABLE workflow_runs (id bigserial PRIMARY KEY, workflow_id bigint REFERENCES workflows (id))")
    db.execute("INSERT INTO workflow_runs (workflow_id) SELECT id FROM workflows ORDER BY id LIMIT 50")
    out = db.run("inspect", "seed", "backfill", "constrain", "validate")
    assert out["validate"]["checks"]["passed"].all()
    with db.connect() as conn:
        assert conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                            "'workflows'::regclass AND contype = 'p'").fetchone()[0] == "PRIMARY KEY (id)"
        assert conn.execute("SELECT pg_get_constraintdef(oid), convalidated FROM pg_constraint WHERE conname = "
                            "'rules_tenant_id_workflow_id_workflows_fk'").fetchone() == (
            "FOREIGN KEY (tenant_id, workflow_id) REFERENCES workflows(tenant_id, id) ON DELETE CASCADE", True)
        assert conn.execute("SELECT count(*) FROM workflow_runs").fetchone()[0] == 50
    row = readiness(db).set_index(["check", "object"]).loc[("primary key includes tenant_id", "workflows")]
    assert not row["ready"]
    assert "referenced from outside the spec by workflow_runs.workflow_runs_workflow_id_fkey" in row["finding"]
    # the other tables' keys did become composite
    assert readiness(db).set_index(["check", "object"])["ready"][("primary key includes tenant_id", "models")]
