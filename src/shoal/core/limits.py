"""Upper bounds on sizes and ranges, each with the reason it exists, and one error that says both.

A size in a configuration (clients, rounds, hidden units, a port) is bounded
where a larger value cannot work: it would not fit in memory, on the wire
or in a 64-bit integer. A field declares its bound with :class:`Limit`::

    clients: Annotated[int, Field(ge=1), Limit(1_000_000, "the simulator keeps ...")]

and a value above it fails validation with the error type
:data:`ABOVE_LIMIT`, whose context holds the limit and the reason, so that
the configuration loader can say, in one line::

    data.num_clients = 50000000 is above the limit of 1,000,000: the simulator keeps ...

:func:`above_limit` raises the same error from a check that involves
several fields (the memory of a model); :func:`largest_count` and
:func:`format_bytes` size such checks; :func:`split_host_port` bounds an
address (a port is 0 to 65535) and :func:`is_loopback` tells whether its host is
this machine only.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

ABOVE_LIMIT = "above_limit"
"""The pydantic error type of a value above its :class:`Limit`."""

INT64_MAX = 2**63 - 1
"""The largest TOML integer (a TOML integer is 64-bit signed): no Shoal key takes more."""

MAX_PORT = 65535

MAX_LOCAL_EPOCHS = 10_000
"""The most local passes one round may ask of a client: a job's ``[client] epochs`` is bounded
by it, and a client refuses a task that asks for more (``epochs = 1e9`` from a broken or hostile
coordinator kept a deployed client training for good)."""

PLD_SMALLEST_DELTA = 1e-12
"""The least δ the PLD accountant is asked about: dp-accounting truncates each privacy loss
distribution's tails at 1e-15, and its ε is infinite at a δ of that order."""


def pld_delta_problem(delta: float) -> str:
    """Why the PLD accountant cannot account at ``delta``, below :data:`PLD_SMALLEST_DELTA`."""
    return (
        f"delta = {delta:g} is below the {PLD_SMALLEST_DELTA:g} that the PLD accountant "
        "resolves (dp-accounting truncates its distributions' tails at 1e-15, and its epsilon "
        "is infinite near that): use the accountant 'rdp' for a delta this small"
    )


def quorum_count(quorum: float, cohort: int) -> int:
    """The fewest of a ``cohort`` whose results let a round commit at ``quorum`` (a share of
    it): the engine's count and the config's check of what a round may close with."""
    return max(1, math.ceil(quorum * cohort - 1e-9))


MAX_RUN_ID_CHARS = 128
"""The longest run id (``coordinator.run_id``): every signed request and secure session names it,
and a client refuses a session naming a longer one (4 MB ones were kept per signed round)."""

MAX_RETRY_AFTER_S = 3600
"""The longest a client waits between check-ins (before its jitter of 20%), whatever the
coordinator asks: a "retry after 10**9 s" (a unit mistaken, or a hostile coordinator) kept a
client away for good, even from the coordinator fixed and restarted; an hour apart, check-ins
cost nothing. A job's ``coordinator.retry_after_s`` is bounded by it."""


@dataclass(frozen=True, slots=True)
class Limit:
    """An ``Annotated`` marker: a value (unless None) is at most ``maximum``, because ``why``.

    >>> from typing import Annotated
    >>> from pydantic import TypeAdapter
    >>> TypeAdapter(Annotated[int, Limit(10, "ten is plenty")]).validate_python(7)
    7
    """

    maximum: int | float
    why: str

    def __post_init__(self) -> None:
        if not self.why.strip():
            raise ValueError("a limit says why it exists")

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value: Any) -> Any:
        """``value`` itself when it is within the limit (or None); else the ABOVE_LIMIT error."""
        if value is not None and value > self.maximum:
            raise above_limit(maximum=self.maximum, why=self.why)
        return value


def above_limit(
    *, maximum: int | float, why: str, key: str | None = None, value: Any = None
) -> PydanticCustomError:
    """The ABOVE_LIMIT error (to raise) for a value above ``maximum``; ``key`` and ``value``
    name the field when the check runs above it (a model validator across sections)."""
    context: dict[str, Any] = {"limit": maximum, "why": why}
    if key is not None:
        context |= {"key": key, "value": value}
    return PydanticCustomError(ABOVE_LIMIT, "is above the limit of {limit}: {why}", context)


def within_budget(
    key: str,
    value: int,
    *,
    needed: int,
    budget: int,
    bytes_each: int,
    fixed_bytes: int = 0,
    what: str,
) -> None:
    """Raise the ABOVE_LIMIT error for ``key`` when ``needed`` bytes exceed ``budget``.

    Its limit is the largest value of ``key`` that fits, at ``bytes_each``
    per unit beside ``fixed_bytes``; its reason says how much ``what`` needs.
    """
    if needed > budget:
        limit = largest_count(budget_bytes=budget, bytes_each=bytes_each, fixed_bytes=fixed_bytes)
        why = f"{what} {format_bytes(needed)}, over the {format_bytes(budget)} allowed"
        raise above_limit(maximum=limit, why=why, key=key, value=value)


def largest_count(*, budget_bytes: int, bytes_each: int, fixed_bytes: int = 0) -> int:
    """The most items of ``bytes_each`` that fit in ``budget_bytes`` beside ``fixed_bytes``.

    >>> largest_count(budget_bytes=1000, bytes_each=300, fixed_bytes=50)
    3
    """
    if bytes_each < 1:
        raise ValueError(f"bytes_each must be positive, got {bytes_each}")
    return max(0, (budget_bytes - fixed_bytes) // bytes_each)


def format_bytes(size: int | float) -> str:
    """A size as a person reads it, in binary units.

    >>> format_bytes(300 * 2**30), format_bytes(64 * 2**20), format_bytes(512)
    ('300 GiB', '64 MiB', '512 bytes')
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            digits = ".3g" if size < 10 * scale else ",.0f"
            return f"{size / scale:{digits}} {unit}"
    return f"{size:,.0f} bytes"


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ``[v6]:PORT`` keeps its brackets. ValueError if malformed.

    >>> split_host_port("127.0.0.1:50051"), split_host_port("[::1]:0")
    (('127.0.0.1', 50051), ('[::1]', 0))
    """
    host, separator, port = address.strip().rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) <= MAX_PORT:
        raise ValueError(
            f"expected HOST:PORT with a port from 0 (any free one) to {MAX_PORT}, got {address!r}"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, bracketed or not, or ``localhost``) is this machine only.

    >>> is_loopback("127.0.0.1"), is_loopback("[::1]"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False
