"""Benchmarks of vittle_fast (CPU timings as ratios, GPU costs as predictions; see docs/benchmarks.md)."""
