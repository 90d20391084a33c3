"""Benchmarks: ``python -m mtl.bench.step`` times one training step per weighting."""
