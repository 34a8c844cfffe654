"""Record-level DP-SGD in a simulation: each client's steps, and the epsilon of the most exposed.

Every fit of a client with DP-SGD reports its steps, sampling rate, noise
multiplier and delta. A client's record-level epsilon composes all its
steps (same sampling rate and noise every fit, so the steps simply add up);
the run reports the largest over the clients, the one whose records were
used most.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.client.dp_sgd import record_level_epsilon


@dataclass(slots=True)
class RecordLevelLedger:
    """DP-SGD steps per client; the run's record-level epsilon at the end."""

    steps: dict[str, int] = field(default_factory=dict)
    settings: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def add(self, client_id: str, metrics: Mapping[str, float]) -> None:
        if "dp_sgd_steps" not in metrics:
            return
        self.steps[client_id] = self.steps.get(client_id, 0) + int(metrics["dp_sgd_steps"])
        self.settings[client_id] = (
            float(metrics["dp_sgd_noise_multiplier"]),
            float(metrics["dp_sgd_sampling_rate"]),
            float(metrics["dp_sgd_delta"]),
        )

    def add_all(self, results: Iterable[tuple[str, Mapping[str, float]]]) -> None:
        for client_id, metrics in results:
            self.add(client_id, metrics)

    def summary_fields(self) -> dict[str, Any]:
        if not self.steps:
            return {}
        worst, worst_delta = 0.0, 0.0
        seen: dict[tuple[float, float, float, int], float] = {}
        for client, steps in self.steps.items():
            noise, rate, delta = self.settings[client]
            key = (noise, rate, delta, steps)
            if key not in seen:
                seen[key] = record_level_epsilon(
                    noise_multiplier=noise, sampling_rate=min(rate, 1.0), steps=steps, delta=delta
                )
            if seen[key] >= worst:
                worst, worst_delta = seen[key], delta
        return {
            "record_level_epsilon": worst,
            "record_level_delta": worst_delta,
            "record_level_accounting": "rdp/poisson/improved, per client, the largest",
        }
