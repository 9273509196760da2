"""The isolation guarantees: row level security and the application roles, the rollout triggers, the tenancy
lint, the isolation suite and composite keys.

Imports db and the foundation modules only."""
