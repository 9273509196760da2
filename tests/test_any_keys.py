"""Tenant sources with text and uuid keys (issue 27): schemas of our own making in the shapes ORMs give them
(tests/schemas/saas_text.sql: Prisma-like cuid text keys, quoted camelCase names, enums, jsonb, a chain five levels
deep; tests/schemas/saas_uuid.sql: uuid keys from gen_random_uuid(), a membership table keyed by both ids), migrated
end to end with the legacy mapping, RLS and composite keys on, an organization signed up by the legacy application
during the rollout window, validated clean and rolled back exactly.

Expected tenants are worked out by walking each schema's chain from its organization, not with the runbook's
expressions; a tenant's uuid is Python's uuid3 of the namespace and '<table>:<key>' (or of the source's uuid)."""

import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import Db, create_database, drop_database
from runbook_helpers.phases import rollback
from runbook_helpers.phases.headless import run_phase
from test_second_schema import spec_params

SCHEMAS = Path(__file__).parent / "schemas"


# per schema: the tenant source (table, key column, how a tenant's uuid is named), and per core table the SQL
# that gives each of its rows' key and the key of the organization it belongs to, walked by hand
SCHEMA_ORGS = {
    "saas_text": {
        "source": ("Organization", "id", "Organization:{}"),
        "rows": {
            "Organization": 'SELECT x.id, x.id FROM "Organization" x',
            "Membership": 'SELECT x.id, x."organizationId" FROM "Membership" x',
            "Project": 'SELECT x.id, x."organizationId" FROM "Project" x',
            "Environment": 'SELECT x.id, p."organizationId" FROM "Environment" x JOIN "Project" p ON p.id = x."projectId"',
            "Flag": 'SELECT x.id, p."organizationId" FROM "Flag" x JOIN "Environment" e ON e.id = x."environmentId" '
                    'JOIN "Project" p ON p.id = e."projectId"',
            "FlagRule": 'SELECT x.id, p."organizationId" FROM "FlagRule" x JOIN "Flag" f ON f.id = x."flagId" '
                        'JOIN "Environment" e ON e.id = f."environmentId" JOIN "Project" p ON p.id = e."projectId"',
            "Deployment": 'SELECT x.id, p."organizationId" FROM "Deployment" x JOIN "Environment" e ON '
                          'e.id = x."environmentId" JOIN "Project" p ON p.id = e."projectId"',
        },
        "memberships": 'SELECT count(*) FROM "Membership"',
        # an organization signed up by the legacy application during the window: its first user, their ADMIN
        # membership and a row on each level under it, in one transaction (no tenant_id anywhere)
        "legacy_role": "saas_legacy",
        "signup": [
            'INSERT INTO "Organization" (id, name, slug, "updatedAt") VALUES (%(org)s, \'New\', %(org)s, now())',
            'INSERT INTO "User" (id, email, "updatedAt") VALUES (%(user)s, %(user)s || \'@example.com\', now())',
            'INSERT INTO "Membership" (id, "userId", "organizationId", role) VALUES (%(m)s, %(user)s, %(org)s, \'ADMIN\')',
            'INSERT INTO "Project" (id, "organizationId", name, "updatedAt") VALUES (%(p)s, %(org)s, \'P\', now())',
            'INSERT INTO "Environment" (id, "projectId", name) VALUES (%(e)s, %(p)s, \'production\')',
            'INSERT INTO "Flag" (id, "environmentId", key, value, "updatedAt") VALUES (%(f)s, %(e)s, \'k\', \'true\', now())',
            'INSERT INTO "FlagRule" (id, "flagId", position, condition) VALUES (%(r)s, %(f)s, 0, \'{}\')'],
        "signed_up": {"Organization": "org", "Membership": "m", "Project": "p", "Environment": "e", "Flag": "f",
                      "FlagRule": "r"},
    },
    "saas_uuid": {
        "source": ("accounts", "id", "{}"),
        "rows": {
            "accounts": "SELECT x.id, x.id FROM accounts x",
            "account_people": "SELECT x.account_id::text || ',' || x.person_id::text, x.account_id FROM account_people x",
            "boards": "SELECT x.id, x.account_id FROM boards x",
            "cards": "SELECT x.id, b.account_id FROM cards x JOIN boards b ON b.id = x.board_id",
            "comments": "SELECT x.id, b.account_id FROM comments x JOIN cards c ON c.id = x.card_id "
                        "JOIN boards b ON b.id = c.board_id",
        },
        "memberships": "SELECT count(*) FROM account_people",
        "legacy_role": "board_legacy",
        "signup": [
            "INSERT INTO accounts (id, name) VALUES (%(org)s::uuid, 'New')",
            "INSERT INTO people (id, email, full_name) VALUES (%(user)s::uuid, %(user)s || '@example.org', 'New')",
            "INSERT INTO account_people (account_id, person_id, role) VALUES (%(org)s::uuid, %(user)s::uuid, 'admin')",
            "INSERT INTO boards (id, account_id, title) VALUES (%(p)s::uuid, %(org)s::uuid, 'B')",
            "INSERT INTO cards (id, board_id, title, position) VALUES (%(e)s::uuid, %(p)s::uuid, 'C', 1)",
            "INSERT INTO comments (id, card_id, author_id, body) VALUES (%(f)s::uuid, %(e)s::uuid, %(user)s::uuid, 'x')"],
        "signed_up": {"accounts": "org", "boards": "p", "cards": "e", "comments": "f"},
    },
}


