"""One module per phase notebook: plan(...) -> steps, apply(...), and DataFrames for the notebook to show."""

from . import backfill, constrain, inspect, seed, validate  # noqa: F401
