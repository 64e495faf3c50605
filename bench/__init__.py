"""Benchmark scripts (not tests): `python -m bench.cpu`, `bench.arrays`, `bench.throughput`."""
