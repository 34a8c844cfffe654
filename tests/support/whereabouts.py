"""A client that says which process trained it (for the executor's tests)."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from shoal.aggregation import drift
from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.core.parameters import Parameters


class WhereaboutsClient(Client):
    """Returns the parameters it got, with its process id as the metric ``pid``."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def get_parameters(self) -> Parameters:
        raise NotImplementedError("the coordinator sends the parameters")

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        return FitResult(parameters, 1, {"pid": float(os.getpid())})

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return EvaluateResult(0.0, 1, {"pid": float(os.getpid())})


class DiesAwayFromHome:
    """A client factory whose clients end their process when they train anywhere but in the
    coordinator's process (``home``): a worker that crashes mid-chunk."""

    def __init__(self, home: int) -> None:
        self.home = home

    def __call__(self, client_id: str) -> Client:
        if os.getpid() != self.home:
            os._exit(3)
        return WhereaboutsClient(client_id)


def refuse_to_load(reason: str) -> None:
    raise ImportError(reason)


class Unloadable:
    """A client factory that cannot be loaded in a worker process (its module missing there)."""

    def __call__(self, client_id: str) -> Client:
        return WhereaboutsClient(client_id)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return refuse_to_load, ("no module named 'my_app' on this worker",)


def _nothing() -> None:
    pass


class ParentClient(WhereaboutsClient):
    """Starts a process of its own as it trains, as a PyTorch DataLoader with workers does."""

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        child = multiprocessing.get_context("fork").Process(target=_nothing)
        child.start()
        child.join()
        return FitResult(parameters, 1, {"pid": float(os.getpid()), "exit": float(child.exitcode)})


class SlowAwayFromHome:
    """A client factory whose clients take ``seconds`` longer to train anywhere but in the
    coordinator's process (``home``): a worker on a slower core."""

    def __init__(self, home: int, *, seconds: float) -> None:
        self.home = home
        self.seconds = seconds

    def __call__(self, client_id: str) -> Client:
        if os.getpid() != self.home:
            time.sleep(self.seconds)
        return WhereaboutsClient(client_id)


def where_doubled(value: int) -> tuple[int, int]:
    """A side task: the process it ran in, and twice ``value``."""
    return os.getpid(), 2 * value


def fails_away_from_home(home: int) -> int:
    """A side task that fails anywhere but in ``home`` (where it gives its process id)."""
    if os.getpid() != home:
        raise ArithmeticError("not at home")
    return os.getpid()


def fails_everywhere(reason: str) -> int:
    raise ArithmeticError(reason)


def exits_away_from_home(home: int) -> int:
    """A side task that ends its process anywhere but in ``home``: a worker that dies."""
    if os.getpid() != home:
        os._exit(3)
    return os.getpid()


DRIFTS_MEASURED: list[int] = []
"""The process ids where :func:`counted_drift_of_gram` ran in this process (tests patch it in)."""
_drift_of_gram = drift.drift_of_gram  # the real one, taken before any test patches it


def counted_drift_of_gram(*args: Any) -> drift.DriftReport:
    """:func:`shoal.aggregation.drift.drift_of_gram`, counted in :data:`DRIFTS_MEASURED`."""
    DRIFTS_MEASURED.append(os.getpid())
    return _drift_of_gram(*args)
