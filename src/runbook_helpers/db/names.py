"""Names of the objects the runbook creates, shared with the application's Drizzle migrations.

Drizzle names a foreign key `<table>_<column>_<ref table>_<ref column>_fk` and the runbook uses the same
names, so the schema it leaves is the one 0001 would have produced. PostgreSQL truncates identifiers to
63 bytes; so do we, on a character boundary, so a name computed here matches the catalog.
"""

MAX_IDENTIFIER_BYTES = 63
TENANT_COLUMN = "tenant_id"


def truncate(name: str) -> str:
    encoded = name.encode("utf-8")
    if len(encoded) <= MAX_IDENTIFIER_BYTES:
        return name
    return encoded[:MAX_IDENTIFIER_BYTES].decode("utf-8", errors="ignore")


def fk_name(table: str) -> str:
    return truncate(f"{table}_{TENANT_COLUMN}_tenants_id_fk")


def index_name(table: str) -> str:
    return truncate(f"{table}_{TENANT_COLUMN}_idx")


def not_null_check_name(table: str) -> str:
    # not `<table>_tenant_id_not_null`: PostgreSQL 18 gives that name to the NOT NULL constraint itself
    return truncate(f"{table}_{TENANT_COLUMN}_nn_check")

# In a plan made before seed inserted the System Tenant, its id (the formats show it as a parameter)
SYSTEM_TENANT_ID_UNKNOWN = "<System Tenant id>"
