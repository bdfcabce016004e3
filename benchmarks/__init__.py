"""Benchmarks: scripts that start their own Redis and gateways and print figures."""
