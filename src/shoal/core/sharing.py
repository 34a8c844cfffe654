"""How many of a SecAgg+ client's share holders must answer: the safe floor and the dropout bound.

In SecAgg+ each client splits its two secrets (self-mask seed, mask key)
t-of-(k + 1) among its k neighbours and itself. These pure functions hold
the arithmetic that the configuration, the SecAgg+ client and the SecAgg+
server must agree on, so it is written once:

- the floor: a server that tells some holders "u survived" and others
  "u dropped" collects u's seed from the first and u's mask key from the
  second unless more than half of the k + 1 holders are needed, so
  t >= floor((k + 1) / 2) + 1 (Bell et al. 2020 require t > k / 2 against
  a malicious server; counting the client's own share, this is that bound);
- the failure bound: a round aborts when some secret keeps fewer than t
  live holders. With each client gone by the unmask stage independently
  with probability p, a survivor's secret needs t - 1 of its k neighbours,
  a dropped client's t of them (exact binomials); the union bound over the
  n clients bounds the round's abort probability, and for the complete
  graph the exact figure is P(fewer than t of n clients answer).

>>> minimum_threshold(7)
5
>>> round(round_failure_bound(num_nodes=20, degree=7, threshold=5, dropout=0.3), 2)
1.0
"""

from __future__ import annotations

import math

from shoal.core.errors import ConfigError

MIN_THRESHOLD_FRACTION = 0.5
"""``reconstruction_threshold`` may not go below this: t must exceed half of the holders."""

MAX_ROUND_FAILURE = 0.05
"""The largest abort probability per round that a secure configuration may accept."""

_COMPLETE_UP_TO = 32

MAX_NEIGHBOURS = 1024
"""The most neighbours a SecAgg+ client shares its secrets among. Sharing costs it time and
memory in the square of its neighbours (t ~ k / 2 coefficients at k points): 19,000 neighbours,
which fit in one 4 MiB check-in answer, took a client 23 s and 1.4 GB each round, where 1,024
take 0.03 s. The default degree is at most 40 up to 10**6 clients (about 2 log2 n, after Bell
et al.), and the complete graph fits up to 1,025 clients."""


def graph_degree(num_nodes: int, degree: int) -> int:
    """The neighbours each node really gets: odd degree over odd n adds one; at most n - 1."""
    if num_nodes <= 1:
        return 0
    return max(1, min(degree + (degree % 2) * (num_nodes % 2), num_nodes - 1))


def default_degree(num_nodes: int) -> int:
    """About 2 log2 n neighbours (Bell et al.), and the complete graph up to 32 nodes.

    A small cohort gains little from a sparse graph and loses robustness: with
    a few neighbours, a handful of dropouts leaves a secret with fewer holders
    than the threshold, and the round aborts.
    """
    if num_nodes <= 1:
        return 1
    return min(num_nodes - 1, max(_COMPLETE_UP_TO - 1, 2 * math.ceil(math.log2(num_nodes))))


def minimum_threshold(neighbours: int) -> int:
    """The safe floor: more than half of the ``neighbours + 1`` holders of a secret."""
    if neighbours < 0:
        raise ConfigError(f"a client has >= 0 neighbours, got {neighbours}")
    return (neighbours + 1) // 2 + 1 if neighbours else 1


def reconstruction_threshold(*, degree: int, num_nodes: int, fraction: float = 0.5) -> int:
    """Shares needed to rebuild a secret: more than ``fraction`` of its holders, never below
    the floor (``fraction`` below :data:`MIN_THRESHOLD_FRACTION` is refused)."""
    check_threshold_fraction(fraction)
    holders = graph_degree(num_nodes, degree) + 1
    return min(holders, int(fraction * holders) + 1)


def threshold_fraction_problem(fraction: float) -> str | None:
    """What is wrong with ``reconstruction_threshold = fraction``, in words; None if nothing."""
    if fraction < MIN_THRESHOLD_FRACTION:
        return (
            f"{fraction} is below the safe floor {MIN_THRESHOLD_FRACTION}: a secret needs more "
            "than half of its holders, or a malicious server can collect both of a client's "
            "secrets"
        )
    if fraction >= 1:
        return f"must be below 1, got {fraction}"
    return None


def check_threshold_fraction(fraction: float) -> None:
    """Refuse a ``reconstruction_threshold`` outside [floor, 1), in one line naming the floor."""
    problem = threshold_fraction_problem(fraction)
    if problem is not None:
        raise ConfigError(f"secure_aggregation.reconstruction_threshold: {problem}")


def binomial_below(count: int, successes: int, probability: float) -> float:
    """P(X < ``successes``) for X ~ Binomial(``count``, ``probability``), summed exactly."""
    return math.fsum(
        math.comb(count, i) * probability**i * (1 - probability) ** (count - i)
        for i in range(max(0, min(successes, count + 1)))
    )


def round_failure_bound(*, num_nodes: int, degree: int, threshold: int, dropout: float) -> float:
    """An upper bound on the chance that a round aborts for want of shares (module docstring)."""
    if not 0 <= dropout <= 1:
        raise ConfigError(f"a dropout probability lies in [0, 1], got {dropout}")
    neighbours, alive = graph_degree(num_nodes, degree), 1 - dropout
    if num_nodes <= 1:
        return 0.0 if threshold <= 1 else 1.0
    if neighbours == num_nodes - 1:  # every client holds every secret: one count decides
        return binomial_below(num_nodes, threshold, alive)
    per_client = alive * binomial_below(neighbours, threshold - 1, alive) + (
        dropout * binomial_below(neighbours, threshold, alive)
    )
    return min(1.0, num_nodes * per_client)


def degree_needed(
    *, num_nodes: int, fraction: float, dropout: float, bound: float = MAX_ROUND_FAILURE
) -> int | None:
    """The smallest degree whose abort bound is within ``bound``; None when no degree is."""
    for degree in range(1, max(2, num_nodes)):
        threshold = reconstruction_threshold(degree=degree, num_nodes=num_nodes, fraction=fraction)
        failure = round_failure_bound(
            num_nodes=num_nodes, degree=degree, threshold=threshold, dropout=dropout
        )
        if failure <= bound:
            return degree
    return None
