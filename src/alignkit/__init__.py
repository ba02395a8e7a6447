"""alignkit: align language models with preferences."""

__version__ = "0.1.0"
