"""Helpers for the tenancy runbook: every notebook cell calls into this package."""

__version__ = "0.1.0"
