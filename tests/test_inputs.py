"""Bad input gets one clear message and changes nothing; names that need quoting simply work."""

from conftest import create_role, runbook_cli, staging_dsn
from runbook_helpers import params as params_mod


def test_a_role_without_privileges_is_refused_by_preflight_and_nothing_changes(db, home):
    create_role(db.server, "weak_migrator", "LOGIN")
    before = db.schema_dump()
    result = runbook_cli("run", "--env", "staging", "--phases", "inspect",
                         env={"RUNBOOK_STAGING_DSN": staging_dsn(db, "weak_migrator"), "RUNBOOK_HOME": str(home)})
    assert result.returncode == 1
    assert "preflight failed" in result.stdout
    assert "weak_migrator cannot alter" in result.stdout
    assert db.schema_dump() == before


def test_a_pinned_identity_refuses_another_database(db, home):
    text = (home / "params" / "staging.yaml").read_text()
    (home / "params" / "staging.yaml").write_text(text.replace(
        "  dsn_env: RUNBOOK_STAGING_DSN", "  dsn_env: RUNBOOK_STAGING_DSN\n  expect:\n    name: app_staging"))
    before = db.schema_dump()
    result = runbook_cli("run", "--env", "staging", env={"RUNBOOK_STAGING_DSN": staging_dsn(db),
                                                         "RUNBOOK_HOME": str(home)})
    assert result.returncode == 2
    assert (f"refusing to touch this database: env staging pins its identity, but $RUNBOOK_STAGING_DSN leads to "
            f"database name '{db.name}' (expected 'app_staging')") in result.stderr
    assert db.schema_dump() == before
    assert not (home / "runs").exists()


def test_a_pinned_identity_accepts_the_right_database(db, home):
    sysid = db.scalar("SELECT system_identifier::text FROM pg_control_system()")
    text = (home / "params" / "staging.yaml").read_text()
    (home / "params" / "staging.yaml").write_text(text.replace(
        "  dsn_env: RUNBOOK_STAGING_DSN",
        f"  dsn_env: RUNBOOK_STAGING_DSN\n  expect:\n    name: {db.name}\n    system_identifier: '{sysid}'"))
    result = runbook_cli("run", "--env", "staging", "--phases", "inspect", "--dry-run",
                         env={"RUNBOOK_STAGING_DSN": staging_dsn(db), "RUNBOOK_HOME": str(home)})
    assert result.returncode == 0, result.stdout + result.stderr


QUOTED = """
CREATE TABLE "Order Items" ("Line No" bigserial PRIMARY KEY, "Größe" text NOT NULL, "Kunden-ID" uuid NOT NULL UNIQUE);
INSERT INTO "Order Items" ("Größe", "Kunden-ID") SELECT 'G' || i, gen_random_uuid() FROM generate_series(1, 500) i;
CREATE TABLE "Ünïcode Tabelle" ("Id" bigserial PRIMARY KEY, "Order Line" bigint NOT NULL REFERENCES "Order Items",
                                "Tenant Note" text, tenant_id bigint);
INSERT INTO "Ünïcode Tabelle" ("Order Line", "Tenant Note") SELECT 1 + (i % 500), 'n' || i FROM generate_series(1, 900) i;
"""


def test_names_that_need_quoting_work_through_every_phase(db):
    db.execute(QUOTED)
    params = params_mod.override(db.params, {"core_tables": {"Order Items": {}, "Ünïcode Tabelle": {}},
                                             "backfill": {"batch_size": 200, "target_batch_ms": None}})
    out = db.run("inspect", "seed", "backfill", "constrain", "validate", params=params)
    assert out["validate"]["checks"]["passed"].all()
    assert out["validate"]["isolation"]["passed"].all()
    strategies = out["backfill"]["report"].summary.set_index("table")["strategy"]
    assert strategies["Order Items"] == "fast default" and strategies["Ünïcode Tabelle"] == "batched"
    with db.connect() as conn:
        assert conn.execute('SELECT count(*) FROM "Ünïcode Tabelle" WHERE tenant_id IS NULL').fetchone()[0] == 0
        fks = {r[0] for r in conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                                          "'\"Ünïcode Tabelle\"'::regclass AND contype = 'f' AND "
                                          "confrelid = '\"Order Items\"'::regclass")}
        assert fks == {'FOREIGN KEY ("Order Line") REFERENCES "Order Items"("Line No")',
                       'FOREIGN KEY (tenant_id, "Order Line") REFERENCES "Order Items"(tenant_id, "Line No") '
                       'ON UPDATE CASCADE'}
