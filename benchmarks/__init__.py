"""Benchmarks that anyone can run: ``python benchmarks/step_time.py`` (see docs/BENCHMARK.md)."""
