"""Cohort selection and per-round seeds, derived from (run seed, round, purpose).

Every random choice the coordinator makes comes from a generator seeded by
the run seed, the round number and a purpose code, never from carried state:
a resumed run makes exactly the choices an uninterrupted one would.

A seeded cohort is drawn by keyed-hash priorities (:func:`cohort_priorities`):
each candidate's priority is a keyed BLAKE2b hash of (seed, round, stream,
client id), and the cohort is the ``size`` candidates of lowest priority.
That is a uniform sample without replacement, it does not depend on the order
of the listing, and removing a candidate that was not drawn changes no other
draw: a run replayed without a client (unlearning) selects exactly the
cohorts a run that never had it would have selected.

One exception: under differential privacy a fit round's cohort is drawn by
:class:`PrivateSampler`, from the CSPRNG (a cohort that whoever knows the
seed can predict amplifies nothing), and exactly as the accountant assumes:
``fixed`` takes ``cohort`` of the eligible clients uniformly; ``poisson``
lets each eligible client join independently with probability
q = min(1, cohort / eligible), so the cohort's size is Binomial(eligible, q),
every sampled client's update is awaited (no over-selection), and the DP
mean divides by the expected size q * eligible. A Poisson cohort below the
quorum (an empty one included) closes the round at once, uncommitted and
unaccounted; the run goes on with the next round. Seeded DP cohorts remain
for simulations with ``privacy.secure_noise = false``, with a warning.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from shoal.config import Config
from shoal.core.errors import ConfigError
from shoal.privacy.budget import cohort_sampling_rate
from shoal.privacy.noise import NoiseSource
from shoal.privacy.run import RunPrivacy
from shoal.tasks import Phase

log = logging.getLogger("shoal.coordinator")


class Stream(enum.IntEnum):
    """Purpose codes that keep the random streams of one round independent."""

    SELECT_FIT = 1
    SELECT_EVALUATE = 2
    CLIENT_TRAINING = 3
    AVAILABILITY = 4
    DEVICE_BEHAVIOUR = 5
    SECURE_DROPOUT = 6
    EXAMINATION = 7  # which devices a simulated round examines
    # far from the others, so that a stream added beside them can never alias these
    RESELECT = 16  # the order in which a round asks replacements for dropped members
    DROPOUT_WAVE = 17  # simulation: who a dropout wave takes, and when a device drops


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


def _priority_hasher(*, seed: int, round_number: int, stream: Stream) -> hashlib.blake2b:
    """A BLAKE2b state keyed by (seed, round, stream), copied once per candidate."""
    key = hashlib.blake2b(f"{seed}/{round_number}/{int(stream)}".encode(), digest_size=32)
    return hashlib.blake2b(key=key.digest(), digest_size=8, person=b"shoal-cohort")


def cohort_priorities(
    candidates: Sequence[str], *, seed: int, round_number: int, stream: Stream
) -> npt.NDArray[np.uint64]:
    """Each candidate's priority in a seeded draw: a keyed hash of (seed, round, stream, id).

    A candidate's priority depends on nothing but its own id and the round's
    key, so it is the same whoever else is listed.
    """
    hasher = _priority_hasher(seed=seed, round_number=round_number, stream=stream)
    digests = bytearray()
    for client_id in candidates:
        state = hasher.copy()  # the keyed state is set up once, not per candidate
        state.update(client_id.encode())
        digests += state.digest()
    return np.frombuffer(bytes(digests), dtype=">u8").astype(np.uint64)


def select_cohort(
    candidates: Sequence[str],
    *,
    size: int,
    seed: int,
    round_number: int,
    stream: Stream = Stream.SELECT_FIT,
) -> tuple[str, ...]:
    """A uniform sample of ``size`` distinct candidates (all of them if fewer), in id order.

    The ``size`` candidates of lowest :func:`cohort_priorities` (ties, with
    odds of 2**-64, go to the smaller id): the result depends neither on the
    listing's order nor on the candidates that were not drawn.
    """
    ordered = sorted(set(candidates))
    if size >= len(ordered):
        return tuple(ordered)
    if size <= 0:
        return ()
    priorities = cohort_priorities(ordered, seed=seed, round_number=round_number, stream=stream)
    chosen = np.sort(np.argsort(priorities, kind="stable")[:size])
    return tuple(ordered[index] for index in chosen.tolist())


@dataclass(frozen=True, slots=True)
class Cohort:
    """A round's cohort, how many reports close the round early, and its DP denominator."""

    members: tuple[str, ...]
    target: int
    denominator: float | None = None  # Poisson under DP: q * population; None: the fixed one


