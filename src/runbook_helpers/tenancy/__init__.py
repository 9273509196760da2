"""The isolation guarantees: row level security and the application roles, the tenancy lint, the
isolation suite, distribution readiness and composite keys.

Imports db and the foundation modules only."""
