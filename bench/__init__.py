"""Benchmarks: never part of `make test`. Each prints a table and writes bench/results/<name>.json."""
