"""A client of a statistics run: its app's client, asked for the moments of its features.

Under ``[statistics] enabled`` every client an app builds is wrapped in a
:class:`StatisticsClient` (:meth:`shoal.client.app.ClientApp.__call__`, as clustered
FL wraps it), in simulation and on deployed clients alike. Its ``fit`` takes the
records' features from the app's client (:class:`LocalFeatures`), never trains, and
returns their moments (:func:`shoal.preprocessing.local_moments`) weighted by the
record count; they leave the device as any update does (masked or encrypted under
secure aggregation). The bounds it clips and scales with are the ones each task carries
(the coordinator's, :data:`~shoal.preprocessing.BOUNDS_KEY`): a client whose copy of the
job says otherwise still counts on the run's scale. Only the features an app's client gives
are counted: raw ones, before any scaler.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.core.errors import ClientError, ConfigError, DataError
from shoal.core.parameters import Parameters
from shoal.preprocessing import FeatureBounds, bounds_of, local_moments, moments_layout


@runtime_checkable
class LocalFeatures(Protocol):
    """A client that can take part in a statistics run: it gives its training records'
    features, records in rows and one column a feature, as they are before any scaling
    (:class:`~shoal.client.NumpyClient` gives its training features)."""

    def local_features(self) -> np.ndarray: ...


class StatisticsClient(Client):
    """``client``'s features counted instead of trained on (see the module docstring)."""

    def __init__(self, client: Client, bounds: FeatureBounds) -> None:
        if not isinstance(client, LocalFeatures):
            raise ConfigError(
                f"a statistics run counts each client's features: the app's "
                f"{type(client).__name__} has no local_features() method that returns them "
                "(records in rows, one column a feature)"
            )
        self.client = client
        self.bounds = bounds
        self.layout = moments_layout(bounds.features)

    def get_parameters(self) -> Parameters:
        return Parameters.zeros(self.layout)

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        bounds = bounds_of(config.extras)  # the coordinator's, not this copy of the job's
        if bounds is None:
            raise ClientError(
                "the task carries no feature bounds: this client counts its features for a "
                "statistics run alone"
            )
        layout = moments_layout(bounds.features)
        if parameters.layout != layout:
            raise ClientError(
                f"the task's model has {len(parameters)} values, the moments of "
                f"{bounds.features} features are {layout.size}"
            )
        try:
            features = self.client.local_features()
            moments, records = local_moments(features, bounds)
        except DataError as exc:
            raise ClientError(str(exc)) from None
        if records == 0:
            raise ClientError("the client holds no records to count")
        return FitResult(parameters.with_vector(moments), records)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return EvaluateResult(0.0, 0)  # nothing to evaluate in a statistics run
