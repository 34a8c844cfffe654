"""Shoal: a production-grade federated learning platform.

``shoal.simulate(config, client_app=..., server_app=...)`` runs a simulation
from Python (see :mod:`shoal.simulation.api`), and ``shoal.unlearn(run_dir,
client_id)`` forgets one of its clients (:mod:`shoal.simulation.unlearning`); the apps' API is
:mod:`shoal.client.app` (``ClientApp``, ``ClientContext``) and
:mod:`shoal.coordinator.app` (``ServerApp``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from shoal.client.app import ClientApp, ClientContext
    from shoal.coordinator.app import ServerApp, ServerContext
    from shoal.governance.unlearning import UnlearningReport
    from shoal.simulation.api import SimulationResult, simulate
    from shoal.simulation.unlearning import unlearn

_LAZY = {
    "ClientApp": "shoal.client.app",
    "ClientContext": "shoal.client.app",
    "ServerApp": "shoal.coordinator.app",
    "ServerContext": "shoal.coordinator.app",
    "SimulationResult": "shoal.simulation.api",
    "simulate": "shoal.simulation.api",
    "UnlearningReport": "shoal.governance.unlearning",
    "unlearn": "shoal.simulation.unlearning",
}


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (``import shoal`` stays light for the CLI)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "ClientApp",
    "ClientContext",
    "ServerApp",
    "ServerContext",
    "SimulationResult",
    "UnlearningReport",
    "simulate",
    "unlearn",
]
