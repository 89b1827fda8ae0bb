"""Shared pieces of the end-to-end benchmarks (``bench_ingest.py``, ``bench_realistic.py``)."""
