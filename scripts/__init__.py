"""Command-line helpers: `uv run python -m scripts.seed_sweep --help`; the shell scripts run from the repository."""
