"""Entry points: `python -m jobs.<name>`."""
