"""A client that says which process trained it (for the executor's tests)."""

from __future__ import annotations

import os

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
