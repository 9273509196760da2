"""Scaling out with Citus: distribution readiness, the key swaps, reference and distributed tables.

Imports db and tenancy (composite keys, RLS, the rollout triggers), never the reverse."""
