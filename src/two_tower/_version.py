"""The package version: read by `pyproject.toml` (setuptools `attr:`), re-exported as
`two_tower.__version__`."""

__version__ = "0.1.0"