class CohortSampler(Protocol):
    """How the engine draws a round's cohort from its candidates (one object per mode)."""

    def draw(
        self, candidates: Sequence[str], *, round_number: int, phase: Phase, size: int, target: int
    ) -> Cohort: ...


@dataclass(frozen=True, slots=True)
class SeededSampler:
    """``size`` of the candidates uniformly, from the run seed: reproducible, predictable."""

    seed: int

    def draw(
        self, candidates: Sequence[str], *, round_number: int, phase: Phase, size: int, target: int
    ) -> Cohort:
        stream = Stream.SELECT_FIT if phase is Phase.FIT else Stream.SELECT_EVALUATE
        members = select_cohort(
            candidates, size=size, seed=self.seed, round_number=round_number, stream=stream
        )
        return Cohort(members, target)


class PrivateSampler:
    """A DP run's fit cohorts, drawn as the accountant assumes (see the module docstring).

    Evaluation cohorts release nothing the accountant counts: they stay seeded.
    """

    def __init__(
        self, *, sampling: Literal["poisson", "fixed"], cohort: int, seed: int, secure: bool
    ) -> None:
        if cohort < 1:
            raise ConfigError(f"a DP round's cohort must hold at least one client, got {cohort}")
        self.sampling = sampling
        self.cohort = cohort
        self.secure = secure
        self._seed = seed
        self._evaluation = SeededSampler(seed)
        if not secure:
            log.warning(
                "DP cohorts are drawn from run.seed (privacy.secure_noise = false): whoever "
                "knows the seed knows who is sampled, so the accounted amplification by "
                "sampling does not hold; for simulations only"
            )

    @classmethod
    def of(cls, config: Config, privacy: RunPrivacy) -> PrivateSampler:
        """The sampler of a run's DP: its sampling and cohort; the CSPRNG unless seeded."""
        section = config.privacy
        return cls(
            sampling=section.sampling,
            cohort=privacy.cohort,
            seed=config.run.seed,
            secure=section.secure_noise,
        )

    def sampling_rate(self, population: int) -> float:
        """Each eligible client's chance to be drawn, as the accountant takes it."""
        return cohort_sampling_rate(cohort=self.cohort, population=population)

    def draw(
        self, candidates: Sequence[str], *, round_number: int, phase: Phase, size: int, target: int
    ) -> Cohort:
        if phase is not Phase.FIT:
            return self._evaluation.draw(
                candidates, round_number=round_number, phase=phase, size=size, target=target
            )
        ordered = sorted(candidates)
        if not ordered:
            return Cohort((), target)
        keys = self._uniforms(round_number, len(ordered))
        if self.sampling == "poisson":
            rate = self.sampling_rate(len(ordered))
            members = tuple(client for client, key in zip(ordered, keys, strict=True) if key < rate)
            return Cohort(members, len(members), denominator=rate * len(ordered))
        chosen = np.sort(np.argsort(keys, kind="stable")[: self.cohort])
        return Cohort(tuple(ordered[index] for index in chosen.tolist()), target)

    def _uniforms(self, round_number: int, count: int) -> npt.NDArray[np.float64]:
        if self.secure:
            return NoiseSource.secure().uniform(count)  # AES-256-CTR under a fresh OS key
        rng = round_rng(seed=self._seed, round_number=round_number, stream=Stream.SELECT_FIT)
        return rng.random(count)


def private_cohort(*, sampling: str, clients_per_round: int, over_selection: float) -> int:
    """What a DP fit round draws (fixed: with over-selection) or expects (Poisson: none)."""
    if sampling == "poisson":
        return clients_per_round
    return cohort_size(target=clients_per_round, over_selection=over_selection)
