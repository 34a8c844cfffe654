"""Batched heartbeat ingest: sightings queued in memory and written by count and by time."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from types import TracebackType

from shoal.core.errors import RegistryError
from shoal.registry.clients import ClientRegistry, Heartbeat


class HeartbeatBuffer:
    """Collects heartbeats and writes them in batches, by count and by time (thread-safe).

    >>> buffer = HeartbeatBuffer(registry, max_items=1000, max_age_s=1.0)  # doctest: +SKIP
    >>> buffer.add(heartbeat)  # doctest: +SKIP

    A heartbeat is written at once unless the last write was less than
    ``max_age_s`` ago on ``clock`` (then with the next heartbeat after that),
    and a batch is written whenever ``max_items`` are queued: at most one
    write a second under load, and a lone check-in is never held for long
    (by count alone, two clients checking in every second waited 8 minutes
    for their sightings to be written, and aged out of selection meanwhile).
    The clock is injected; no thread wakes up to flush.

    Heartbeats are soft state: if a flush fails, its batch is dropped and the
    error raised; each client's next heartbeat restores what was lost.
    """

    def __init__(
        self,
        registry: ClientRegistry,
        *,
        max_items: int = 1000,
        max_age_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_items < 1:
            raise RegistryError(f"max_items must be >= 1, got {max_items}")
        if not (math.isfinite(max_age_s) and max_age_s > 0):
            raise RegistryError(f"max_age_s must be a finite positive number, got {max_age_s}")
        self.registry = registry
        self.max_items = max_items
        self.max_age_s = max_age_s
        self.clock = clock
        self._pending: list[Heartbeat] = []
        self._lock = threading.Lock()
        self._written_at = -math.inf  # on ``clock``: when the last batch was taken
        self.flushed = 0  # heartbeats handed to the registry so far

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, heartbeat: Heartbeat) -> int:
        """Queue a heartbeat; writes the batch (returning the rows written) when one is due."""
        with self._lock:
            self._pending.append(heartbeat)
            since = self.clock() - self._written_at
            # a clock that went back (a wall clock reset) writes at once rather than never
            if len(self._pending) < self.max_items and 0 <= since < self.max_age_s:
                return 0
            batch = self._take()
        return self._write(batch)

    def flush(self) -> int:
        """Write whatever is queued now; returns the rows written."""
        with self._lock:
            batch = self._take()
        return self._write(batch)

    def _take(self) -> list[Heartbeat]:
        batch, self._pending = self._pending, []
        if batch:
            self._written_at = self.clock()
        return batch

    def _write(self, batch: list[Heartbeat]) -> int:
        written = self.registry.record_heartbeats(batch)
        with self._lock:
            self.flushed += len(batch)
        return written

    def __enter__(self) -> HeartbeatBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.flush()
