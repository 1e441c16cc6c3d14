"""The version of gsae, in a module of its own so that any module can read it without importing
the package (and so everything in it)."""

__version__ = "0.1.0"
