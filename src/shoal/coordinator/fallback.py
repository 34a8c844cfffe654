"""What a round does when more than a share of its cohort drops: re-select, extend, or abort.

A round's cohort is over-selected for the usual losses; a wave of drops
(an outage, a bad release, a storm of low batteries) can still take more
than half of it, and the round would then wait for its deadline only to
miss its quorum. The job chooses (``[round] drop_fallback``) what the
engine does the moment more than ``drop_fallback_at`` of the round's
original cohort has dropped (a ``ClientFailed`` each: a client's failure report, a
simulated device that dropped):

- ``reselect``: ask a replacement for every dropped member, from the
  eligible clients the round has not asked yet (by keyed-hash priority
  under the run seed, as a cohort is drawn), and for every member that
  drops after that, as long as at least ``drop_reselect_min_left`` of the
  deadline is left: a replacement then has at least that share of the
  time the first cohort had;
- ``extend``: move the deadline once, by ``drop_extend_s`` (unset: one more
  ``deadline_s``), so that slow members and late check-ins can still count;
- ``abort``: close the round at once, uncommitted, and keep the model;
- ``none``: wait for the deadline, as a round without a fallback does.

Every case is told to the run layer (the round's summary carries a
:class:`~shoal.coordinator.events.FallbackReport`), which puts it in the
round's metrics row and fires a ``cohort_dropped`` alert.

Two kinds of round cannot take every fallback. A secure round (SecAgg+ or
CKKS) fixes its cohort when it starts (SecAgg+ shares masks among exactly
those who advertised keys), and its stages keep their own deadlines: there,
``reselect`` and ``extend`` abort the round when the members left can no
longer reach the quorum, and otherwise let the protocol's own dropout
recovery go on (``none``). A fit round under differential privacy is
sampled exactly as the accountant assumes, so it never adds members:
``reselect`` extends its deadline instead.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shoal.coordinator.events import FallbackReport
from shoal.coordinator.selection import Stream, cohort_priorities
from shoal.core.errors import ConfigError

if TYPE_CHECKING:  # the books import this module's settings
    from shoal.coordinator.rounds import RoundBooks

log = logging.getLogger("shoal.coordinator")


class FallbackKind(enum.Enum):
    """What a round does once too much of its cohort has dropped."""

    RESELECT = "reselect"
    EXTEND = "extend"
    ABORT = "abort"
    NONE = "none"


SECURE_NOTE = "a secure round's cohort is fixed when it starts"
PRIVATE_NOTE = "a DP round's cohort is sampled as the accountant assumes: no replacements"


@dataclass(frozen=True, slots=True)
class DropFallback:
    """The job's fallback: ``[round] drop_fallback`` and its parameters (module docstring)."""

    kind: FallbackKind = FallbackKind.RESELECT
    at: float = 0.5  # triggers once more than this share of the cohort has dropped
    extend_s: float | None = None  # None: one more deadline
    reselect_min_left: float = 0.5  # of the deadline, left for a replacement to train

    def __post_init__(self) -> None:
        if not 0 <= self.at < 1:
            raise ConfigError(f"drop_fallback_at must be in [0, 1), got {self.at}")
        if self.extend_s is not None and not (math.isfinite(self.extend_s) and self.extend_s > 0):
            raise ConfigError(f"drop_extend_s must be a positive number, got {self.extend_s}")
        if not 0 < self.reselect_min_left <= 1:
            raise ConfigError(
                f"drop_reselect_min_left must be in (0, 1], got {self.reselect_min_left}"
            )

    def triggered(self, *, dropped: int, cohort: int) -> bool:
        """Whether ``dropped`` members of a cohort of ``cohort`` are more than the threshold."""
        return cohort > 0 and dropped > self.at * cohort

    def for_round(
        self, *, secure: bool, private: bool, reachable: bool
    ) -> tuple[FallbackKind, str | None]:
        """The fallback a round can carry out, and why it is not the configured one.

        ``reachable``: the members still in the round can reach its quorum.
        """
        kind = self.kind
        if secure and kind in (FallbackKind.RESELECT, FallbackKind.EXTEND):
            if reachable:
                return FallbackKind.NONE, f"{SECURE_NOTE}: its own dropout recovery goes on"
            return FallbackKind.ABORT, f"{SECURE_NOTE} and can no longer reach the quorum"
        if private and kind is FallbackKind.RESELECT:
            return FallbackKind.EXTEND, PRIVATE_NOTE
        return kind, None

    def deadline_extension(self, deadline_s: float) -> float:
        """How far an ``extend`` moves a round's deadline."""
        return deadline_s if self.extend_s is None else self.extend_s

    def time_for_replacement(self, *, left_s: float, deadline_s: float) -> bool:
        """Whether ``left_s`` before the deadline still lets a replacement train."""
        return left_s >= self.reselect_min_left * deadline_s


