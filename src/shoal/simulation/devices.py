"""Device profiles: when each simulated client's result arrives, or that it never does.

Every client belongs to a device class (compute speed, bandwidth, latency,
availability, dropout, and the states of :mod:`shoal.simulation.device_states`).
Each round, a client's behaviour is drawn from a generator seeded by (run
seed, round, client), so a resumed run sees the same fleet behave the same
way. Times are virtual seconds; nothing sleeps.

The fleet keeps per device only its class and base speed (two arrays); the
rest is computed for the devices the simulator examines, so a round costs
the same at a million devices as at ten thousand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shoal.config import DeviceClass, DevicesSection
from shoal.coordinator.eligibility import DeviceFacts
from shoal.coordinator.selection import Stream, round_rng
from shoal.core.device import DeviceState
from shoal.simulation.device_states import (
    DeviceStateModel,
    Draw,
    Indices,
    Mask,
    class_codes,
    hashed_uniform,
    simulated_state,
)
from shoal.simulation.dropouts import transfer_time
from shoal.telemetry.fleet import population_shares

_MIN_PARTIAL_SHARE = 0.05
_CLIENT_SPEED_SPREAD = 0.25
_EVALUATION_COST = 1 / 3  # a forward pass costs about a third of a training step


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one client does with one task in one round."""

    client_id: str
    arrives_at: float | None
    epochs: float
    dropped: bool
    straggler: bool
    busy_s: float = 0.0  # the virtual seconds the device computed (what drains its battery)
    train_s: float = 0.0  # the virtual seconds its training (or evaluation) takes, all of it


