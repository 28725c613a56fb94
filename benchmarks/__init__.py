"""Benchmarks anyone can run: ``python benchmarks/step_time.py`` (speed) and ``python benchmarks/parity.py``
(exactness against PEFT). Results: the README's Speed and adapter sections; method: docs/BENCHMARK.md."""
