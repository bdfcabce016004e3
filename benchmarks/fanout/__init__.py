"""Fan-out benchmark: relay side by side with the ceiling, encode/broadcaster and
one subscription per socket. Run ``benchmarks/run`` (see docs/BENCHMARKS.md)."""
