"""Driving the live driver in tests: its round-closed callback from a persist and an on-round."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from shoal.coordinator.driver import OnClosed
from shoal.coordinator.events import CommitVersion, RoundSummary


def closing(
    persist: Callable[[CommitVersion], Awaitable[None]] | None = None,
    on_round: Callable[[RoundSummary], object] | None = None,
) -> OnClosed:
    """The driver's ``on_closed``: ``persist`` each new model, then tell ``on_round``."""

    async def on_closed(summary: RoundSummary, commit: CommitVersion | None) -> None:
        if commit is not None and persist is not None:
            await persist(commit)
        if on_round is not None:
            on_round(summary)

    return on_closed
