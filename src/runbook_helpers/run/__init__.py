"""A run: the phase session every notebook opens, the papermill runner, the archive and its manifest,
progress for long work, and the charts.

Imports phases and everything below them; only cli imports run."""
