"""Fake model servers, load generation, scenarios and benchmarks for canary."""
