"""Benchmarks: `uv run python -m bench.<name> --help`; results in bench/results/."""
