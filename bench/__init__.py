"""Benchmarks: scripts that print measured figures side by side with a baseline."""
