"""Benchmarks: run as modules (``python -m tests.bench.ipam_bench``); they print figures."""
