"""Cohort selection and per-round seeds, derived from (run seed, round, purpose).

Every random choice the coordinator makes comes from a generator seeded by
the run seed, the round number and a purpose code, never from carried state:
a resumed run makes exactly the choices an uninterrupted one would.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from shoal.core.errors import ConfigError


class Stream(enum.IntEnum):
    """Purpose codes that keep the random streams of one round independent."""

    SELECT_FIT = 1
    SELECT_EVALUATE = 2
    CLIENT_TRAINING = 3
    AVAILABILITY = 4
    DEVICE_BEHAVIOUR = 5
    SECURE_DROPOUT = 6


def client_key(client_id: str) -> int:
    """A stable 63-bit integer for a client id, the same on every machine."""
    return int.from_bytes(hashlib.blake2b(client_id.encode(), digest_size=8).digest(), "big") >> 1


def round_rng(
    *, seed: int, round_number: int, stream: Stream, client_id: str | None = None
) -> np.random.Generator:
    """A generator for one purpose in one round (and optionally one client)."""
    entropy = [seed, round_number, int(stream)]
    if client_id is not None:
        entropy.append(client_key(client_id))
    return np.random.default_rng(entropy)


def client_seed(*, seed: int, round_number: int, client_id: str) -> int:
    """The seed a client trains with in a round: reproducible, distinct per client."""
    material = f"{seed}/{round_number}/{int(Stream.CLIENT_TRAINING)}/{client_id}".encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big") >> 1


def cohort_size(*, target: int, over_selection: float) -> int:
    """How many clients to select so that ``target`` of them likely report."""
    if target < 1:
        raise ConfigError(f"the target cohort must hold at least one client, got {target}")
    if over_selection < 1:
        raise ConfigError(f"over_selection must be >= 1.0, got {over_selection}")
    return math.ceil(target * over_selection - 1e-9)


def select_cohort(
    candidates: Sequence[str], *, size: int, rng: np.random.Generator
) -> tuple[str, ...]:
    """A uniform sample of ``size`` distinct candidates (all of them if fewer).

    The candidates are sorted first, so the result does not depend on the
    order in which the shell listed them.
    """
    ordered = sorted(candidates)
    if size >= len(ordered):
        return tuple(ordered)
    chosen = rng.choice(len(ordered), size=size, replace=False)
    return tuple(ordered[index] for index in sorted(chosen.tolist()))
