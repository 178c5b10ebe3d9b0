"""Benchmarks: drainbus against the floor programs of ../shared/bench-floor/ (see run.py)."""
