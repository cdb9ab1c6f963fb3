"""What every layer shares and none owns: the error hierarchy, sizes, names, crash-safe
writes and waiting for processes. Imports nothing else of lhfs."""

__version__ = "0.1.0"  # (the package's version: pyproject.toml reads it from here)
