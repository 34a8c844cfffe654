"""A closed round's fleet telemetry, as row fields: what the engine booked, by device class.

The round engine books when each task left and each result came, the
training time a client reported (the reserved metric
:data:`shoal.tasks.TRAIN_TIME_METRIC`), each evaluation's accuracy and why
each drop happened (:class:`~shoal.coordinator.events.FleetReport`); the run
layer turns that into the row's fields with :mod:`shoal.telemetry.fleet`.
Only the shell knows each client's device class: the simulator's fleet
(:class:`DeviceClasses` over its device profiles) or a deployed
coordinator's registry (:class:`RegistryClasses`, the device class each
client reported); a client with none is ``unknown``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from shoal.coordinator.events import RoundSummary
from shoal.registry import ClientRegistry, ClientStatus
from shoal.telemetry.fleet import (
    UNKNOWN_CLASS,
    bandwidth_fields,
    class_accuracy,
    drop_fields,
    fairness_fields,
    population_shares,
    timing_fields,
)


class DeviceClasses(Protocol):
    """The device classes of a run's population, as only its shell knows them."""

    def classes_of(self, clients: Sequence[str]) -> list[str]:
        """The class of each of ``clients``, in order (``unknown`` for a client with none)."""
        ...

    def population(self) -> Mapping[str, float]:
        """Each class's share of the population the run selects from."""
        ...


class UnknownClasses:
    """No shell said: every client is ``unknown``."""

    def classes_of(self, clients: Sequence[str]) -> list[str]:
        return [UNKNOWN_CLASS] * len(clients)

    def population(self) -> Mapping[str, float]:
        return {UNKNOWN_CLASS: 1.0}


class RegistryClasses:
    """The device classes a deployed population reported at enrollment and check-in (the
    registry's ``device_class``); the population is the active clients."""

    def __init__(self, clients: ClientRegistry) -> None:
        self.clients = clients

    def classes_of(self, clients: Sequence[str]) -> list[str]:
        profiles = self.clients.profiles(clients)
        return [
            profiles[client].device_class if client in profiles else UNKNOWN_CLASS
            for client in clients
        ]

    def population(self) -> Mapping[str, float]:
        counts: Counter[str] = Counter()
        for (status, device_class), count in self.clients.census().items():
            if status is ClientStatus.ACTIVE:
                counts[device_class or UNKNOWN_CLASS] += count
        return population_shares(counts.keys(), counts.values())


def fleet_fields(
    summary: RoundSummary, row: Mapping[str, Any], *, classes: DeviceClasses
) -> dict[str, Any]:
    """The fleet fields of a closed round's row (``{}`` with ``[telemetry]`` off); ``row``
    holds its byte totals (the shell's, where it counted them)."""
    report = summary.fleet
    if report is None:
        return {}
    asked, counted = summary.selected, summary.reported
    by_stage = {} if summary.secure is None else dict(summary.secure.dropped)
    remainder = asked - counted - sum(by_stage.values())
    if remainder > 0:
        by_stage[summary.phase.value] = by_stage.get(summary.phase.value, 0) + remainder
    accuracy = None
    if report.evaluations:
        evaluated = list(report.evaluations)
        examples, accuracies = (
            np.array(column, dtype=np.float64)
            for column in zip(*report.evaluations.values(), strict=True)
        )
        accuracy = class_accuracy(classes.classes_of(evaluated), examples, accuracies)
    return {
        **drop_fields(selected=asked, reported=counted, by_stage=by_stage, by_reason=report.drops),
        **timing_fields(report.round_trips, report.training, report.windows),
        **fairness_fields(classes.population(), classes.classes_of(summary.participants), accuracy),
        **bandwidth_fields(
            bytes_up=int(row.get("bytes_up") or 0),
            bytes_down=int(row.get("bytes_down") or 0),
            reported=counted,
            selected=asked,
        ),
    }
