"""The database plumbing: embedded server, connections and session settings, catalog queries, the ledger,
safe DDL (Step, lock ladder, dry run), SQL rendering, fingerprints and object names.

Imports nothing of the package above it: only the foundation modules (errors, paths, params, faults)."""
