"""The isolation suite on a distributed database whose application role cannot log in (issue 26): Citus opens its
worker connections as the current user, so every case would fail on the workers; the suite names the role and
what to do instead, and writes nothing (no probe tenant)."""

from citus_fixtures import MIGRATED, citus, citus_db, citus_params  # noqa: F401 (fixtures)

from runbook_helpers import params as params_mod
from runbook_helpers.phases import validate


def test_a_nologin_application_role_on_distributed_tables_is_named_not_probed(citus_db, citus_params):
    role = "citus_app_nologin"  # this test's own role: roles are the server's, the other tests' app_user stays LOGIN
    db = citus_db(MIGRATED, params=params_mod.override(citus_params, {"rls": {"app_role": role}}))
    db.execute(f'ALTER ROLE "{role}" LOGIN')  # what 07's preflight asks for
    db.run("distribute")
    db.execute(f'ALTER ROLE "{role}" NOLOGIN')  # taken back afterwards
    tenants = db.scalar("SELECT count(*) FROM tenants")
    with db.session("validate") as rb:
        results = validate.isolation_suite(rb)
    assert len(results) == 1, results.to_dict("records")
    row = results.iloc[0]
    assert (row["case"], row["table"], bool(row["passed"])) == ("application role can reach the Citus workers",
                                                              role, False)
    assert row["actual"].startswith(f"cannot run: {role} is NOLOGIN, and Citus opens its connections to the workers")
    assert db.scalar("SELECT count(*) FROM tenants") == tenants
