"""Device profiles: when each simulated client's result arrives, or that it never does.

Every client belongs to a device class (compute speed, bandwidth, latency,
availability, dropout). Each round, a client's behaviour is drawn from a
generator seeded by (run seed, round, client), so a resumed run sees the
same fleet behave the same way. Times are virtual seconds; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.config import DeviceClass, DevicesSection
from shoal.coordinator.selection import Stream, round_rng

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


class DeviceFleet:
    """The simulated population: a device class and a base speed for each client."""

    def __init__(self, client_ids: Sequence[str], settings: DevicesSection, *, seed: int) -> None:
        self.settings = settings
        self.seed = seed
        rng = np.random.default_rng([seed, 0xDE71CE])
        shares = np.array([device.share for device in settings.classes], dtype=np.float64)
        picks = rng.choice(len(settings.classes), size=len(client_ids), p=shares / shares.sum())
        factors = rng.lognormal(0.0, _CLIENT_SPEED_SPREAD, size=len(client_ids))
        self._class: dict[str, DeviceClass] = {
            client: settings.classes[int(pick)]
            for client, pick in zip(client_ids, picks, strict=True)
        }
        self._factor: dict[str, float] = {
            client: float(factor) for client, factor in zip(client_ids, factors, strict=True)
        }

    def device_class(self, client_id: str) -> DeviceClass:
        return self._class[client_id]

    def available(self, round_number: int) -> list[str]:
        """The clients online and eligible at the start of ``round_number``."""
        rng = round_rng(seed=self.seed, round_number=round_number, stream=Stream.AVAILABILITY)
        draws = rng.random(len(self._class))
        return [
            client
            for client, draw in zip(self._class, draws, strict=True)
            if draw < self._class[client].availability
        ]

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
    ) -> Attempt:
        """When the client's update arrives, with how much work, or whether it drops."""
        rng, device = self._behaviour(client_id, round_number)
        dropped = bool(rng.random() < device.dropout)
        paper_straggler = bool(rng.random() < self.settings.straggler_fraction)
        paper_share = float(rng.uniform(_MIN_PARTIAL_SHARE, 1.0))
        speed = self._speed(client_id, device, rng)
        if dropped:
            return Attempt(client_id, None, epochs, dropped=True, straggler=False)
        window = deadline_at - start
        transfer = self._transfer_time(device, model_bytes)
        compute = epochs * num_examples / speed
        arrival = start + transfer + compute
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
            return Attempt(client_id, arrival, epochs, dropped=False, straggler=False)
        if self.settings.straggler_policy == "drop" or share < _MIN_PARTIAL_SHARE:
            return Attempt(client_id, arrival, epochs, dropped=False, straggler=True)
        return Attempt(client_id, partial_arrival, epochs * share, dropped=False, straggler=True)

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
        if rng.random() < device.dropout:
            return Attempt(client_id, None, 0.0, dropped=True, straggler=False)
        speed = self._speed(client_id, device, rng)
        download = device.latency_s + model_bytes * 8 / (device.download_mbps * 1e6)
        arrival = start + download + device.latency_s + _EVALUATION_COST * num_examples / speed
        return Attempt(client_id, arrival, 0.0, dropped=False, straggler=False)

    def _behaviour(
        self, client_id: str, round_number: int
    ) -> tuple[np.random.Generator, DeviceClass]:
        rng = round_rng(
            seed=self.seed,
            round_number=round_number,
            stream=Stream.DEVICE_BEHAVIOUR,
            client_id=client_id,
        )
        return rng, self._class[client_id]

    def _speed(self, client_id: str, device: DeviceClass, rng: np.random.Generator) -> float:
        jitter = (
            float(rng.lognormal(0.0, self.settings.speed_jitter))
            if self.settings.speed_jitter
            else 1.0
        )
        return device.examples_per_second * self._factor[client_id] / jitter

    @staticmethod
    def _transfer_time(device: DeviceClass, model_bytes: int) -> float:
        bits = model_bytes * 8
        return (
            2 * device.latency_s
            + bits / (device.download_mbps * 1e6)
            + bits / (device.upload_mbps * 1e6)
        )
