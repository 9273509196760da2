"""One module per notebook: plan(...) -> steps, apply(...), DataFrames for the notebook to show, and the
steps that undo what the phase did (composed by rollback).

Imports db, backfill, tenancy, legacy, drizzle and the foundation modules; never run or cli."""

from . import backfill, constrain, distribute, finalize, inspect, rollback, seed, validate  # noqa: F401
