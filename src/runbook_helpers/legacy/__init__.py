"""Real tenants from the legacy data: orgs become tenants, legacy users become users, memberships become
user_tenants, and each core row the tenant of its org; the mapping's checks and ambiguities.

Imports db, backfill (it builds the engine's assignments) and the foundation modules only."""