@pytest.fixture(params=list(SCHEMA_ORGS))
def saas(request, server, tmp_path):
    name = request.param
    database = f"t_{name}_{uuid.uuid4().hex[:10]}"
    create_database(server, database, None)
    db = Db(server, database, spec_params(tmp_path, name))
    db.execute((SCHEMAS / f"{name}.sql").read_text())
    db.spec = name
    yield db
    drop_database(server, database)


def rows(db, query, args=None):
    with db.connect() as conn:
        return conn.execute(query, args).fetchall()


def counts(db) -> dict[str, int]:
    return {t: rows(db, f'SELECT count(*) FROM "{t}"')[0][0] for t in db.params.tables + db.params.shared_tables}


def tenant_of_org(db) -> dict[object, int]:
    """Each organization's tenant id, found by the uuid the tenant must have (uuid3, computed here)."""
    table, key, name = SCHEMA_ORGS[db.spec]["source"]
    namespace = db.params.legacy.tenant_uuid_namespace
    out = {}
    for (org,) in rows(db, f'SELECT "{key}" FROM "{table}"'):
        tenant_uuid = uuid.uuid3(namespace, name.format(org))
        found = rows(db, "SELECT id FROM tenants WHERE uuid = %s", (tenant_uuid,))
        assert found, f"no tenant with uuid3 of {name.format(org)!r}"
        out[org] = found[0][0]
    return out


def sign_up(db) -> dict[str, str]:
    """The schema's signup as its legacy application does it (its role, one transaction); the keys it used."""
    spec = SCHEMA_ORGS[db.spec]
    keys = {k: ("c" + uuid.uuid4().hex[:24]) if db.spec == "saas_text" else str(uuid.uuid4())
            for k in ("org", "user", "m", "p", "e", "f", "r")}
    with psycopg.connect(db.url.replace("postgresql://postgres@", f"postgresql://{spec['legacy_role']}@")) as conn:
        for statement in spec["signup"]:
            conn.execute(statement, keys)
    return keys


def test_a_tenant_source_with_text_or_uuid_keys_migrates_validates_and_rolls_back_exactly(saas):
    db = saas
    before_schema = db.schema_dump()
    db.run("inspect", "seed", "backfill")
    # an organization signed up while the rollout window is open gets its tenant at once (issue 27, item 2): every
    # row written under it lands there, and its user gets a membership with the mapped role
    keys = sign_up(db)
    tenant = db.scalar("SELECT tenant_id FROM tenancy_runbook.org_tenants WHERE org_id = %s", (keys["org"],))
    source, _, name = SCHEMA_ORGS[db.spec]["source"]
    assert db.scalar("SELECT uuid FROM tenants WHERE id = %s", (tenant,)) == uuid.uuid3(
        db.params.legacy.tenant_uuid_namespace, name.format(keys["org"]))  # the uuid seed would give it
    for table, key in SCHEMA_ORGS[db.spec]["signed_up"].items():
        pk = "id" if table != "account_people" else "account_id"
        assert db.scalar(f'SELECT tenant_id FROM "{table}" WHERE {pk} = %s', (keys[key],)) == tenant, table
    assert db.scalar("SELECT ut.role FROM user_tenants ut JOIN tenancy_runbook.user_map m ON m.user_id = ut.user_id "
                     "WHERE m.legacy_user_id = %s AND ut.tenant_id = %s", (keys["user"], tenant)) == "admin"
    before_rows = counts(db)
    results = db.run("constrain", "validate")

    checks = results["validate"]["checks"]
    assert checks["passed"].all(), checks[~checks["passed"]].to_dict("records")
    mapped = checks[checks["check"] == "rows carry the tenant of their org (recomputed from legacy data)"]
    assert set(mapped["table"]) >= set(SCHEMA_ORGS[db.spec]["rows"]), sorted(mapped["table"])
    isolation = results["validate"]["isolation"]
    assert isolation["passed"].all(), isolation[~isolation["passed"]].to_dict("records")
    assert counts(db) == before_rows

    # the ledger's maps key on the source's own types
    types = dict(rows(db, "SELECT attrelid::regclass::text, format_type(atttypid, NULL) FROM pg_attribute "
                          "WHERE attrelid IN ('tenancy_runbook.org_tenants'::regclass, 'tenancy_runbook.user_map'::regclass) "
                          "AND attnum = 1"))
    want = "text" if db.spec == "saas_text" else "uuid"
    assert types == {"tenancy_runbook.org_tenants": want, "tenancy_runbook.user_map": want}

    # every row carries the tenant of the organization its chain leads to
    tenants = tenant_of_org(db)
    assert len(set(tenants.values())) == len(tenants) >= 4
    for table, query in SCHEMA_ORGS[db.spec]["rows"].items():
        expected = {str(k): tenants[org] for k, org in rows(db, query)}
        key = query.split(" FROM ")[0].removeprefix("SELECT ").rsplit(", ", 1)[0]
        actual = {str(k): t for k, t in rows(db, f'SELECT {key}, x.tenant_id FROM "{table}" x')}
        assert expected and actual == expected, table
    # each membership became one user_tenants row
    assert rows(db, "SELECT count(*) FROM user_tenants") == rows(db, SCHEMA_ORGS[db.spec]["memberships"])

    run_phase(db.session("finalize"), force=True)
    assert run_phase(db.session("rollback"))["verdict"] == rollback.ROLLED_BACK + rollback.RETIRED
    assert db.schema_dump(exclude_ledger=True) == before_schema
    assert counts(db) == before_rows  # the signed-up organization's rows included: they are the application's
