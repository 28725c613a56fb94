"""Benchmarks anyone can run, each as ``python benchmarks/<name>.py``: ``step_time.py`` (speed: training
steps, and through ``inference.py`` and ``trainer_overhead.py`` merged inference and the trainer end to end)
and ``parity.py`` (exactness against PEFT); ``harness.py`` holds what they share. Results: the README's
Speed and adapter sections; method: docs/BENCHMARK.md."""
