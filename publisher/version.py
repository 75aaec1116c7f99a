"""The package version (one place; the wheel's is set in pyproject.toml)."""

__version__ = "0.2.0"
