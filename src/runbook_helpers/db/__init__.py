"""The database plumbing: embedded server, connections and session settings, catalog queries, the ledger,
safe DDL (Step, lock ladder, dry run), SQL rendering, fingerprints and object names, the shape of a DSN and the
secrets of a connection (every way libpq finds a password, every encoding an archive can hold it in).

Imports nothing of the package above it: only the foundation modules (errors, paths, params, faults)."""
