"""Benchmarks of xray_tf, run from the repository root as ``python -m benchmarks.<name>`` (see BENCHMARKS.md)."""
