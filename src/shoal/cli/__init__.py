"""The ``shoal`` command line: the front door to every Shoal job."""

from shoal.cli import network, operator, simulate
from shoal.cli.app import app, main

__all__ = ["app", "main", "network", "operator", "simulate"]
