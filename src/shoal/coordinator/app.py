"""The server app: what a user may tell the coordinator; each part left out keeps the default.

A server app is named ``MODULE:ATTRIBUTE`` in the job's ``[app]`` section
(``server = "my_app:server_app"``): a :class:`ServerApp`, or a function of a
:class:`ServerContext` that returns one. Every part is optional::

    server_app = ServerApp(
        evaluate=lambda parameters, round: {"loss": ..., "accuracy": ...},
        fit_config=lambda round: {"learning_rate": 0.1 * 0.95**round},
        fit_metrics=weighted_mean_of("f1"),
        strategy="fedadam",
    )

- ``initial_parameters``: the model of round 0 (default: a client's own
  ``get_parameters()``).
- ``evaluate(parameters, round)``: central evaluation of every committed
  model; its metrics go into the round's row as ``test_<name>``, and its
  ``accuracy`` is the row's accuracy.
- ``fit_config(round)`` / ``evaluate_config(round)``: per-round settings
  sent with each task. ``epochs``, ``batch_size``, ``learning_rate`` and
  ``proximal_mu`` replace the job's ``[client]`` values; any other key
  travels in the task's ``extras`` (bool, int, float or str).
- ``fit_metrics`` / ``evaluate_metrics``: how the clients' metrics of a
  round are combined (default: the mean weighted by examples).
- ``strategy``: a preset name or a composed
  :class:`~shoal.aggregation.strategy.Strategy` (default: ``[strategy]``).
- ``architecture``: the model architecture each version records (default:
  ``[model] kind`` for the built-in app, else the client app's name).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.aggregation.strategy import Strategy, make_strategy
from shoal.client.app import (
    ClientApp,
    as_client_app,
    load_attribute,
    load_client_app,
    run_features,
)
from shoal.config import Config
from shoal.core.errors import ConfigError
from shoal.core.parameters import Layout, Parameters
from shoal.features import FeatureModule
from shoal.preprocessing import MomentsCheck, Scaler, moments_layout, read_statistics

ClientMetrics = Sequence[tuple[int, Mapping[str, float]]]
"""Each reporting client's (number of examples, metrics) in one round."""
MetricsAggregation = Callable[[ClientMetrics], Mapping[str, float]]
RoundConfig = Callable[[int], Mapping[str, Any]]
CentralEvaluation = Callable[[Parameters, int], Mapping[str, float]]
TestData = Callable[[], tuple[np.ndarray, np.ndarray]]
ClassProbabilities = Callable[[Parameters, np.ndarray], np.ndarray]

log = logging.getLogger("shoal.coordinator")

TASK_SETTINGS = ("epochs", "batch_size", "learning_rate", "proximal_mu")
"""Keys of a round config that replace the task's own settings; the rest go into its extras."""


@dataclass(frozen=True, slots=True)
class ServerContext:
    """What a server app factory is told: the job's config, the ``[app] options``, the
    run's feature module (``[features]``; None: none), which a central evaluation computes
    its records' features with, as every client does, and the run's scaler
    (``[preprocessing]``; None: none), which it standardizes them with, as every client
    does with the one its tasks carry."""

    config: Config = field(default_factory=Config)
    options: Mapping[str, str] = field(default_factory=dict)
    features: FeatureModule | None = None
    scaler: Scaler | None = None

    @property
    def seed(self) -> int:
        return self.config.run.seed


@dataclass(frozen=True, slots=True)
class ServerApp:
    """The server side of an app; see the module docstring for each part."""

    initial_parameters: Callable[[ServerContext], Parameters] | None = None
    evaluate: CentralEvaluation | None = None
    fit_config: RoundConfig | None = None
    evaluate_config: RoundConfig | None = None
    fit_metrics: MetricsAggregation | None = None
    evaluate_metrics: MetricsAggregation | None = None
    strategy: str | Strategy | None = None
    architecture: str | None = None
    # for measurements the simulator makes on the model (a backdoor's success rate, the
    # exposure of planted canaries): the central held-out (features, labels), and the
    # model's class probabilities of each row of a feature array, shape (rows, classes)
    test_data: TestData | None = None
    probabilities: ClassProbabilities | None = None


def weighted_mean(results: ClientMetrics) -> dict[str, float]:
    """Each finite numeric metric's mean, weighted by the clients' examples (the default)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for examples, metrics in results:
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + float(value) * examples
                weights[name] = weights.get(name, 0.0) + examples
    return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}


def weighted_mean_of(*names: str) -> MetricsAggregation:
    """A metrics aggregation keeping only ``names``, each weighted by examples."""

    def aggregate(results: ClientMetrics) -> dict[str, float]:
        means = weighted_mean(results)
        return {name: means[name] for name in names if name in means}

    return aggregate


def as_server_app(
    target: Any, context: ServerContext, *, name: str = "the server app"
) -> ServerApp:
    """A :class:`ServerApp` from what a user gave: the object itself, or a factory of one."""
    if isinstance(target, ServerApp):
        return target
    if callable(target):
        try:
            app = target(context)
        except Exception as exc:  # the user's factory: one clear line, not a traceback
            raise ConfigError(f"{name} failed: {type(exc).__name__}: {exc}") from exc
        if isinstance(app, ServerApp):
            return app
        raise ConfigError(f"{name} returned {type(app).__name__}, not a ServerApp")
    raise ConfigError(f"{name} must be a ServerApp or a function of a ServerContext")


def load_server_app(
    spec: str | None, context: ServerContext, *, search_path: Iterable[str | Path] = ()
) -> ServerApp:
    """The server app named ``MODULE:ATTRIBUTE``; None gives every default."""
    if spec is None:
        return ServerApp()
    return as_server_app(load_attribute(spec, search_path=search_path), context, name=spec)


def split_round_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A round config as (the task settings it replaces, the extras it adds)."""
    settings = {key: value for key, value in config.items() if key in TASK_SETTINGS}
    extras = {key: value for key, value in config.items() if key not in TASK_SETTINGS}
    for key, value in extras.items():
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise ConfigError(
                f"round config {key!r}: only bool, int, float and str values travel to clients"
            )
    return settings, extras


