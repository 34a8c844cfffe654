"""An asyncio event loop in virtual time: when nothing is ready, its clock jumps to the next timer.

Sleeps, ``wait_for`` timeouts and ``call_at`` timers all run on ``loop.time()``,
so code that waits minutes runs in no time and in a deterministic order,
unchanged. Only work that completes by itself counts: a thread or a socket
that is still busy when the loop has nothing else to do is not waited for.

>>> with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:  # doctest: +SKIP
...     runner.run(asyncio.sleep(3600))  # returns at once, an hour later
"""

from __future__ import annotations

import asyncio
import math
import selectors
from typing import Any


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls for real I/O; when none is ready, moves the loop's clock by the wait asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None or self.loop is None:  # no timer at all: only I/O can wake the loop
            return super().select(timeout)
        # one ulp past the sum: rounding must never leave the timer due a hair later, forever
        self.loop.now = math.nextafter(self.loop.now + timeout, math.inf)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is virtual (it starts at ``start``)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now


def run_in_virtual_time(main: Any, *, start: float = 1_000.0) -> Any:
    """Run the coroutine ``main`` to its end on a new :class:`VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(start)) as runner:
        return runner.run(main)
