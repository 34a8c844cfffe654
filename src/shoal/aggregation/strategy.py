"""Strategies as compositions: an aggregator, a server optimizer and the client's proximal term.

FedAvg, FedProx, FedAdam and the rest are presets of the same three parts,
not subclasses. ``make_strategy`` builds one by name; any part can be
overridden, so ``make_strategy("fedadam", aggregator="median")`` is FedAdam
over the coordinate-wise median.

Preset defaults. Server learning rates and τ for the adaptive optimizers are
starting points inside the ranges Reddi et al. 2021 found best across their
tasks (their tuned η lies around 1e-2 to 1e-1 with τ near 1e-3); tune them.

    preset          aggregator                 server optimizer
    fedavg          mean                       sgd η=1
    fedavgm         mean                       sgd η=1, momentum 0.9
    fedprox         mean                       sgd η=1; clients use μ=0.01
    fedadam         mean                       adam η=1e-2, β1=0.9, β2=0.99, τ=1e-3
    fedyogi         mean                       yogi η=1e-2, β1=0.9, β2=0.99, τ=1e-3
    fedadagrad      mean                       adagrad η=1e-1, β1=0, τ=1e-3
    fedmedian       median                     sgd η=1
    fedtrimmedavg   trimmed_mean β=0.1         sgd η=1
    krum            krum f=1                   sgd η=1
    multikrum       multikrum f=1, m=auto      sgd η=1

Multi-Krum's default m is "auto": the most the condition 2f + 2 < n - m
allows for the n updates of the round, m = n - 2f - 3 (5 of 10 with f=1).

>>> make_strategy("fedtrimmedavg").aggregator
TrimmedMean(trim_ratio=0.1)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from shoal.aggregation.aggregators import (
    Aggregator,
    CoordinateMedian,
    Krum,
    TrimmedMean,
    WeightedMean,
)
from shoal.aggregation.clustered import PerCluster
from shoal.aggregation.optimizers import server_adagrad, server_adam, server_sgd, server_yogi
from shoal.core.errors import StrategyError
from shoal.core.transforms import Transform

_Entry = TypeVar("_Entry")

AGGREGATORS: tuple[str, ...] = ("krum", "mean", "median", "multikrum", "trimmed_mean")

# Which keyword options each aggregator and each server optimizer understands.
_AGGREGATOR_OPTIONS: dict[str, frozenset[str]] = {
    "mean": frozenset(),
    "median": frozenset(),
    "trimmed_mean": frozenset({"trim_ratio"}),
    "krum": frozenset({"num_byzantine"}),
    "multikrum": frozenset({"num_byzantine", "num_selected"}),
}
_OPTIMIZER_OPTIONS: dict[str, frozenset[str]] = {
    "sgd": frozenset({"server_learning_rate", "server_momentum"}),
    "adam": frozenset({"server_learning_rate", "beta1", "beta2", "tau"}),
    "yogi": frozenset({"server_learning_rate", "beta1", "beta2", "tau"}),
    "adagrad": frozenset({"server_learning_rate", "beta1", "tau"}),
}
_OPTIMIZER_ARGUMENT = {"server_learning_rate": "learning_rate", "server_momentum": "momentum"}


@dataclass(frozen=True, slots=True)
class Strategy:
    """A federated strategy: how to aggregate, how the server steps, and FedProx's μ.

    ``proximal_mu`` is a client-side setting: clients add (μ/2)|w - w_global|²
    to their local loss (Li et al. 2020); 0 turns it off. ``clusters`` above
    1: clustered FL (:func:`clustered`), the model is that many cluster
    models stacked and the aggregator runs per cluster. ``local_check``: what a
    client's local model (the global one plus its update) must satisfy, the
    reason it does not or None; the engine refuses a plaintext update that
    fails it (a statistics run's moments that no records give,
    :class:`~shoal.preprocessing.MomentsCheck`).
    """

    name: str
    aggregator: Aggregator
    server_optimizer: Transform
    proximal_mu: float = 0.0
    clusters: int = 1
    local_check: Callable[[np.ndarray], str | None] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise StrategyError("a strategy needs a non-empty name")
        mu = self.proximal_mu
        if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not 0 <= mu < math.inf:
            raise StrategyError(f"proximal_mu must be finite and >= 0, got {mu!r}")
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int):
            raise StrategyError(f"clusters must be an integer, got {self.clusters!r}")
        if self.clusters < 1:
            raise StrategyError(f"clusters must be at least 1, got {self.clusters}")


@dataclass(frozen=True, slots=True)
class _Preset:
    aggregator: str
    optimizer: str
    options: dict[str, Any] = field(default_factory=dict)
    proximal_mu: float = 0.0


_PRESETS: dict[str, _Preset] = {
    "fedavg": _Preset("mean", "sgd"),
    "fedavgm": _Preset("mean", "sgd", {"server_momentum": 0.9}),
    "fedprox": _Preset("mean", "sgd", proximal_mu=0.01),
    "fedadam": _Preset("mean", "adam"),
    "fedyogi": _Preset("mean", "yogi"),
    "fedadagrad": _Preset("mean", "adagrad"),
    "fedmedian": _Preset("median", "sgd"),
    "fedtrimmedavg": _Preset("trimmed_mean", "sgd"),
    "krum": _Preset("krum", "sgd"),
    "multikrum": _Preset("multikrum", "sgd"),
}
PRESETS: tuple[str, ...] = tuple(sorted(_PRESETS))


def make_aggregator(
    name: str,
    *,
    trim_ratio: float | None = None,
    num_byzantine: int | None = None,
    num_selected: int | None = None,
) -> Aggregator:
    """Build an aggregator by name; None options take the rule's defaults."""
    given = {"trim_ratio": trim_ratio, "num_byzantine": num_byzantine, "num_selected": num_selected}
    options = _accepted(
        f"aggregator {name!r}", _lookup("aggregator", name, _AGGREGATOR_OPTIONS), given
    )
    if name == "mean":
        return WeightedMean()
    if name == "median":
        return CoordinateMedian()
    if name == "trimmed_mean":
        return TrimmedMean(**options)
    if name == "krum":
        return Krum(num_selected=1, **options)
    return Krum(**{"num_byzantine": 1, "num_selected": None, **options})