@dataclass(frozen=True, slots=True, eq=False)
class Preprocessing:
    """A training run's pass 2 (``[preprocessing]``): the scaler its statistics give, and
    the sha256 of the statistics file they were read from."""

    scaler: Scaler
    sha256: str


def run_preprocessing(config: Config) -> Preprocessing | None:
    """The job's preprocessing (``[preprocessing] statistics``, read and checked); None when
    the job names no statistics. A file that does not hash to ``[preprocessing] sha256`` is
    refused."""
    section = config.preprocessing
    if section.statistics is None:
        if section.sha256 is not None:
            raise ConfigError(
                "preprocessing.sha256 pins statistics, and preprocessing.statistics names none"
            )
        return None
    statistics, sha256 = read_statistics(section.statistics)
    if section.sha256 is not None and sha256 != section.sha256:
        raise ConfigError(
            f"the feature statistics {section.statistics} have sha256 {sha256}, and "
            f"preprocessing.sha256 pins {section.sha256}"
        )
    if statistics.unresolved:
        log.warning(
            "the feature statistics name %d features whose spread their bounds did not resolve "
            "(%s): each is scaled by what was measured, maybe far off, or by 1",
            len(statistics.unresolved),
            ", ".join(map(str, statistics.unresolved[:10])),
        )
    return Preprocessing(statistics.scaler(), sha256)


STATISTICS_ARCHITECTURE = "feature-statistics"
"""What a statistics run's versions record as their architecture: the moments of its features."""


def statistics_server_app(config: Config) -> ServerApp:
    """The server side of a statistics run (``[statistics] enabled``): the moments start at
    zero, and are the clients' mean weighted by their records, each client's checked."""
    bounds = config.statistics.bounds()
    strategy = replace(
        make_strategy("fedavg"),
        name=STATISTICS_ARCHITECTURE,
        local_check=MomentsCheck(bounds.features),
    )
    return ServerApp(
        initial_parameters=functools.partial(_zero_moments, moments_layout(bounds.features)),
        strategy=strategy,
        architecture=STATISTICS_ARCHITECTURE,
    )


def _zero_moments(layout: Layout, context: ServerContext) -> Parameters:
    return Parameters.zeros(layout)


@dataclass(frozen=True, slots=True)
class ResolvedApps:
    """A job's client and server apps, loaded, the architecture its versions record, the
    feature module its clients compute their features with (``[features]``; None: none),
    and the scaler they standardize them with (``[preprocessing]``; None: none)."""

    client: ClientApp
    server: ServerApp
    architecture: str
    features: FeatureModule | None = None
    preprocessing: Preprocessing | None = None


def resolve_apps(
    config: Config,
    *,
    client: Any = None,
    server: Any = None,
    search_path: Iterable[str | Path] = (),
) -> ResolvedApps:
    """The apps of a job: the objects given, else those its ``[app]`` section names."""
    folders = list(search_path)
    section = config.app
    client_app = (
        load_client_app(section.client, search_path=folders)
        if client is None
        else as_client_app(client)
    )
    features = run_features(config)
    preprocessing = run_preprocessing(config)
    context = ServerContext(
        config=config,
        options=section.options,
        features=features,
        scaler=None if preprocessing is None else preprocessing.scaler,
    )
    if config.statistics.enabled:  # Shoal's own server side: the moments' mean
        if server is not None or section.server is not None:
            log.info("a statistics run's server side is Shoal's: the app's server is not used")
        server_app = statistics_server_app(config)
    elif server is not None:
        server_app = as_server_app(server, context)
    elif client is not None and section.server is None:
        server_app = ServerApp()  # a client app given as an object has no built-in server side
    else:
        server_app = load_server_app(section.server_spec, context, search_path=folders)
    if not config.evaluation.centralized and server_app.evaluate is not None:
        # the job's switch, for every app (only the built-in one read it)
        server_app = replace(server_app, evaluate=None)
    architecture = server_app.architecture or _app_name(client, section.client)
    return ResolvedApps(client_app, server_app, architecture, features, preprocessing)


def _app_name(client: Any, spec: str) -> str:
    if client is None:
        return spec
    target = client.client_fn if isinstance(client, ClientApp) else client
    module = getattr(target, "__module__", None) or "app"
    return f"{module}:{getattr(target, '__qualname__', type(target).__name__)}"
