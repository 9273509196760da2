"""What the notebooks report is what happened: seed's rows inserted (and the planned rows it did not insert)
against the tables' counts; a dry-run validate's Drizzle hand-over says a real run would stop at the verdict."""

from conftest import LEGACY_ON
from runbook_helpers import params as params_mod
from runbook_helpers.phases import seed


def counts(db) -> dict[str, int]:
    return {t: db.scalar(f"SELECT count(*) FROM {t}") for t in ("tenants", "users", "user_tenants")}


def test_seed_reports_the_rows_it_inserted_and_those_it_planned_but_did_not(migrated_db, ci_params):
    db = migrated_db("inspect", params=params_mod.override(ci_params, LEGACY_ON))
    before = counts(db)
    with db.session("seed") as rb:
        applied = seed.apply(rb).set_index("table")
    after = counts(db)
    inserted = applied.groupby(level=0)[seed.INSERTED].sum()
    assert {t: int(inserted.get(t, 0)) for t in after} == {t: after[t] - before[t] for t in after}
    members = applied.loc["user_tenants"]
    planned = int(members["action"].split(" ")[2].replace(",", ""))  # "up to 2,320 memberships from …"
    # the plan counted the legacy pairs before the users existed; some of those users are not migrated
    assert members[seed.INSERTED] + members[seed.NOT_INSERTED] == planned
    assert members[seed.INSERTED] == after["user_tenants"] - before["user_tenants"]
    assert members[seed.NOT_INSERTED] > 0


def test_a_dry_run_validate_says_the_hand_over_would_not_happen(db):
    out = db.run("inspect", "validate", dry_run=True)["validate"]
    failed, total = out["verdict"].failed, out["verdict"].total
    assert failed > 0 and out["verdict"].startswith(f"dry run: {failed} of {total} checks would fail")
    assert list(out["drizzle"]["tag"]) == ["0001_tenant_columns"]
    assert set(out["drizzle"]["outcome"]) == {
        f"would not be recorded: {failed} of {total} checks would fail now, and a real run stops at the verdict "
        f"(dry run: nothing recorded)"}
