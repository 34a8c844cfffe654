"""The client API: what a user's model implements to join a federation.

A client answers three calls, as in Flower: ``get_parameters``,
``fit(parameters, config)`` and ``evaluate(parameters, config)``. Results are
typed: a :class:`FitResult` carries the new local parameters (or the update
relative to the received ones), the number of examples and metrics; an
:class:`EvaluateResult` carries a loss, the number of examples and metrics.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from shoal.core.errors import ClientError
from shoal.core.parameters import Parameters, untrained_zeroed
from shoal.tasks import EvaluateConfig as EvaluateConfig
from shoal.tasks import FitConfig as FitConfig

Metrics = Mapping[str, float]
Examples = tuple[np.ndarray, np.ndarray]
DataTransform = Callable[[np.ndarray, np.ndarray], Examples]
"""A function of a client's (features, labels) that returns the examples it trains on
instead: the simulator's data attacks (label flip, backdoor) and planted canaries."""


@dataclass(frozen=True, slots=True)
class FitResult:
    """A client's answer to ``fit``.

    Give ``parameters`` (the new local model, as ``Parameters`` or a list of
    arrays of the model's shapes in its order, or one flat vector of all its
    values) or, with ``is_update=True``, the update relative to the parameters
    received.
    """

    parameters: Parameters | Sequence[np.ndarray]
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    is_update: bool = False

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise ClientError(f"num_examples must be >= 0, got {self.num_examples}")
        check_metrics(self.metrics)


def check_metrics(metrics: object, *, prefix: str = "") -> None:
    """Refuse (:class:`ClientError`) metrics no run could record: a name that is not text, or
    a number past a float's range (``10**400``). A nested mapping is checked likewise; values
    of other kinds are left out downstream, as before."""
    if not isinstance(metrics, Mapping):
        raise ClientError(
            f"metrics are a mapping of names to numbers, got {type(metrics).__name__}"
        )
    for name, value in metrics.items():
        if not isinstance(name, str):
            shown = repr(name)[:40]
            raise ClientError(f"a metric's name is text, got {type(name).__name__} {shown}")
        if isinstance(value, Mapping):
            check_metrics(value, prefix=f"{prefix}{name}.")
        elif isinstance(value, numbers.Real):
            try:
                float(value)
            except OverflowError:
                raise ClientError(
                    f"metric {prefix + name!r} = {str(value)[:40]}... is past a float's range"
                ) from None


@dataclass(frozen=True, slots=True)
class EvaluateResult:
    """A client's answer to ``evaluate``: loss, examples evaluated, metrics."""

    loss: float
    num_examples: int
    metrics: Metrics = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise ClientError(f"num_examples must be >= 0, got {self.num_examples}")
        check_metrics(self.metrics)


class Client(ABC):
    """Base class of a federated client; subclass it and implement the three calls."""

    @abstractmethod
    def get_parameters(self) -> Parameters:
        """The client's current (initial) parameters."""

    @abstractmethod
    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        """Train locally starting from ``parameters``."""

    @abstractmethod
    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        """Evaluate ``parameters`` on the client's local held-out data."""


def fit_update(result: FitResult, received: Parameters) -> Parameters:
    """The update (local minus received) that a fit result stands for.

    Raises ``ClientError`` when the result's tensors are not the model's shapes, in the
    model's order, or one flat vector of all its values (the same number of values in other
    tensors would land in other tensors' places).
    """
    if isinstance(result.parameters, Parameters):
        local = result.parameters
    else:
        try:
            local = Parameters.from_arrays(list(result.parameters))
        except Exception as exc:
            raise ClientError(f"fit returned arrays that cannot be flattened: {exc}") from exc
    if local.layout.size != received.layout.size:
        raise ClientError(
            f"fit returned {local.layout.size} values, the model has {received.layout.size}"
        )
    given = [spec.shape for spec in local.layout.specs]
    if given == [(received.layout.size,)]:
        given = [spec.shape for spec in received.layout.specs]  # one flat vector, in its order
    for index, (shape, spec) in enumerate(zip(given, received.layout.specs, strict=False)):
        if shape != spec.shape:
            raise ClientError(
                f"fit returned tensor {index} of shape {list(shape)} where the model's "
                f"{spec.name!r} is {list(spec.shape)}: give the model's tensors in its order"
            )
    if len(given) != len(received.layout.specs):
        raise ClientError(
            f"fit returned {len(given)} tensors, the model has {len(received.layout.specs)}"
        )
    vector = local.vector
    update = np.array(vector, np.float32) if result.is_update else vector - received.vector
    return received.with_vector(untrained_zeroed(update, received.layout))


@runtime_checkable
class TransformableData(Protocol):
    """A client whose training examples a simulation may rewrite.

    Implement ``with_training_data`` in a client app to let the simulator's
    data attacks (``[[attack]]`` with ``label_flip`` or ``backdoor``) and
    canary records reach its data: return a client like this one that
    trains on ``transform(features, labels)``. Model attacks (sign flip,
    scaling, noise, free riding) need nothing from the client.
    :class:`~shoal.client.NumpyClient` implements it;
    :class:`~shoal.client.TorchClient`, over any ``DataLoader``, does not.
    """

    def with_training_data(self, transform: DataTransform) -> Client: ...
