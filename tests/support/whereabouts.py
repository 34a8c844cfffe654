"""A client that says which process trained it (for the executor's tests)."""

from __future__ import annotations

import multiprocessing
import os
import time

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
