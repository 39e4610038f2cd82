"""Benchmarks: each script prints figures beside a peer measured in the same run."""
