"""Benchmark harness of lightning-tp: ``python -m benchmarks --help`` (see benchmarks/README.md)."""
