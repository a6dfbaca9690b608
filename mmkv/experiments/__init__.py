"""Experiments: the benchmark, the eval harness, MileBench, results stores and Ray sweeps."""
