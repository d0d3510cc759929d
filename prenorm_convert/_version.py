"""The package version, in a module of its own so that no module imports the package __init__ for it.

pyproject.toml declares the same version (tests/test_architecture.py checks they agree)."""

__version__ = "0.1.0"
