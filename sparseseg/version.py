"""The package version, at the bottom of the import graph: checkpoints and engine files record it."""

__version__ = "0.1.0"
