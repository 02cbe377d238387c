"""Benchmarks: `python -m bench.<name>` writes figures to bench/report.md."""
