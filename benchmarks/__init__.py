"""Benchmarks: throughput harness (`throughput`), naive seed baseline (`baseline_seed`), data loaders (`data_bench`)."""
