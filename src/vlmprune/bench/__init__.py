"""Benchmarks of measured speed against the cost model's ideal."""

from vlmprune.bench.runner import BenchResult, Variant, run_benchmark

__all__ = ["BenchResult", "Variant", "run_benchmark"]
