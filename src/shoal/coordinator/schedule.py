"""The schedule of a run: fit rounds, each followed by its evaluation when one is due."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shoal.tasks import Phase


@dataclass(frozen=True, slots=True)
class Play:
    """One round of the schedule: its number and what it asks of the clients."""

    round: int
    phase: Phase


def evaluation_due(round_number: int, *, every: int) -> bool:
    """Whether an evaluation round follows fit round ``round_number`` (every ``every`` rounds)."""
    return every > 0 and round_number % every == 0


def schedule(
    *,
    rounds: int,
    first_round: int = 1,
    evaluate_every: int = 0,
    stops_before: Callable[[int], bool] | None = None,
) -> Iterator[Play]:
    """Fit rounds ``first_round..rounds``, each followed by its evaluation when one is due.

    ``stops_before(round)`` is asked before each fit round, lazily: True ends the schedule.
    """
    for round_number in range(first_round, rounds + 1):
        if stops_before is not None and stops_before(round_number):
            return
        yield Play(round_number, Phase.FIT)
        if evaluation_due(round_number, every=evaluate_every):
            yield Play(round_number, Phase.EVALUATE)
