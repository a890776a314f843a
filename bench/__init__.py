"""Benchmark harness: model zoo, samplers, metrics, training of the embedded default, CLI."""