class DeviceFleet:
    """The simulated population: a device class and a base speed for each client.

    ``position`` maps a client id to its index in ``client_ids`` (the
    population's names have one that needs no table).
    """

    def __init__(
        self,
        client_ids: Sequence[str],
        settings: DevicesSection,
        *,
        seed: int,
        position: Callable[[str], int] | None = None,
    ) -> None:
        self.settings = settings
        self.seed = seed
        self.client_ids = client_ids
        rng = np.random.default_rng([seed, 0xDE71CE])
        shares = np.array([device.share for device in settings.classes], dtype=np.float64)
        picks = rng.choice(len(settings.classes), size=len(client_ids), p=shares / shares.sum())
        self._factors: npt.NDArray[np.float64] = rng.lognormal(
            0.0, _CLIENT_SPEED_SPREAD, size=len(client_ids)
        )
        self._codes = class_codes(picks)
        self._population: dict[str, float] | None = None
        self._availability = np.array([device.availability for device in settings.classes])
        if position is None:
            table = {client: index for index, client in enumerate(client_ids)}
            position = table.__getitem__
        self.position = position
        self.states = DeviceStateModel(settings, self._codes, seed=seed)

    def __len__(self) -> int:
        return len(self._codes)

    def device_class(self, client_id: str) -> DeviceClass:
        return self.settings.classes[int(self._codes[self.position(client_id)])]

    def classes_of(self, clients: Sequence[str]) -> list[str]:
        """The device class name of each of ``clients`` (the run layer's fairness asks, each
        round): their codes looked up at once."""
        if not clients:
            return []
        positions = np.fromiter(map(self.position, clients), np.int64, len(clients))
        names = [device.name for device in self.settings.classes]
        return [names[code] for code in self._codes[positions].tolist()]

    def population(self) -> dict[str, float]:
        """Each device class's share of the fleet (as drawn, not as configured)."""
        if self._population is None:  # the classes are drawn once: counted once
            counts = np.bincount(self._codes, minlength=len(self.settings.classes))
            names = [device.name for device in self.settings.classes]
            self._population = population_shares(names, counts.tolist())
        return dict(self._population)

    def available(self, round_number: int) -> list[str]:
        """The clients online at the start of ``round_number``, drawn for the whole fleet."""
        return [self.client_ids[index] for index in self.available_indices(round_number).tolist()]

    def available_indices(self, round_number: int) -> Indices:
        """The positions of the clients :meth:`available` lists."""
        rng = round_rng(seed=self.seed, round_number=round_number, stream=Stream.AVAILABILITY)
        online = rng.random(len(self._codes)) < self._availability[self._codes]
        indices: Indices = np.flatnonzero(online).astype(np.int64)
        return indices

    def online(self, round_number: int, indices: Indices) -> Mask:
        """Which of devices ``indices`` are online in ``round_number`` (one hashed draw each)."""
        draws = hashed_uniform(seed=self.seed, draw=Draw.ONLINE, indices=indices, slot=round_number)
        online: Mask = draws < self._availability[self._codes[indices]]
        return online

    def facts(self, indices: Indices, *, at: float) -> DeviceFacts:
        """What devices ``indices`` report at virtual time ``at``."""
        return self.states.facts(indices, at=at)

    def device_state(self, client_id: str, *, at: float) -> DeviceState:
        """What one client reports at virtual time ``at`` (at enrollment)."""
        index = np.array([self.position(client_id)], dtype=np.int64)
        return simulated_state(self.facts(index, at=at), 0)

    def drain(self, client_id: str, *, at: float, busy_s: float) -> float:
        """The battery ``busy_s`` seconds of training from ``at`` drains (0 without states)."""
        index = self.position(client_id)
        states = self.settings.classes[int(self._codes[index])].states
        if states is None or busy_s <= 0:
            return 0.0
        amount = round(states.training_drain_per_hour * busy_s / 3600.0, 9)
        self.states.drain(index, at=at, amount=amount)
        return amount

    def replay_drain(self, client_id: str, *, at: float, amount: float) -> None:
        """A drain recorded earlier in the run (a resumed run replays its rows)."""
        self.states.drain(self.position(client_id), at=at, amount=amount)

    def plan_fit(
        self,
        client_id: str,
        *,
        round_number: int,
        start: float,
        deadline_at: float,
        num_examples: int,
        epochs: float,
        model_bytes: int,
        upload_bytes: int | None = None,
    ) -> Attempt:
        """When the client's update arrives, with how much work, or whether it drops
        (``upload_bytes``: its update's upload, where a codec makes it other than the
        model's ``model_bytes``)."""
        rng, device = self._behaviour(client_id, round_number)
        dropped = paper_straggler = False
        paper_share = 1.0
        if rng is not None:
            dropped = bool(rng.random() < device.dropout)
            paper_straggler = bool(rng.random() < self.settings.straggler_fraction)
            paper_share = float(rng.uniform(_MIN_PARTIAL_SHARE, 1.0))
        speed = self._speed(client_id, device, rng)
        if dropped:
            return Attempt(client_id, None, epochs, dropped=True, straggler=False)
        window = deadline_at - start
        transfer = transfer_time(device, model_bytes=model_bytes, upload_bytes=upload_bytes)
        compute = epochs * num_examples / speed
        arrival = start + transfer + compute
        busy = min(compute, max(window - transfer, 0.0)) if self._drains(client_id) else 0.0
        if paper_straggler:
            # the FedProx paper's systems heterogeneity: only part of the work fits the deadline
            arrival, share, partial_arrival = (
                deadline_at + 0.5 * window,
                paper_share,
                start + 0.99 * window,
            )
        elif arrival > deadline_at:
            share = (window - transfer) * 0.99 / compute
            partial_arrival = start + transfer + share * compute
        else:
            return Attempt(client_id, arrival, epochs, False, False, busy_s=busy, train_s=compute)
        if self.settings.straggler_policy == "drop" or share < _MIN_PARTIAL_SHARE:
            return Attempt(client_id, arrival, epochs, False, True, busy_s=busy, train_s=compute)
        return Attempt(
            client_id, partial_arrival, epochs * share, False, True, busy, share * compute
        )

    def _drains(self, client_id: str) -> bool:
        return self.device_class(client_id).states is not None

    def plan_evaluate(
        self,
        client_id: str,
        *,
        round_number: int,
        start: float,
        num_examples: int,
        model_bytes: int,
    ) -> Attempt:
        """When the client's evaluation arrives, or whether it drops."""
        rng, device = self._behaviour(client_id, round_number)
        if rng is not None and rng.random() < device.dropout:
            return Attempt(client_id, None, 0.0, dropped=True, straggler=False)
        speed = self._speed(client_id, device, rng)
        download = device.latency_s + model_bytes * 8 / (device.download_mbps * 1e6)
        evaluation = _EVALUATION_COST * num_examples / speed
        arrival = start + download + device.latency_s + evaluation
        return Attempt(client_id, arrival, 0.0, dropped=False, straggler=False, train_s=evaluation)

    def _behaviour(
        self, client_id: str, round_number: int
    ) -> tuple[np.random.Generator | None, DeviceClass]:
        """The client's device class, and the generator of its draws in the round: None where
        no draw could decide anything (no dropout, no paper stragglers, no speed jitter: each
        draw would be compared with 0 or not made), since making one cost more than the plan."""
        device = self.device_class(client_id)
        if not (device.dropout or self.settings.straggler_fraction or self.settings.speed_jitter):
            return None, device
        rng = round_rng(
            seed=self.seed,
            round_number=round_number,
            stream=Stream.DEVICE_BEHAVIOUR,
            client_id=client_id,
        )
        return rng, device

    def _speed(self, client_id: str, device: DeviceClass, rng: np.random.Generator | None) -> float:
        jitter = 1.0
        if self.settings.speed_jitter:
            assert rng is not None  # made wherever a jitter is drawn
            jitter = float(rng.lognormal(0.0, self.settings.speed_jitter))
        factor = float(self._factors[self.position(client_id)])
        return device.examples_per_second * factor / jitter