@dataclass(slots=True)
class FallbackBooks:
    """The fallback a round took, kept up to date while it goes on."""

    kind: FallbackKind
    configured: FallbackKind
    dropped: int
    cohort: int
    at: float
    note: str | None = None
    replacements: int = 0
    extended_by_s: float = 0.0
    pool: list[str] | None = None  # reselect: the candidates not asked yet, in draw order
    replaced_drops: int = 0  # reselect: the drops a replacement was sought for

    def report(self) -> FallbackReport:
        return FallbackReport(
            kind=self.kind.value,
            configured=self.configured.value,
            dropped=self.dropped,
            cohort=self.cohort,
            at=self.at,
            replacements=self.replacements,
            extended_by_s=self.extended_by_s,
            note=self.note,
        )


@dataclass(frozen=True, slots=True)
class FallbackStep:
    """What the engine does after a drop: ask ``replacements``, move the deadline to
    ``deadline_at``, or close the round uncommitted for the reason ``abort``."""

    replacements: tuple[str, ...] = ()
    deadline_at: float | None = None
    abort: str | None = None


def after_drop(
    current: RoundBooks,
    fallback: DropFallback,
    *,
    deadline_s: float,
    quorum: int,
    private: bool,
    seed: int,
    now: float,
) -> FallbackStep:
    """The fallback's step after a member of ``current`` dropped (the books are updated).

    ``quorum``: the fewest members the round needs (a secure round's own floor
    included); ``private``: a DP fit round.
    """
    books = current.fallback
    if books is not None:  # taken already: re-selection goes on replacing each drop
        if books.kind is not FallbackKind.RESELECT:
            return FallbackStep()
        return _reselect(current, books, fallback, deadline_s=deadline_s, seed=seed, now=now)
    dropped = len(current.failed)
    if not fallback.triggered(dropped=dropped, cohort=current.initial):
        return FallbackStep()
    kind, note = fallback.for_round(
        secure=current.secure is not None,
        private=private,
        reachable=len(current.cohort) - dropped >= quorum,
    )
    books = current.fallback = FallbackBooks(
        kind, fallback.kind, dropped, len(current.cohort), at=now, note=note
    )
    log.warning(
        "%d of the %d clients of round %d (%s) have dropped: fallback %s",
        dropped,
        len(current.cohort),
        current.number,
        current.phase.value,
        kind.value,
    )
    if kind is FallbackKind.ABORT:
        return FallbackStep(
            abort=f"{dropped} of the {books.cohort} clients of the cohort dropped (more than "
            f"{fallback.at:.0%}): the round is aborted and the model kept"
        )
    if kind is FallbackKind.EXTEND:
        assert current.deadline_at is not None  # a plain round has one
        books.extended_by_s = fallback.deadline_extension(deadline_s)
        current.deadline_at += books.extended_by_s
        return FallbackStep(deadline_at=current.deadline_at)
    if kind is FallbackKind.RESELECT:
        return _reselect(current, books, fallback, deadline_s=deadline_s, seed=seed, now=now)
    return FallbackStep()


def _reselect(
    current: RoundBooks,
    books: FallbackBooks,
    fallback: DropFallback,
    *,
    deadline_s: float,
    seed: int,
    now: float,
) -> FallbackStep:
    """A replacement for every member dropped and not yet replaced, while time allows."""
    assert current.deadline_at is not None
    left = current.deadline_at - now
    if not fallback.time_for_replacement(left_s=left, deadline_s=deadline_s):
        books.note = (
            f"no replacement asked at {now:.6g}: {left:.6g}s left, a replacement needs "
            f"{fallback.reselect_min_left:.0%} of the {deadline_s:.6g}s deadline"
        )
        return FallbackStep()
    if books.pool is None:  # ordered once, by keyed-hash priority as a seeded cohort is drawn
        unasked = sorted(set(current.candidates) - current.cohort)
        priorities = cohort_priorities(
            unasked, seed=seed, round_number=current.number, stream=Stream.RESELECT
        )
        order = np.argsort(priorities, kind="stable").tolist()
        books.pool = [unasked[index] for index in order]
    count = len(current.failed) - books.replaced_drops
    chosen, books.pool = books.pool[:count], books.pool[count:]
    books.replaced_drops += count
    if len(chosen) < count:
        books.note = "the eligible clients not asked yet ran out"
    current.cohort = current.cohort | frozenset(chosen)
    books.replacements += len(chosen)
    return FallbackStep(replacements=tuple(chosen))


def candidates_wanted(*, cohort: int, fallback: DropFallback, secure: bool = False) -> int:
    """How many eligible clients a live coordinator lists for a round of ``cohort``.

    Re-selection needs a reserve of clients the round has not asked: as
    many again as the cohort (a secure round never re-selects: none).
    """
    return 2 * cohort if fallback.kind is FallbackKind.RESELECT and not secure else cohort
