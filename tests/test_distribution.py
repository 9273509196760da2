"""Distribution readiness and the composite-key step: online, resumable, and keeping each foreign key's
ON DELETE behaviour."""

from runbook_helpers.distribution import readiness as readiness_mod
from runbook_helpers import params as params_mod


def readiness(db, params=None):
    with db.session("inspect", params=params) as rb:
        return readiness_mod.readiness(rb)


def test_readiness_before_and_after_composite_keys(db):
    before = readiness(db)
    not_ready = set(before[~before["ready"]]["check"])
    assert {"primary key includes tenant_id", "foreign keys between tenant tables include tenant_id",
            "unique keys include tenant_id"} <= not_ready
    assert set(before[before["check"] == "shared tables as reference tables"]["object"]) == {"node_types"}
    db.run("inspect", "seed", "backfill", "constrain")
    after = readiness(db).set_index(["check", "object"])
    # the primary key stays (id): making the composite key the primary key is a later, explicit step
    for table in db.params.tables:
        row = after.loc[("primary key includes tenant_id", table)]
        assert not row["ready"] and "is in place: making it the primary key is a later, explicit step" in row["finding"]
    composite = after.loc[("foreign keys between tenant tables include tenant_id",
                           "rules.rules_tenant_id_workflow_id_workflows_tenant_id_id_fk")]
    assert composite["ready"]
    kept = after.loc[("foreign keys between tenant tables include tenant_id", "rules.rules_workflow_id_fkey")]
    assert not kept["ready"] and "rules_tenant_id_workflow_id_workflows_tenant_id_id_fk enforces it" in kept["finding"]


def keys(conn, table: str) -> dict[str, str]:
    return dict(conn.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                             "%s::regclass AND contype IN ('p', 'u', 'f')", (table,)).fetchall())


def test_composite_keys_are_added_beside_the_keys_the_application_relies_on(db):
    with db.connect() as conn:
        before = {t: keys(conn, t) for t in ("workflows", "rules", "widgets")}
    db.run("inspect", "seed", "backfill", "constrain")
    with db.connect() as conn:
        after = {t: keys(conn, t) for t in ("workflows", "rules", "widgets")}
    for table, kept in before.items():
        assert kept.items() <= after[table].items(), table  # nothing removed, nothing redefined
    assert after["workflows"]["workflows_tenant_id_id_unique"] == "UNIQUE (tenant_id, id)"
    assert after["widgets"]["widgets_tenant_id_template_id_position_unique"] == \
        'UNIQUE (tenant_id, template_id, "position")'
    assert after["rules"]["rules_tenant_id_workflow_id_workflows_tenant_id_id_fk"] == (
        "FOREIGN KEY (tenant_id, workflow_id) REFERENCES workflows(tenant_id, id) ON UPDATE CASCADE ON DELETE CASCADE")
    workflow = db.scalar("SELECT workflow_id FROM rules LIMIT 1")
    db.execute("DELETE FROM endpoints WHERE workflow_id = %s", (workflow,))
    db.execute("DELETE FROM workflows WHERE id = %s", (workflow,))
    assert db.scalar("SELECT count(*) FROM rules WHERE workflow_id = %s", (workflow,)) == 0  # still cascades
    # a parent that moves to another tenant takes its children along (ON UPDATE CASCADE)
    other = db.scalar("INSERT INTO tenants (uuid, name) VALUES (gen_random_uuid(), 'other') RETURNING id")
    parent = db.scalar("SELECT workflow_id FROM rules r WHERE NOT EXISTS (SELECT 1 FROM endpoints e WHERE "
                       "e.workflow_id = r.workflow_id) LIMIT 1")
    db.execute_unrecorded("UPDATE workflows SET tenant_id = %s WHERE id = %s", (other, parent))
    assert db.scalar("SELECT count(*) FROM rules WHERE workflow_id = %s AND tenant_id <> %s", (parent, other)) == 0


def test_composite_keys_resume_from_an_interrupted_run(db):
    db.run("inspect", "seed", "backfill")
    off = params_mod.override(db.params, {"distribution": {"composite_keys": False}, "rls": {"enabled": False}})
    db.run("constrain", params=off)
    # interrupted: one unique index left INVALID, one built but not attached, one composite FK added NOT VALID
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY models_tenant_id_id_unique ON models (tenant_id, id)")
        conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'models_tenant_id_id_unique'::regclass")
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY templates_tenant_id_id_unique ON templates (tenant_id, id)")
        conn.execute("ALTER TABLE templates ADD CONSTRAINT templates_tenant_id_id_unique UNIQUE USING INDEX "
                     "templates_tenant_id_id_unique")
        conn.execute("ALTER TABLE widgets ADD CONSTRAINT widgets_tenant_id_template_id_templates_tenant_id_id_fk "
                     "FOREIGN KEY (tenant_id, template_id) REFERENCES templates (tenant_id, id) ON UPDATE CASCADE "
                     "ON DELETE CASCADE NOT VALID")
    applied = db.run("constrain")["constrain"]["applied"]
    actions = list(applied["action"])
    assert "drop INVALID index models_tenant_id_id_unique left by an interrupted build" in actions
    assert not any(a.startswith("build the unique index") and "templates" in a for a in
                   applied[applied["table"] == "templates"]["action"])
    assert "add widgets_tenant_id_template_id_templates_tenant_id_id_fk NOT VALID" not in actions
    assert "validate widgets_tenant_id_template_id_templates_tenant_id_id_fk" in actions
    after = readiness(db)
    fks = after[after["check"] == "foreign keys between tenant tables include tenant_id"]
    assert fks[fks["object"].str.contains("_tenant_id_")]["ready"].all()
    assert db.scalar("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n "
                     "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND NOT i.indisvalid") == 0


def test_a_primary_key_referenced_from_outside_the_spec_works_and_is_said_so(db):
    """A table the spec leaves out references workflows(id): the key stays (it always does), the composite
    keys reference the (tenant_id, id) unique key, and readiness names what else relies on id."""
    db.execute("CREATE TABLE workflow_runs (id bigserial PRIMARY KEY, workflow_id bigint REFERENCES workflows (id))")
    db.execute("INSERT INTO workflow_runs (workflow_id) SELECT id FROM workflows ORDER BY id LIMIT 50")
    out = db.run("inspect", "seed", "backfill", "constrain", "validate")
    assert out["validate"]["checks"]["passed"].all()
    with db.connect() as conn:
        assert conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                            "'workflows'::regclass AND contype = 'p'").fetchone()[0] == "PRIMARY KEY (id)"
        assert conn.execute("SELECT count(*) FROM workflow_runs").fetchone()[0] == 50
    row = readiness(db).set_index(["check", "object"]).loc[("primary key includes tenant_id", "workflows")]
    assert not row["ready"]
    assert "referenced from outside the spec by workflow_runs.workflow_runs_workflow_id_fkey" in row["finding"]
