"""Benchmarks (run on demand)."""
