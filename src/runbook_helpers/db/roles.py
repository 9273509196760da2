"""Cluster-wide role changes (CREATE ROLE, ALTER ROLE, GRANT role TO role), one at a time.

Roles live in shared catalogs: two sessions creating the same role at once both find it missing, and the second
fails with unique_violation on pg_authid_rolname_index (not duplicate_object, which a guarded CREATE ROLE
catches); two ALTER ROLE of one role fail with "tuple concurrently updated". Whoever changes roles takes
ROLES_LOCK, a transaction-level advisory lock, in the transaction that makes the change.

An advisory lock is per database: it serializes the sessions of one database only. Role changes meant for a
whole server (the demo database's roles, the tests' roles) are therefore made on a connection to the server's
maintenance database (`postgres`), where every such change meets the same lock.
"""

from __future__ import annotations

ROLES_LOCK = 7418529630000001  # one fixed key (the runbook's advisory lock class, then 0000001)
LOCK_STATEMENT = f"SELECT pg_advisory_xact_lock({ROLES_LOCK})"


def serialize(conn) -> None:
    """Take ROLES_LOCK in the current transaction of `conn` (psycopg or SQLAlchemy); it is released at commit."""
    (conn.exec_driver_sql if hasattr(conn, "exec_driver_sql") else conn.execute)(LOCK_STATEMENT)

