"""The Drizzle hand-over with composite keys, and with row level security on too, proven by drizzle-kit and
drizzle-orm (see tests/test_drizzle_kit.py): the composite keys, the policies, .enableRLS() and the view's
options are declared, generated into one migration and recorded, and nothing is left for push."""

import pytest

from drizzle_tools import hand_over_cycle

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("config", ["composite keys on", "rls on"])
def test_the_hand_over_leaves_drizzle_kit_nothing_to_change(db, tmp_path, config):
    out = hand_over_cycle(db, tmp_path / "app", config)
    # what drizzle-kit wanted before the hand-over: to undo the composite keys (and row level security)
    rls = config == "rls on"
    assert any(s.endswith('DISABLE ROW LEVEL SECURITY;') for s in out["before"]) == rls
    assert any(s.startswith("DROP POLICY") for s in out["before"]) == rls
    assert ('ALTER VIEW "public"."active_workflows" RESET (security_invoker);' in out["before"]) == rls
    assert any(s.endswith('DROP CONSTRAINT "workflows_tenant_id_id_unique";') for s in out["before"])
    assert out["end state migration"] == ["0002_tenancy_end_state"]
    assert list(out["recorded"]["outcome"]) == ["recorded"]
    assert out["generate again"] == []
    assert out["after"] == [], out["after"]
    assert out["migrate ran"] == 0
    assert out["later migration"] == ["0003_archived_at"] and out["later migrate ran"] == 1 and out["archived_at exists"]
    if rls:
        app = out["as application role"]
        assert app["seen"] == out["tenant rows"] and app["tenants"] == [out["tenant"]]
        assert app["inserted"]["tenantId"] == out["tenant"] and app["outside"] == 0  # no tenant set: no rows
        assert db.scalar("SELECT tenant_id FROM workflows WHERE id = %s", (app["inserted"]["id"],)) == out["tenant"]
        assert out["rows before the legacy role"] == out["total rows"] + 1
    legacy = out["as legacy role"]
    assert legacy["seen"] == out["rows before the legacy role"]  # every tenant's, the application role's new row too
    assert legacy["inserted"]["tenantId"] == out["tenant"]
