"""Who a networked round may choose from: eligible in the registry, seen lately, not barred.

A client is a candidate while its last sighting (an enrollment, a check-in
or a heartbeat) is within ``SEEN_WITHIN``. Sightings are batched by a
:class:`~shoal.registry.HeartbeatBuffer`; the candidates are read only after
what it holds has been written, so a client that checked in a moment ago
counts at once. After a restart, whatever the registry last recorded of a
client is older than the outage: the first check-ins after it are what makes
the clients candidates again, and the first round starts with them.
:meth:`Candidates.fleet` counts the clients seen lately and the eligible
ones, for the coordinator's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from shoal.registry import ClientRegistry, HeartbeatBuffer, SelectionCriteria, Selector

SEEN_WITHIN = timedelta(minutes=2)
"""How recent a client's last sighting must be for it to be selected."""


@dataclass(frozen=True, slots=True)
class Fleet:
    """How many clients were seen within :data:`SEEN_WITHIN`, and how many a round could
    select (eligible under the round's policy, not barred)."""

    connected: int
    eligible: int


@dataclass(frozen=True, slots=True)
class Candidates:
    """The driver's ``candidates``: up to ``wanted`` eligible clients, in random order.

    ``criteria`` gives the eligibility policy of the round being filled (the
    run layer's :meth:`~shoal.coordinator.run.Run.selection_criteria`);
    ``barred`` names the clients never to select (the run layer's
    :meth:`~shoal.coordinator.run.Run.barred`); ``clock`` gives seconds since
    the epoch, the time that sightings are recorded in. Under DP the
    candidates are the ``whole_population`` of eligible clients (the run layer
    samples the cohort from it and accounts for its size).
    """

    selector: Selector
    criteria: Callable[[], SelectionCriteria]
    heartbeats: HeartbeatBuffer
    wanted: int
    barred: Callable[[], set[str]]
    clock: Callable[[], float] = time.time
    whole_population: bool = False

    def __call__(self) -> list[str]:
        self.heartbeats.flush()  # a check-in still in the buffer is a sighting all the same
        now = datetime.fromtimestamp(self.clock(), UTC)
        criteria = self.criteria()
        if self.whole_population:
            return self.selector.population(criteria, now=now)
        barred = self.barred()
        drawn = self.selector.select(criteria, self.wanted + len(barred), now=now)
        return [client for client in drawn if client not in barred][: self.wanted]

    def fleet(self) -> Fleet:
        """The clients seen lately, and the eligible ones (two counts; nothing is listed)."""
        self.heartbeats.flush()
        now = datetime.fromtimestamp(self.clock(), UTC)
        registry: ClientRegistry = self.selector.registry
        eligible = self.selector.count(self.criteria(), now=now, excluding=self.barred())
        return Fleet(registry.count(seen_since=now - SEEN_WITHIN), eligible)
