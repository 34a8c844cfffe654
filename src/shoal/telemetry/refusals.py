"""Refused requests: counted for Prometheus, logged with a per-peer rate limit.

Any peer can send a service bad input as fast as it likes; one log line per
refusal would let it fill the disk and bury the lines that matter. A
:class:`RefusalLog` writes at most ``lines_per_window`` refusals of one peer
host per window (a minute by default), then one line saying it is
suppressing that peer, and, at the peer's first refusal after the window,
one line saying how many it suppressed. Every refusal is counted, logged
or not, in its :attr:`~RefusalLog.counter`,
``shoal_refused_requests_total{rpc, reason}``: the coordinator's
(:class:`~shoal.telemetry.prometheus.CoordinatorMetrics`, served on
``/metrics``), or one of the log's own. The clock is injected, so tests
drive the windows without sleeping.

>>> refusals = RefusalLog(logging.getLogger("shoal.coordinator"))  # doctest: +SKIP
>>> refusals.refused(
...     peer="ipv4:10.0.0.7:5123", rpc="Enroll", reason="malformed", detail="not protobuf"
... )  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, Counter

from shoal.core.errors import ConfigError
from shoal.telemetry.prometheus import refused_requests


@dataclass(slots=True)
class _Window:
    """What one peer host did in its current window."""

    started: float
    logged: int = 0
    suppressed: int = 0


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:10.0.0.7:5123`` -> ``10.0.0.7``;
    ``ipv6:%5B::1%5D:5123``, as gRPC writes an IPv6 peer, percent-encoded -> ``::1``).

    Each connection comes from a new port, so the limit is kept per host;
    a string of another form is kept whole.
    """
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return unquote(address).rpartition(":")[0].strip("[]")
    return peer


class RefusalLog:
    """Count every refusal; log the first few of each peer host per window, then a summary."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        lines_per_window: int = 5,
        window_s: float = 60.0,
        max_peers: int = 10_000,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
        counter: Counter | None = None,
    ) -> None:
        if lines_per_window < 1 or max_peers < 1 or not window_s > 0:
            raise ConfigError(
                "lines_per_window and max_peers must be >= 1 and window_s > 0, got "
                f"{lines_per_window}, {max_peers} and {window_s}"
            )
        self.logger = logger
        self.lines_per_window = lines_per_window
        self.window_s = window_s
        self.max_peers = max_peers
        self.level = level
        self.clock = clock
        self.counter = refused_requests(CollectorRegistry()) if counter is None else counter
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def refused(self, *, peer: str, rpc: str, reason: str, detail: str) -> None:
        """Count a refusal of ``rpc`` from ``peer``; log it unless that peer is over its limit."""
        self.counter.labels(rpc=rpc, reason=reason).inc()
        host = peer_host(peer)
        window = self._window(host, self.clock())
        if window.logged < self.lines_per_window:
            window.logged += 1
            self.logger.log(self.level, "%s from %s refused: %s (%s)", rpc, host, reason, detail)
            return
        if window.suppressed == 0:
            self.logger.log(
                self.level,
                "suppressing further refusals from %s for up to %g s (they are still counted)",
                host,
                self.window_s,
            )
        window.suppressed += 1

    def _window(self, host: str, now: float) -> _Window:
        """The current window of ``host``: a new one when its last has ended."""
        window = self._windows.get(host)
        if window is not None and now - window.started < self.window_s:
            self._windows.move_to_end(host)
            return window
        if window is not None:
            self._summarize(host, window)
        self._windows[host] = window = _Window(started=now)
        self._windows.move_to_end(host)
        while len(self._windows) > self.max_peers:  # forget the peer heard from longest ago
            oldest, dropped = self._windows.popitem(last=False)
            self._summarize(oldest, dropped)
        return window

    def _summarize(self, host: str, window: _Window) -> None:
        if window.suppressed:
            self.logger.info(
                "suppressed %d more refusals from %s in %g s",
                window.suppressed,
                host,
                self.window_s,
            )
