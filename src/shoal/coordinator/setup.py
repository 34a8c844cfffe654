"""From a run's config to the coordinator's parts: one place for simulator and server alike."""

from __future__ import annotations

from shoal.aggregation.strategy import Strategy, make_strategy
from shoal.config import Config
from shoal.coordinator.engine import RoundSettings
from shoal.core.errors import ConfigError, StrategyError


def strategy_from_config(config: Config) -> Strategy:
    """The ``[strategy]`` preset with its overrides; a bad combination is a ConfigError."""
    try:
        return make_strategy(config.strategy.name, **config.strategy.model_dump(exclude={"name"}))
    except StrategyError as exc:
        raise ConfigError(f"strategy: {exc}") from None


def round_settings_from_config(config: Config, *, population: int | None = None) -> RoundSettings:
    """The ``[round]``, ``[client]`` and ``[evaluation]`` settings of the engine.

    ``population`` caps the evaluation cohort when the whole population is
    known (a simulation); a live coordinator takes the configured size.
    """
    evaluation_clients = config.evaluation.clients
    if population is not None:
        evaluation_clients = min(evaluation_clients, population)
    return RoundSettings(
        clients_per_round=config.round.clients_per_round,
        over_selection=config.round.over_selection,
        quorum=config.round.quorum,
        deadline_s=config.round.deadline_s,
        evaluation_clients=evaluation_clients,
        epochs=config.client.epochs,
        batch_size=config.client.batch_size,
        learning_rate=config.client.learning_rate,
    )
