"""Canaries in the simulator: random records planted in some clients' data, and their exposure.

``[canaries]`` draws ``count`` canary records, as many control records and
``references`` reference records, all the same way: features uniform over
the range of each feature in the server app's test set, a label uniform
over its classes. Each holder trains on every canary (``repeats`` copies
of each), appended through the client's
:class:`~shoal.client.TransformableData` hook; the controls and references
are never planted. At the end of the run (and, with ``every_version``, at
each committed version) the server app's class probabilities give every
record's loss, ``-log p(label | features)``, and each canary's exposure
against the references (:mod:`shoal.privacy.exposure`). The controls'
exposure is the clean baseline measured in the same run: what a record
the model never saw scores (about 1.44 bits on average).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.client.api import Client, Examples, TransformableData
from shoal.config import CanariesSection, Config
from shoal.coordinator.app import ServerApp
from shoal.core.errors import ConfigError
from shoal.core.parameters import Parameters
from shoal.privacy.exposure import exposures, extrapolated_exposures, record_losses
from shoal.simulation.population import client_name

ClientFactory = Callable[[str], Client]

CANARIES_FILE = "canaries.json"
_SEED_TAG = 0xCA4A27  # the canaries' own stream of the run's seed
MEANING = (
    "exposure = log2(|R|) - log2(rank): the bits by which the model prefers a planted canary "
    "to random candidates drawn the same way, among |R| = references + 1 candidates (ties "
    "count half). About log2(|R|): the canary is memorized, the most likely candidate of all. "
    "About 1.44 (log2 e), the mean of a record never seen, and the controls' level: the model "
    "does not tell the canary from chance. The extrapolated exposure reads the canary's share "
    "of a distribution fitted to the references' losses, so it can exceed log2(|R|)."
)


@dataclass(frozen=True, slots=True)
class Records:
    """Labelled records: features (rows, features) and labels (rows,)."""

    features: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True, slots=True)
class PlantCanaries:
    """The data transform of a holder: its examples, then ``repeats`` copies of each canary."""

    canaries: Records
    repeats: int

    def __call__(self, features: np.ndarray, labels: np.ndarray) -> Examples:
        planted_x = np.repeat(self.canaries.features, self.repeats, axis=0).astype(features.dtype)
        planted_y = np.repeat(self.canaries.labels, self.repeats).astype(labels.dtype)
        return np.concatenate([features, planted_x]), np.concatenate([labels, planted_y])


@dataclass(frozen=True, slots=True)
class CanaryPlan:
    """The run's canaries, controls and references, and the clients holding the canaries."""

    canaries: Records
    controls: Records
    references: Records
    holders: frozenset[str]
    settings: CanariesSection

    @property
    def transform(self) -> PlantCanaries:
        return PlantCanaries(self.canaries, self.settings.repeats)


def draw_plan(config: Config, test_data: Records) -> CanaryPlan:
    """The canary plan of ``config``'s run, drawn from its seed over ``test_data``'s ranges.

    The same seed gives the same canaries, references and holders (a resumed
    run plants what the first part planted).
    """
    settings = config.canaries
    streams = np.random.SeedSequence([config.run.seed, _SEED_TAG]).spawn(4)
    draw = _record_drawer(test_data)
    population = config.data.num_clients
    wanted = (
        settings.holders if settings.holders is not None else round(settings.clients * population)
    )
    picks = np.random.default_rng(streams[3]).choice(population, size=wanted, replace=False)
    return CanaryPlan(
        canaries=draw(np.random.default_rng(streams[0]), settings.count),
        controls=draw(np.random.default_rng(streams[1]), settings.count),
        references=draw(np.random.default_rng(streams[2]), settings.references),
        holders=frozenset(client_name(int(index)) for index in picks),
        settings=settings,
    )


def _record_drawer(test_data: Records) -> Callable[[np.random.Generator, int], Records]:
    features = np.asarray(test_data.features)
    labels = np.asarray(test_data.labels)
    if features.ndim != 2 or features.shape[0] == 0 or labels.shape != (features.shape[0],):
        raise ConfigError(
            "canaries: the server app's test_data must be (features (rows, columns), labels "
            f"(rows,)) with at least one row, got shapes {features.shape} and {labels.shape}"
        )
    low, high = features.min(axis=0), features.max(axis=0)
    classes = int(labels.max()) + 1

    def draw(rng: np.random.Generator, count: int) -> Records:
        rows = rng.uniform(low, high, size=(count, low.size)).astype(features.dtype)
        return Records(rows, rng.integers(0, classes, size=count).astype(labels.dtype))

    return draw