def fewest_updates(aggregator: Aggregator) -> int:
    """The fewest updates a round must bring for ``aggregator`` to do its work: Krum's
    2f + m + 3 (fewer, and it refuses the round), the 3 whose median outvotes one attacker,
    the fewest a trimmed mean trims one from each side of (fewer, and it is a plain mean); 1
    for the mean and for a rule of a user's own.

    >>> fewest_updates(make_aggregator("krum", num_byzantine=2))
    8
    """
    if isinstance(aggregator, Krum | TrimmedMean | CoordinateMedian):
        return aggregator.fewest_updates
    return 1


def _make_optimizer(kind: str, options: dict[str, Any]) -> Transform:
    arguments = {_OPTIMIZER_ARGUMENT.get(key, key): value for key, value in options.items()}
    if kind == "sgd":
        return server_sgd(**arguments)
    if kind == "adam":
        return server_adam(**arguments)
    if kind == "yogi":
        return server_yogi(**arguments)
    return server_adagrad(**arguments)


def make_strategy(
    name: str,
    *,
    server_learning_rate: float | None = None,
    server_momentum: float | None = None,
    beta1: float | None = None,
    beta2: float | None = None,
    tau: float | None = None,
    proximal_mu: float | None = None,
    aggregator: str | None = None,
    trim_ratio: float | None = None,
    num_byzantine: int | None = None,
    num_selected: int | None = None,
) -> Strategy:
    """Build the preset ``name``; None means "the preset's default" for every option.

    An option the chosen aggregator or server optimizer does not take (say
    ``beta2`` for FedAvg, or ``trim_ratio`` for Krum) raises StrategyError.

    >>> make_strategy("fedadam", aggregator="median").name
    'fedadam+median'
    """
    preset = _lookup("strategy preset", name, _PRESETS)
    rule = preset.aggregator if aggregator is None else aggregator
    built = make_aggregator(
        rule, trim_ratio=trim_ratio, num_byzantine=num_byzantine, num_selected=num_selected
    )
    given = {
        "server_learning_rate": server_learning_rate,
        "server_momentum": server_momentum,
        "beta1": beta1,
        "beta2": beta2,
        "tau": tau,
    }
    options = _accepted(
        f"the {preset.optimizer} server optimizer of {name!r}",
        _OPTIMIZER_OPTIONS[preset.optimizer],
        given,
    )
    optimizer = _make_optimizer(preset.optimizer, {**preset.options, **options})
    return Strategy(
        name=name if rule == preset.aggregator else f"{name}+{rule}",
        aggregator=built,
        server_optimizer=optimizer,
        proximal_mu=preset.proximal_mu if proximal_mu is None else proximal_mu,
    )


def clustered_strategy(strategy: Strategy, *, clusters: int) -> Strategy:
    """``strategy`` for clustered FL over ``clusters`` models (IFCA, Ghosh et al. 2020): its
    aggregator runs per cluster over the clients that chose it; one cluster: unchanged.

    >>> clustered_strategy(make_strategy("fedavg"), clusters=2).aggregator
    PerCluster(inner=WeightedMean(), clusters=2)
    """
    if clusters == 1 or strategy.clusters == clusters:
        return strategy
    if strategy.clusters != 1:
        raise StrategyError(f"the strategy is clustered already ({strategy.clusters} clusters)")
    aggregator = PerCluster(strategy.aggregator, clusters)
    return replace(strategy, aggregator=aggregator, clusters=clusters)


def _lookup(kind: str, name: str, table: dict[str, _Entry]) -> _Entry:
    if name not in table:
        raise StrategyError(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(table))}")
    return table[name]


def _accepted(owner: str, allowed: frozenset[str], given: dict[str, Any]) -> dict[str, Any]:
    """The options that were given (not None), refusing those ``owner`` does not take."""
    options = {key: value for key, value in given.items() if value is not None}
    refused = sorted(set(options) - allowed)
    if refused:
        takes = ", ".join(sorted(allowed)) or "no options"
        raise StrategyError(f"{owner} does not take {', '.join(refused)} (it takes: {takes})")
    return options
