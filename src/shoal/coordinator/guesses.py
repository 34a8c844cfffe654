"""Online guessing of enrollment tokens, throttled by the address it comes from.

Each Enroll request that needs a token names one, and the answer tells whether it is good:
a bad one (unknown, used up, expired, revoked, or bound to another client id) is a guess. A
listed token is often a short secret an operator typed, and without a limit a stranger could
try tokens (or, holding a token bound to an id, ids) as fast as the service answers.
:class:`GuessThrottle` lets each source make ``limit`` guesses within ``window_s``; past that,
the source's enrollments are refused *before* their token is tried (``RESOURCE_EXHAUSTED``,
which a client retries with backoff) until its oldest guess leaves the window. Refusing
without trying matters: were the token still tried, a right guess would still enroll, and the
limit would limit nothing. An enrolled client rejoining with its key (a restart) tries no
token and is never held up.

A source is a peer's host (:func:`guess_source`): an IPv4 address, an IPv6 address's /64 (the
block one machine is usually given, whose addresses it can change at will), or the peer string
as it is. Behind a proxy every peer is the proxy: a proxy listed in ``trusted_proxies`` has its
``x-forwarded-for`` header read instead (the address it received the call from, which it must
append as the header's last entry, as Envoy and nginx's ``$proxy_add_x_forwarded_for`` do; a
port is dropped, and a last entry that is no address counts against the proxy itself), and any
other peer's header is ignored, so a guesser cannot name another source.
Honest clients behind one address with a guesser share its wait, for as long as it keeps
guessing. The table lives in this process (a restart starts it empty) and holds at most
``most_sources`` sources, the least recently guessing dropped first.

>>> throttle = GuessThrottle(limit=2, window_s=60.0, clock=iter([0.0, 1.0, 2.0]).__next__)
>>> throttle.guessed("10.0.0.7"); throttle.guessed("10.0.0.7")
>>> throttle.wait_s("10.0.0.7")
58.0
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

from shoal.core.errors import ConfigError
from shoal.telemetry.refusals import peer_host

IPV6_BLOCK = 64
"""The prefix length under which IPv6 addresses count as one source."""
MOST_SOURCES = 100_000
"""The most sources a throttle tracks at once."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
FORWARDED_FOR = "x-forwarded-for"


def trusted_networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    """The networks of ``coordinator.trusted_proxies`` (addresses or CIDR blocks)."""
    try:
        return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)
    except ValueError as exc:
        raise ConfigError(f"coordinator.trusted_proxies: {exc}") from None


def guess_source(
    peer: str,
    metadata: Iterable[tuple[str, str | bytes]] = (),
    trusted: Sequence[Network] = (),
) -> str:
    """The source a call's guesses count against: its gRPC ``peer``, or, where that peer is a
    ``trusted`` proxy, the address its ``x-forwarded-for`` in ``metadata`` names last (see
    the module docstring)."""
    host = peer_host(peer)
    if trusted and _within(host, trusted):
        forwarded = [
            value
            for key, value in metadata
            if key.lower() == FORWARDED_FOR and isinstance(value, str)
        ]
        hops = [hop.strip() for hop in ",".join(forwarded).split(",") if hop.strip()]
        # where the proxy named no address its last hop, the call counts against the proxy:
        # a caller's own text (a port, a name) never makes a source of its own
        address = _hop_address(hops[-1]) if hops else None
        if address is not None:
            host = address
    return _block(host)


def _hop_address(hop: str) -> str | None:
    """The IP address an ``x-forwarded-for`` hop names (``203.0.113.9``, ``203.0.113.9:4001``,
    ``2001:db8::1`` or ``[2001:db8::1]:4001``), or None where it names none."""
    if hop.startswith("["):
        hop = hop[1 : hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:  # an IPv4 address and its port
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


def _within(host: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _block(host: str) -> str:
    """An IPv4 address as it is, an IPv6 address as its /64, anything else whole."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # an IPv4 peer of a dual-stack socket
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{host}/{IPV6_BLOCK}", strict=False))
    return str(address)


class GuessThrottle:
    """At most ``limit`` bad tokens per source within ``window_s`` seconds of ``clock``."""

    def __init__(
        self,
        *,
        limit: int,
        window_s: float,
        clock: Callable[[], float],
        most_sources: int = MOST_SOURCES,
    ) -> None:
        if limit < 1 or not window_s > 0 or most_sources < 1:
            raise ConfigError(
                "a guess throttle needs limit >= 1, window_s > 0 and most_sources >= 1, got "
                f"{limit}, {window_s} and {most_sources}"
            )
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.most_sources = most_sources
        self._guesses: OrderedDict[str, deque[float]] = OrderedDict()

    def wait_s(self, source: str) -> float:
        """Seconds until ``source`` may try a token again (0: now)."""
        now = self.clock()
        times = self._recent(source, now)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[-self.limit] + self.window_s - now)

    def guessed(self, source: str) -> None:
        """``source`` named a bad token (see the module docstring)."""
        now = self.clock()
        times = self._recent(source, now)
        if times is None:
            times = self._guesses[source] = deque()
            while len(self._guesses) > self.most_sources:
                self._guesses.popitem(last=False)
        times.append(now)
        while len(times) > self.limit:  # older ones no longer decide any wait
            times.popleft()
        self._guesses.move_to_end(source)

    def _recent(self, source: str, now: float) -> deque[float] | None:
        """``source``'s guesses within the window (None: none is kept)."""
        times = self._guesses.get(source)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._guesses[source]
            return None
        return times
