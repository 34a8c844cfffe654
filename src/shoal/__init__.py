"""Shoal: a production-grade federated learning platform."""

__version__ = "0.1.0"
