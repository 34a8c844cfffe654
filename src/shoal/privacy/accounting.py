"""Privacy accounting: the (ε, δ) a run has spent, computed by Google's dp-accounting.

Every DP round is one step of a sampled Gaussian mechanism: a share of the
population is sampled, each contribution is clipped to norm C, and noise of
standard deviation ``noise_multiplier * C`` is added to the sum. The
accountant keeps the history of those steps and turns it into ε for a given δ:

    accountant = PrivacyAccountant(method="rdp", sampling="poisson")
    accountant.compose(noise_multiplier=1.1, sampling_rate=0.01, steps=100)
    accountant.epsilon(delta=1e-5)

Three choices decide the figure, and ``AccountingScheme.label`` names them:

- ``method``: ``"rdp"`` (Rényi DP, Mironov 2017) or ``"pld"`` (privacy loss
  distributions, tighter and slower; its discretization makes it a slightly
  pessimistic estimate).
- ``sampling``: ``"poisson"`` (each client joins with probability q; the
  add-or-remove-one relation) or ``"fixed"`` (k clients drawn from n without
  replacement; the replace-one relation, so expect about twice Poisson's ε at
  the same rate). dp-accounting's PLD accountant has no fixed-size sampling.
- ``conversion`` of an RDP curve into (ε, δ): ``"improved"`` (dp-accounting's
  own: Canonne, Kamath and Steinke 2020, Proposition 12; Asoodeh et al. 2020)
  or ``"classic"`` (ε = min over orders a of RDP(a) + log(1/δ)/(a - 1), the bound behind
  Abadi et al. 2016 and TensorFlow Privacy's tables). Published tables use
  the classic one; the improved one is 10-25% lower. PLD needs no conversion.

A noise multiplier of 0 spends an infinite ε; an empty history spends none.
The history round-trips through JSON, so a restarted coordinator rebuilds its
accountant exactly: ε is always recomputed from the history, never carried.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError, RunError
from shoal.core.limits import PLD_SMALLEST_DELTA, pld_delta_problem

Method = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed"]
Conversion = Literal["improved", "classic"]
FloatArray = npt.NDArray[np.float64]
Closed = Literal["neither", "low", "high"]

DEFAULT_PLD_DISCRETIZATION = 1e-4
"""dp-accounting's default width of a PLD's privacy-loss buckets."""

_FORMAT = 1
_LARGEST_NOISE_MULTIPLIER = 2.0**20
_SMALLEST_NOISE_MULTIPLIER = 2.0**-10
_MOST_BISECTIONS = 64  # past 53, a float's bits, a bracket can no longer narrow


@functools.cache
def _dp_accounting() -> Any:
    # Importing dp-accounting costs about a second (it pulls in scipy.signal):
    # load it on first use so that `import shoal` stays quick.
    import dp_accounting  # type: ignore[import-untyped]

    logging.getLogger("absl").addFilter(_left_out_order)
    return dp_accounting


def _left_out_order(record: logging.LogRecord) -> bool:
    """dp-accounting leaves out an RDP order whose series does not converge (its RDP is infinite,
    so ε, the least over the other orders, stays a valid bound) and warns of each: at a sampling
    rate of 0.1 and a noise multiplier near 1, five orders per step, so one calibration printed
    hundreds of warnings. They are debug lines here."""
    if record.levelno == logging.WARNING and str(record.msg).startswith(
        "_compute_log_a_frac failed to converge"
    ):
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


# --- validation -----------------------------------------------------------------


def _check_real(name: str, value: object, *, low: float, high: float, closed: Closed) -> float:
    """``closed`` says which ends of the interval are allowed values."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    above = number >= low if closed == "low" else number > low
    below = number <= high if closed == "high" else number < high
    if math.isnan(number) or not (above and below):
        left = "[" if closed == "low" else "("
        right = "]" if closed == "high" else ")"
        raise ConfigError(f"{name} must lie in {left}{low}, {high}{right}, got {number}")
    return number


