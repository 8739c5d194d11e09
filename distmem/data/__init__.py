"""Data sets read from a path (default: ../shared/data), decoded once into a cache."""
