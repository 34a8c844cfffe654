"""Simulated drops beyond the device classes' own: dropout waves, and when a device drops.

A dropout wave (``[[devices.dropout_waves]] round = 3, dropout = 0.6``) is
an outage or a bad release: in that round every asked device also drops
with the wave's probability, on top of its class's dropout, in fit and
evaluation alike.

A device that drops does so while it works on its task: the coordinator
learns it (a failure report, a lost connection) at a time drawn uniformly
within the time the task would have taken the device's class (its
transfers and its training at the class's nominal speed), and never after
the deadline. The round's fallback (:mod:`shoal.coordinator.fallback`)
acts on these times, as a live coordinator acts on failure reports.

Both draws come from a generator seeded by (run seed, round, client), so a
resumed run sees the same drops at the same times.
"""

from __future__ import annotations

from collections.abc import Sequence

from shoal.config import DeviceClass, DropoutWave
from shoal.coordinator.selection import Stream, round_rng

DROPPED_REASON = "the device dropped out"
"""The failure a simulated drop reports, as a round's failures count it."""


def _draws(*, seed: int, round_number: int, client_id: str) -> tuple[float, float]:
    rng = round_rng(
        seed=seed, round_number=round_number, stream=Stream.DROPOUT_WAVE, client_id=client_id
    )
    wave, moment = rng.random(2).tolist()
    return float(wave), float(moment)


def wave_dropout(waves: Sequence[DropoutWave], round_number: int) -> float:
    """The extra dropout a wave brings to ``round_number`` (0.0 without one)."""
    return next((wave.dropout for wave in waves if wave.round == round_number), 0.0)


def dropped_in_wave(
    waves: Sequence[DropoutWave], *, seed: int, round_number: int, client_id: str
) -> bool:
    """Whether the dropout wave of ``round_number``, if any, takes ``client_id``."""
    dropout = wave_dropout(waves, round_number)
    if dropout <= 0.0:
        return False
    wave, _ = _draws(seed=seed, round_number=round_number, client_id=client_id)
    return wave < dropout


def task_duration(
    device: DeviceClass,
    *,
    num_examples: int,
    epochs: float,
    model_bytes: int,
    upload_bytes: int | None = None,
) -> float:
    """How long a task takes a device of its class, nominally: both transfers and the work
    (``upload_bytes``: the upload, where a codec makes it other than ``model_bytes``)."""
    transfers = transfer_time(device, model_bytes=model_bytes, upload_bytes=upload_bytes)
    return transfers + epochs * num_examples / device.examples_per_second


def transfer_time(
    device: DeviceClass, *, model_bytes: int, upload_bytes: int | None = None
) -> float:
    """Seconds a device of its class takes to download the model and upload its result (the
    model's size again, or ``upload_bytes``), each way with its latency."""
    up = model_bytes if upload_bytes is None else upload_bytes
    return (
        2 * device.latency_s
        + model_bytes * 8 / (device.download_mbps * 1e6)
        + up * 8 / (device.upload_mbps * 1e6)
    )


def drop_time(
    *,
    seed: int,
    round_number: int,
    client_id: str,
    start: float,
    deadline_at: float,
    duration: float,
) -> float:
    """When the coordinator learns that ``client_id`` dropped: within its task, by the deadline."""
    _, moment = _draws(seed=seed, round_number=round_number, client_id=client_id)
    return min(start + moment * max(0.0, duration), deadline_at)
