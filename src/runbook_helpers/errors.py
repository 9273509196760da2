"""Errors a person can act on.

A RunbookError carries a message that says what was wrong and what to do next; the CLI prints it as
one line without a traceback, and the notebooks show it as the cell's error. Anything else is a bug.
"""


class RunbookError(Exception):
    """A problem with input, environment or database state that the operator can fix."""


class ParamsError(RunbookError):
    """Parameter files that cannot be loaded or do not validate."""


class LockNotAcquired(RunbookError):
    """A DDL statement could not take its lock within the retry ladder."""


class RunnerBusy(RunbookError):
    """Another runbook run holds the single-runner advisory lock on this database."""
