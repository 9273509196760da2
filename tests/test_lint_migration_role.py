"""The lint knows the migration role (issue 16, item 4): the current_user of the runbook's sessions is the
runbook's own and not a finding; any other superuser or BYPASSRLS role reaching tenant tables still is."""

from conftest import create_role, staging_dsn
from runbook_helpers import params as params_mod
from runbook_helpers.run.session import PhaseSession
from runbook_helpers.tenancy import lint

RULE = "no role bypasses RLS on tenant tables"


def bypass_findings(params, db) -> dict[str, str]:
    with PhaseSession("validate", params=params, database_name=db.name, dry_run=True, log=lambda *_: None) as rb:
        frame = lint.run(rb)
    rows = frame[frame["rule"] == RULE]
    return dict(zip(rows["object"], rows["status"]))


def test_the_migration_role_is_the_runbooks_own_another_superuser_is_a_finding(migrated_db, monkeypatch):
    db = migrated_db("inspect", "seed", "backfill", "constrain")
    assert bypass_findings(db.params, db)["postgres"] == lint.PASS  # connected as postgres: the runbook's own
    # a BYPASSRLS migration role with rights in this database only (roles are cluster-wide: a superuser would be
    # a finding in every other test's database on the server)
    create_role(db.server, "lint_migrator", "NOSUPERUSER BYPASSRLS LOGIN")
    ledger = db.params.ledger_schema
    db.execute(f"GRANT USAGE ON SCHEMA public, {ledger} TO lint_migrator; GRANT SELECT ON ALL TABLES IN SCHEMA "
               f"public, {ledger} TO lint_migrator")
    try:
        monkeypatch.setenv("LINT_MIGRATOR_DSN", staging_dsn(db, user="lint_migrator"))
        as_migrator = params_mod.override(db.params, {"database": {"embedded": False,
                                                                   "dsn_env": "LINT_MIGRATOR_DSN"}})
        found = bypass_findings(as_migrator, db)
        assert found["lint_migrator"] == lint.PASS
        assert found["postgres"] == lint.FAIL  # a superuser that is not the migration role
    finally:
        db.execute("DROP OWNED BY lint_migrator")
        db.execute("DROP ROLE lint_migrator")
