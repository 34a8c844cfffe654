"""A user-written malicious client app: named clients boost their honest update (model replacement).

Written with the public app API only, as an attacker would: the built-in
digits client trains honestly, then a client named in the job's
``[app] options`` ``attackers`` (comma-separated ids) multiplies its update
by ``scale`` from round ``from_round`` on (Bagdasaryan et al.'s boost).
"""

from __future__ import annotations

from typing import Any

from shoal.apps import client_app as honest_app
from shoal.client.api import (
    Client,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
    fit_update,
)
from shoal.client.app import ClientApp, ClientContext
from shoal.config import Config, parse_config
from shoal.core.parameters import Parameters


class Boosted(Client):
    """An honest client whose update is multiplied by ``scale`` from ``from_round`` on."""

    def __init__(self, inner: Client, *, scale: float, from_round: int) -> None:
        self.inner = inner
        self.scale = scale
        self.from_round = from_round

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        result = self.inner.fit(parameters, config)
        if config.round < self.from_round:
            return result
        update = fit_update(result, parameters)
        boosted = update.with_vector(update.vector * self.scale)
        return FitResult(boosted, result.num_examples, result.metrics, is_update=True)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return self.inner.evaluate(parameters, config)


def _client(context: ClientContext) -> Client:
    client = honest_app(context)
    attackers = context.options.get("attackers", "").split(",")
    if context.client_id not in attackers:
        return client
    scale = float(context.options.get("scale", "20"))
    return Boosted(client, scale=scale, from_round=int(context.options.get("from_round", "1")))


ATTACKERS = ("client-00003", "client-00007", "client-00011", "client-00015")  # 20% of 20
POISONED_FROM = 4


def poisoned_job(
    *, rounds: int = 6, attackers: tuple[str, ...] = ATTACKERS, **sections: Any
) -> Config:
    """Digits over 20 steady devices, 10 a round; the named clients boost their update by 10
    (n / eta) from round 4; the default policy's norm bounds loosened so that it commits."""
    options = {"attackers": ",".join(attackers), "from_round": str(POISONED_FROM), "scale": "10"}
    data: dict[str, Any] = {
        "run": {"name": "poisoned", "rounds": rounds, "seed": 0},
        "data": {"num_clients": 20},
        "round": {"clients_per_round": 10, "over_selection": 1.0, "quorum": 0.5},
        "client": {"epochs": 2, "batch_size": 16, "learning_rate": 0.2},
        "evaluation": {"every": 0},
        "devices": {"classes": [{"name": "steady", "share": 1.0, "dropout": 0.0}]},
        "simulation": {"workers": 0},
        "policy": {"max_relative_l2_norm": 1000.0, "max_l2_norm": 1e6},
        "alerts": {"hooks": ["support.boosting_app:remember"]},
        "app": {
            "client": "support.boosting_app:client_app",
            "server": "shoal.apps.builtin:server_app",
            "options": options,
        },
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data)


client_app = ClientApp(_client, num_examples=honest_app.num_examples)

ALERTS: list[Any] = []
"""What :func:`remember` was given: a job's Python alert hook (``[alerts] hooks``) in tests."""


def remember(alert: Any) -> None:
    ALERTS.append(alert)
