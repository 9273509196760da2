"""The Drizzle hand-over, proven by drizzle-kit and drizzle-orm themselves (the pinned versions of
demo/app), in each configuration: after the hand-over, drizzle-kit push wants no change, generate writes
nothing, migrate runs only what comes later, and drizzle-orm works as the application and the legacy role."""

import pytest

from conftest import LEGACY_ON
from drizzle_tools import App, hand_over_cycle
from runbook_helpers import params as params_mod

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("config", ["system tenant only", "legacy mapping"])
def test_the_hand_over_leaves_drizzle_kit_nothing_to_change(db, tmp_path, config):
    out = hand_over_cycle(db, tmp_path / "app", config)
    assert out["end state migration"] == []  # 0001 declares all of it: tenantId, its reference, its index
    assert out["recorded"].empty
    assert out["generate again"] == []
    assert out["after"] == [], out["after"]
    assert out["migrate ran"] == 0
    assert len(out["later migration"]) == 1 and out["later migrate ran"] == 1 and out["archived_at exists"]
    assert out["later sql"] == ['ALTER TABLE "workflows" ADD COLUMN "archived_at" timestamp with time zone;']
    legacy = out["as legacy role"]
    assert legacy["seen"] == out["rows before the legacy role"] == out["total rows"]
    assert legacy["inserted"]["tenantId"] == out["tenant"] and legacy["outside"] == out["total rows"] + 1


def test_before_the_runbook_0001_fails_and_changes_nothing(db, tmp_path):
    import psycopg

    app = App(tmp_path / "app", db.url)
    result = app.migrate()
    assert result.returncode == 1  # drizzle-kit says nothing more (upstream drizzle-orm #5521)
    assert db.scalar("SELECT count(*) FROM drizzle.__drizzle_migrations") == 1
    assert db.scalar("SELECT count(*) FROM pg_attribute WHERE attname = 'tenant_id' AND attrelid = "
                     "'workflows'::regclass") == 0
    statement = (app.folder / "drizzle" / "0001_tenant_columns.sql").read_text().split("--> statement-breakpoint")[0]
    with db.connect() as conn, pytest.raises(psycopg.errors.NotNullViolation, match="contains null values"):
        conn.execute(statement)  # why: the first statement of 0001, on a table with rows
    with db.session("inspect", params=params_mod.override(db.params, LEGACY_ON)) as rb:
        from runbook_helpers.phases import inspect
        status = inspect.drizzle_status(rb).set_index("tag")
    assert status.loc["0001_tenant_columns", "state"] == "pending"
    assert status.loc["0001_tenant_columns", "next migrate"] == "runs"


def test_the_demo_database_is_0000s_state(db, tmp_path):
    """runbook demo-db builds what 0000 declares: drizzle-kit push with 0000's schema (schema.ts without the
    tenant columns) wants nothing but to drop the tenant_id the earlier attempt added by hand to
    knowledge_bases, which no migration declares (and the phantom re-creations of drizzle-kit's own bug)."""
    from drizzle_tools import key_definitions, phantoms

    app = App(tmp_path / "app", db.url)
    lines = app.schema.read_text().splitlines(keepends=True)
    app.schema.write_text("".join(l for l in lines if 'bigint("tenant_id", { mode: "number" }).notNull().references'
                                  not in l and '_tenant_id_idx").on(t.tenantId)' not in l))
    wanted = app.push()
    assert [s for s in wanted if s not in phantoms(wanted, key_definitions(db))] == [
        'ALTER TABLE "knowledge_bases" DROP COLUMN "tenant_id";']
