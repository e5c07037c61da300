"""The DALI loader moved to `fastft.data.dali_feed` (its graph to `fastft.data.dali_pipeline`); `DaliLoader` stays
importable from here until benchmarks/data_bench.py imports it from there."""

from fastft.data.dali_feed import DaliLoader

__all__ = ["DaliLoader"]