def _check_count(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if int(value) < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_delta(delta: object) -> float:
    return _check_real("delta", delta, low=0.0, high=1.0, closed="neither")


def _check_noise_multiplier(value: object) -> float:
    return _check_real("noise_multiplier", value, low=0.0, high=math.inf, closed="low")


# --- what is accounted ------------------------------------------------------------


@dataclass(frozen=True)
class AccountingScheme:
    """How an ε figure was computed; ``label`` goes into metrics and summaries.

    >>> AccountingScheme(method="rdp", sampling="poisson").label
    'rdp/poisson/improved'
    """

    method: Method = "rdp"
    sampling: Sampling = "poisson"
    conversion: Conversion | None = None
    """RDP's conversion to (ε, δ): None means "improved" for RDP; PLD has none."""

    def __post_init__(self) -> None:
        _check_choice("method", self.method, get_args(Method))
        _check_choice("sampling", self.sampling, get_args(Sampling))
        if self.method == "pld":
            if self.conversion is not None:
                raise ConfigError("conversion applies to method 'rdp' only; leave it unset")
            if self.sampling == "fixed":
                raise ConfigError(
                    "dp-accounting's PLD accountant has no fixed-size sampling: "
                    "use method 'rdp' with sampling 'fixed', or sampling 'poisson'"
                )
            return
        if self.conversion is None:
            object.__setattr__(self, "conversion", "improved")
        _check_choice("conversion", self.conversion, get_args(Conversion))

    @property
    def label(self) -> str:
        """For example ``rdp/poisson/improved``, ``rdp/fixed/classic`` or ``pld/poisson``."""
        if self.conversion is None:
            return f"{self.method}/{self.sampling}"
        return f"{self.method}/{self.sampling}/{self.conversion}"


@dataclass(frozen=True, kw_only=True)
class CompositionRecord:
    """``steps`` runs of one sampled Gaussian: Poisson at ``sampling_rate``, or
    ``sample_size`` of ``population`` drawn without replacement."""

    noise_multiplier: float
    steps: int
    sampling_rate: float | None = None
    sample_size: int | None = None
    population: int | None = None

    def __post_init__(self) -> None:
        # Store plain floats and ints, so records compare, hash and serialize alike.
        self._set("noise_multiplier", _check_noise_multiplier(self.noise_multiplier))
        self._set("steps", _check_count("steps", self.steps, low=1))
        if self.sampling_rate is not None:
            if self.sample_size is not None or self.population is not None:
                raise ConfigError(
                    "give either sampling_rate (Poisson sampling) or sample_size and "
                    "population (fixed-size sampling), not both"
                )
            rate = _check_real(
                "sampling_rate", self.sampling_rate, low=0.0, high=1.0, closed="high"
            )
            self._set("sampling_rate", rate)
            return
        if self.sample_size is None or self.population is None:
            raise ConfigError(
                "give sampling_rate (Poisson sampling) or both sample_size and population "
                "(fixed-size sampling)"
            )
        population = _check_count("population", self.population, low=1)
        sample_size = _check_count("sample_size", self.sample_size, low=1)
        if sample_size > population:
            raise ConfigError(
                f"sample_size must not exceed population ({population}), got {sample_size}"
            )
        self._set("population", population)
        self._set("sample_size", sample_size)

    def _set(self, name: str, value: float) -> None:
        object.__setattr__(self, name, value)

    @property
    def sampling(self) -> Sampling:
        """``"poisson"`` or ``"fixed"``, from which parameters are set."""
        return "poisson" if self.sampling_rate is not None else "fixed"


# --- the math, as pure functions ------------------------------------------------------


def epsilon_from_rdp(
    *, orders: FloatArray, rdp: FloatArray, delta: float, conversion: Conversion
) -> float:
    """The ε of an RDP curve at δ, by the ``"classic"`` or the ``"improved"`` conversion.

    classic: ε = min over orders a of RDP(a) + log(1/δ) / (a - 1) (Mironov 2017,
    Proposition 3).
    """
    delta = _check_delta(delta)
    if conversion == "improved":
        return float(_dp_accounting().rdp.compute_epsilon(orders, rdp, delta)[0])
    _check_choice("conversion", conversion, get_args(Conversion))
    usable = orders > 1
    bounds = rdp[usable] + math.log(1 / delta) / (orders[usable] - 1)
    return float(max(0.0, np.min(bounds)))


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(record: CompositionRecord) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(orders, RDP) of one step; cached because fixed-size sampling takes ~0.2 s."""
    dp = _dp_accounting()
    relation = dp.NeighboringRelation
    accountant = dp.rdp.RdpAccountant(
        neighboring_relation=(
            relation.ADD_OR_REMOVE_ONE if record.sampling == "poisson" else relation.REPLACE_ONE
        )
    )
    accountant.compose(_dp_event(replace(record, steps=1)))
    return tuple(accountant.orders.tolist()), tuple(accountant.rdp.tolist())


def _dp_event(record: CompositionRecord) -> Any:
    dp = _dp_accounting()
    gaussian = dp.GaussianDpEvent(record.noise_multiplier)
    if record.sampling_rate is not None:
        sampled = dp.PoissonSampledDpEvent(record.sampling_rate, gaussian)
    else:
        sampled = dp.SampledWithoutReplacementDpEvent(
            record.population, record.sample_size, gaussian
        )
    return dp.SelfComposedDpEvent(sampled, record.steps)


def _rdp_epsilon(
    history: tuple[CompositionRecord, ...], *, delta: float, conversion: Conversion
) -> float:
    orders = np.asarray(_rdp_of_one_step(replace(history[0], steps=1))[0])
    total = np.zeros_like(orders)
    for record in history:
        total = total + record.steps * np.asarray(_rdp_of_one_step(replace(record, steps=1))[1])
    return epsilon_from_rdp(orders=orders, rdp=total, delta=delta, conversion=conversion)


def _pld_epsilon(
    history: tuple[CompositionRecord, ...], *, delta: float, discretization: float
) -> float:
    accountant = _dp_accounting().pld.PLDAccountant(value_discretization_interval=discretization)
    for record in history:
        accountant.compose(_dp_event(record))
    return float(accountant.get_epsilon(delta))


# --- the accountant ------------------------------------------------------------------


class PrivacyAccountant:
    """The history of a run's DP steps, and the ε it has spent.

    ``compose`` appends steps (merging them into the last record when the
    mechanism is unchanged); ``epsilon`` recomputes ε from the history;
    ``epsilon_after`` answers "and after k more steps?" without changing
    anything, for the budget check before a round.
    """

    def __init__(
        self,
        *,
        method: Method = "rdp",
        sampling: Sampling = "poisson",
        conversion: Conversion | None = None,
        pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    ) -> None:
        self._scheme = AccountingScheme(method=method, sampling=sampling, conversion=conversion)
        self._pld_discretization = _check_real(
            "pld_discretization", pld_discretization, low=0.0, high=1.0, closed="neither"
        )
        self._history: tuple[CompositionRecord, ...] = ()
        self._cached: tuple[tuple[tuple[CompositionRecord, ...], float], float] | None = None

    @property
    def scheme(self) -> AccountingScheme:
        """How this accountant computes ε (its ``label`` goes into summaries)."""
        return self._scheme

    @property
    def history(self) -> tuple[CompositionRecord, ...]:
        """Every composed record, oldest first."""
        return self._history

    @property
    def steps(self) -> int:
        """The number of steps composed so far."""
        return sum(record.steps for record in self._history)

    def compose(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float | None = None,
        sample_size: int | None = None,
        population: int | None = None,
        steps: int = 1,
    ) -> None:
        """Account for ``steps`` more steps (0 steps change nothing)."""
        self._history = self._extended(
            noise_multiplier=noise_multiplier,
            sampling_rate=sampling_rate,
            sample_size=sample_size,
            population=population,
            steps=steps,
        )

    def epsilon(self, *, delta: float) -> float:
        """The ε spent so far at ``delta``: 0 for no steps, ``math.inf`` without noise."""
        return self._epsilon_of(self._history, delta=delta)

    def epsilon_after(
        self,
        *,
        delta: float,
        noise_multiplier: float,
        sampling_rate: float | None = None,
        sample_size: int | None = None,
        population: int | None = None,
        steps: int = 1,
    ) -> float:
        """The ε that ``compose`` with these arguments would lead to; changes nothing."""
        history = self._extended(
            noise_multiplier=noise_multiplier,
            sampling_rate=sampling_rate,
            sample_size=sample_size,
            population=population,
            steps=steps,
        )
        return self._epsilon_of(history, delta=delta)

    def to_json(self) -> str:
        """The scheme and the history, enough for ``from_json`` to rebuild this accountant."""
        document = {
            "format": _FORMAT,
            "method": self._scheme.method,
            "sampling": self._scheme.sampling,
            "conversion": self._scheme.conversion,
            "pld_discretization": self._pld_discretization,
            "history": [
                {key: value for key, value in asdict(record).items() if value is not None}
                for record in self._history
            ],
        }
        return json.dumps(document, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyAccountant:
        """Rebuild an accountant from ``to_json``'s output; RunError if it is corrupt."""
        try:
            document = json.loads(text)
            if document["format"] != _FORMAT:
                raise RunError(f"privacy history format {document['format']!r} is not {_FORMAT}")
            accountant = cls(
                method=document["method"],
                sampling=document["sampling"],
                conversion=document["conversion"],
                pld_discretization=document["pld_discretization"],
            )
            for entry in document["history"]:
                accountant.compose(**entry)
        except (ValueError, TypeError, KeyError, ConfigError) as exc:
            raise RunError(f"the privacy history cannot be read: {exc}") from exc
        return accountant

    def _extended(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float | None,
        sample_size: int | None,
        population: int | None,
        steps: int,
    ) -> tuple[CompositionRecord, ...]:
        steps = _check_count("steps", steps, low=0)
        record = CompositionRecord(
            noise_multiplier=noise_multiplier,
            steps=max(steps, 1),  # zero steps are checked like one, then change nothing
            sampling_rate=sampling_rate,
            sample_size=sample_size,
            population=population,
        )
        if record.sampling != self._scheme.sampling:
            needs = "sampling_rate" if self._scheme.sampling == "poisson" else "sample_size"
            raise ConfigError(
                f"this accountant uses {self._scheme.sampling} sampling, which needs {needs}"
            )
        if steps == 0:
            return self._history
        if self._history and replace(self._history[-1], steps=1) == replace(record, steps=1):
            merged = replace(record, steps=self._history[-1].steps + steps)
            return (*self._history[:-1], merged)
        return (*self._history, record)

    def _epsilon_of(self, history: tuple[CompositionRecord, ...], *, delta: float) -> float:
        delta = _check_delta(delta)
        if not history:
            return 0.0
        if any(record.noise_multiplier == 0 for record in history):
            return math.inf
        if self._cached is not None and self._cached[0] == (history, delta):
            return self._cached[1]
        if self._scheme.method == "pld":
            if delta < PLD_SMALLEST_DELTA:
                raise ConfigError(pld_delta_problem(delta))
            epsilon = _pld_epsilon(history, delta=delta, discretization=self._pld_discretization)
        else:
            conversion = self._scheme.conversion or "improved"
            epsilon = _rdp_epsilon(history, delta=delta, conversion=conversion)
        self._cached = ((history, delta), epsilon)
        return epsilon


# --- helpers for configuring a run ----------------------------------------------------


def default_delta(population: int) -> float:
    """δ = 1 / population, the usual choice when a run does not set one."""
    return 1.0 / _check_count("population", population, low=1)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float | None = None,
    sample_size: int | None = None,
    population: int | None = None,
    method: Method = "rdp",
    sampling: Sampling = "poisson",
    conversion: Conversion | None = None,
    tolerance: float = 0.01,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """The smallest noise multiplier whose ε after ``rounds`` steps is at most the target.

    The answer is within a relative ``tolerance`` of the exact one and never
    below it: ε(answer) ≤ target < ε(answer * (1 - tolerance)). The search is
    bounded, whatever the target: it tries no noise below 2^-10 (a target that
    less noise meets, as a huge ε, gets that much) nor above 2^20, and halves
    the bracket at most 64 times (a float has 53 bits to halve).

    >>> round(calibrate_noise_multiplier(
    ...     target_epsilon=1.0, delta=1e-5, rounds=100, sampling_rate=0.01), 2)
    1.09
    """
    target = _check_real("target_epsilon", target_epsilon, low=0.0, high=math.inf, closed="neither")
    rounds = _check_count("rounds", rounds, low=1)
    tolerance = _check_real("tolerance", tolerance, low=0.0, high=0.5, closed="high")
    accountant = PrivacyAccountant(
        method=method,
        sampling=sampling,
        conversion=conversion,
        pld_discretization=pld_discretization,
    )

    def meets_target(noise_multiplier: float) -> bool:
        epsilon = accountant.epsilon_after(
            delta=delta,
            noise_multiplier=noise_multiplier,
            sampling_rate=sampling_rate,
            sample_size=sample_size,
            population=population,
            steps=rounds,
        )
        return epsilon <= target

    low, high = _bracket(meets_target)
    for _ in range(_MOST_BISECTIONS):
        if high - low <= tolerance * high:
            break
        middle = (low + high) / 2
        low, high = (low, middle) if meets_target(middle) else (middle, high)
    return high


def _bracket(meets_target: Callable[[float], bool]) -> tuple[float, float]:
    """(low, high): high meets the target and low does not; found by doubling or halving.
    Where even the smallest noise tried meets it, both are that noise (nothing to bisect)."""
    if meets_target(1.0):
        high = 1.0
        while high > _SMALLEST_NOISE_MULTIPLIER:
            if not meets_target(high / 2):
                return high / 2, high
            high /= 2
        # an ε target this loose: bisecting towards 0 would run to float underflow, each step
        # slower than the last (the accountant works hard on near-noiseless steps)
        return high, high
    low = 1.0
    while not meets_target(2 * low):
        low *= 2
        if low >= _LARGEST_NOISE_MULTIPLIER:
            raise ConfigError(
                f"no noise multiplier up to {_LARGEST_NOISE_MULTIPLIER:g} reaches the "
                "target_epsilon; raise it or delta (the classic conversion cannot go below "
                "log(1/delta) / 1023)"
            )
    return low, 2 * low
