"""The digits app: softmax regression on one client's share of scikit-learn's digits.

Options: ``index`` (which share, default 0), ``clients`` (how many shares,
default 10), ``seed`` (the split, default 0), ``partition`` (``iid`` or
``dirichlet``, default iid). Every client and the coordinator derive the
same split from the same options, so no data ever moves.
"""

from __future__ import annotations

from shoal.apps.loading import AppOptions
from shoal.client.api import Client
from shoal.config import load_config
from shoal.core.errors import ConfigError
from shoal.simulation.scenario import DataScenario, client_name


def make_client(options: AppOptions) -> Client:
    """A NumpyClient holding share ``index`` of ``clients`` shares of digits."""
    try:
        index = int(options.get("index", "0"))
        clients = int(options.get("clients", "10"))
        seed = int(options.get("seed", "0"))
    except ValueError as exc:
        raise ConfigError(f"digits app options must be integers: {exc}") from exc
    if not 0 <= index < clients:
        raise ConfigError(f"index must be in [0, {clients}), got {index}")
    partition = options.get("partition", "iid")
    scenario = DataScenario(
        load_config(
            None,
            [
                f"data.num_clients={clients}",
                f"round.clients_per_round={min(clients, 10)}",
                f"run.seed={seed}",
                f"data.partition={partition}",
            ],
        )
    )
    return scenario.build_client(client_name(index))
