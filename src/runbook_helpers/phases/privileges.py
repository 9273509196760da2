"""The privileges this run's plan needs, from params and the catalog, checked before anything changes.

01_inspect shows one preflight row per missing privilege; seed, backfill and constrain check again before
their first change (a role's grants can change between phases). db/privileges.py reads the catalog.
"""

from __future__ import annotations

from sqlalchemy import text

from ..db import catalog, privileges
from ..errors import RunbookError
from ..legacy import mapping

DRIZZLE_TABLE = "__drizzle_migrations"


def needs(rb, conn) -> privileges.Needs:
    from . import seed  # seed checks privileges too

    p = rb.params
    read = list(p.shared_tables)
    triggers_on: list[str] = []
    if mapping.enabled(p):
        src = mapping.source(p)
        triggers_on = [src.tenants.table, src.users.table] + [m.table for m in src.memberships]
        read += triggers_on
    act_as = []
    if p.rls.enabled:
        act_as.append(p.rls.app_role)
        # the isolation suite's negative control runs as each core table's owner (SET ROLE)
        owners = conn.execute(text(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :s AND c.relname = ANY(:t) AND c.relkind IN ('r', 'p') ORDER BY 1"),
            {"s": rb.schema, "t": p.tables}).scalars().all()
        act_as += [o for o in owners if o != rb.identity.user and o not in act_as]
    return privileges.Needs(
        schema=rb.schema, ledger_schema=p.ledger_schema, alter=p.tables, alter_views=p.rls.enabled,
        read=sorted(set(read)), triggers_on=sorted(set(triggers_on)), grant_read=list(p.shared_tables) if p.rls.enabled else [],
        tenancy_tables=[t for t in seed.CONVENTIONS if catalog.relation_oid(conn, rb.schema, t) is not None],
        act_as=act_as, create_roles=[p.rls.legacy_role] if p.rls.enabled and p.rls.legacy_role else [],
        bypass_rls=p.rls.enabled,
        drizzle_table=(p.drizzle.schema_, DRIZZLE_TABLE) if p.drizzle.record_after_validate else None)


def missing(rb) -> list[privileges.Missing]:
    with rb.engine.connect() as conn:
        return privileges.missing(conn, needs(rb, conn))


def require(rb) -> None:
    """Raise, with nothing changed, while the migration role lacks a privilege the plan needs."""
    lacking = missing(rb)
    if lacking:
        raise RunbookError(f"the migration role {rb.identity.user} lacks privileges this run needs (run as a "
                           f"superuser; see the README's \"A minimal migration role\"):\n"
                           + "\n".join(f"  - {m.privilege} ({m.detail}): {m.grant}" for m in lacking)
                           + "\nNothing was changed.")