class PlantedClients:
    """A client factory whose holders train on the canaries too; picklable like the one it wraps."""

    def __init__(self, clients: ClientFactory, plan: CanaryPlan) -> None:
        self.clients = clients
        self.wrapped = clients  # what population.packed sends the user's module by value for
        self.plan = plan

    def __call__(self, client_id: str) -> Client:
        client = self.clients(client_id)
        if client_id not in self.plan.holders:
            return client
        if not isinstance(client, TransformableData):
            raise ConfigError(
                f"canaries: the client app's clients ({type(client).__name__}) have no "
                "with_training_data(transform), so no canary can be planted; implement it "
                "(see shoal.client.TransformableData) or set canaries.enabled = false"
            )
        return client.with_training_data(self.plan.transform)


class Canaries:
    """A run's canaries: planted through :meth:`clients`, measured at each version and the end.

    Disabled (``[canaries] enabled = false``), every method leaves the run as it is.
    """

    def __init__(self, plan: CanaryPlan | None, server: ServerApp) -> None:
        self.plan = plan
        self.server = server

    @classmethod
    def of_run(cls, config: Config, server: ServerApp, clients: ClientFactory) -> Canaries:
        """The canaries of ``config``'s run; a ConfigError when the apps cannot carry them."""
        if not config.canaries.enabled:
            return cls(None, server)
        if server.test_data is None or server.probabilities is None:
            raise ConfigError(
                "canaries: the server app must give test_data and probabilities (the built-in "
                "app does) to draw canary records and measure their exposure"
            )
        features, labels = server.test_data()
        plan = draw_plan(config, Records(np.asarray(features), np.asarray(labels)))
        canaries = cls(plan, server)
        if plan.holders:
            PlantedClients(clients, plan)(min(plan.holders))  # a missing hook fails here, once
        return canaries

    def clients(self, clients: ClientFactory) -> ClientFactory:
        """``clients`` with the canaries planted in the holders' training data."""
        return clients if self.plan is None else PlantedClients(clients, self.plan)

    def row_fields(self, parameters: Parameters, row: Mapping[str, Any]) -> dict[str, Any]:
        """The canaries' mean exposure at a committed fit round's version (``every_version``)."""
        plan = self.plan
        if plan is None or not plan.settings.every_version or row.get("phase") != "fit":
            return {}
        if not row.get("committed"):
            return {}
        measured = self.measure(parameters)
        return {
            "canary_exposure": measured["mean"],
            "canary_exposure_unplanted": measured["unplanted_mean"],
        }

    def summary_fields(self, parameters: Parameters, out: Path) -> dict[str, Any]:
        """``canary_exposure`` for summary.json; writes canaries.json into run folder ``out``."""
        if self.plan is None:
            return {}
        measured = self.measure(parameters)
        report = {"meaning": MEANING, **measured, "holders": sorted(self.plan.holders)}
        (out / CANARIES_FILE).write_text(json.dumps(report, indent=2) + "\n")
        summary_keys = (
            "mean",
            "max",
            "per_canary",
            "extrapolated",
            "unplanted_mean",
            "unplanted_max",
            "max_by_rank",
        )
        return {"canary_exposure": {key: measured[key] for key in summary_keys}}

    def measure(self, parameters: Parameters) -> dict[str, Any]:
        """The exposure of each canary and control at ``parameters`` (see the module docstring)."""
        plan = self.plan
        if plan is None:
            return {}
        settings = plan.settings
        references = self._losses(parameters, plan.references)
        canaries = self._losses(parameters, plan.canaries)
        controls = self._losses(parameters, plan.controls)
        planted = exposures(canaries, references)
        unplanted = exposures(controls, references)
        fitted = extrapolated_exposures(canaries, references, distribution=settings.distribution)
        return {
            "mean": _rounded(planted.mean()),
            "max": _rounded(planted.max()),
            "per_canary": [_rounded(bits) for bits in planted],
            "extrapolated": [_rounded(bits) for bits in fitted],
            "unplanted_mean": _rounded(unplanted.mean()),
            "unplanted_max": _rounded(unplanted.max()),
            "max_by_rank": _rounded(math.log2(references.size + 1)),
            "canary_losses": [_rounded(loss) for loss in canaries],
            "reference_loss_median": _rounded(float(np.median(references))),
            "references": int(references.size),
            "holders_count": len(plan.holders),
            "repeats": settings.repeats,
            "distribution": settings.distribution,
        }

    def _losses(self, parameters: Parameters, records: Records) -> np.ndarray:
        assert self.server.probabilities is not None  # of_run checked it
        shares = self.server.probabilities(parameters, records.features)
        return record_losses(shares, records.labels)


def _rounded(value: float) -> float:
    return round(float(value), 4)
