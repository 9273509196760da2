"""The batch engine: key spaces (keyset, ctid), assignments (what to SET and which rows are pending),
throttling on the application's health, and checkpointed, resumable, parallel walks of a table.

Imports db and the foundation modules only; its users (the backfill phase, the legacy mapping) import it."""
