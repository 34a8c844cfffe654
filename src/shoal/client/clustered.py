"""The client side of clustered FL (IFCA, Ghosh et al. 2020), around any user's client.

The global model is k cluster models stacked (:mod:`shoal.core.clusters`).
:class:`ClusteredClient` wraps the client an app built: it splits the
model, evaluates every cluster model's loss on the client's own data with
the app's ``evaluate``, trains the one with the lowest loss with the app's
``fit`` (ties go to the lower index), and answers with an update that
changes only that cluster's block, naming the cluster in its metrics
(``cluster``). An evaluation answers with the best cluster model's result,
so that each client is scored on the model it would use.

The number of clusters is read from the model's layout
(:func:`~shoal.core.clusters.stacked_clusters`), up to the job's
``clusters``; a model that is not a stack (a run under ``[clustering] start
= "flagged"`` before it splits) goes to the wrapped client unchanged, so the
same client serves a run before and after its split.

A client app needs nothing for this: the job's ``[clustering] clusters``
makes :class:`~shoal.client.app.ClientApp` wrap every client it builds, in
simulation and on deployed clients alike.
"""

from __future__ import annotations

import math

import numpy as np

from shoal.client.api import (
    Client,
    DataTransform,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
    TransformableData,
    fit_update,
)
from shoal.core.clusters import CLUSTER_METRIC, split_models, stacked_clusters
from shoal.core.errors import ClientError, ModelError
from shoal.core.parameters import Parameters


class ClusteredClient(Client):
    """``client`` trained and evaluated as one of at most ``clusters`` cluster models; see the
    module."""

    def __init__(self, client: Client, *, clusters: int) -> None:
        if clusters < 2:
            raise ClientError(f"a clustered client needs at least 2 clusters, got {clusters}")
        self.client = client
        self.clusters = clusters

    def get_parameters(self) -> Parameters:
        """The wrapped client's own (single) model: the run stacks the clusters from it."""
        return self.client.get_parameters()

    def choose(
        self, models: list[Parameters], config: EvaluateConfig
    ) -> tuple[int, EvaluateResult]:
        """The cluster whose model has the lowest loss on this client's data, and its result
        (a NaN loss never wins; all NaN: cluster 0)."""
        results = [self.client.evaluate(model, config) for model in models]
        losses = [result.loss if math.isfinite(result.loss) else math.inf for result in results]
        best = int(np.argmin(losses))
        return best, results[best]

    def models(self, parameters: Parameters) -> list[Parameters] | None:
        """The cluster models ``parameters`` stacks (None: one model, not a stack); a stack of
        more than ``clusters`` is refused."""
        clusters = stacked_clusters(parameters)
        if clusters is None:
            return None
        if clusters > self.clusters:
            raise ModelError(
                f"the model stacks {clusters} cluster models, more than the job's "
                f"clustering.clusters = {self.clusters}"
            )
        return split_models(parameters, clusters=clusters)

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        models = self.models(parameters)
        if models is None:
            return self.client.fit(parameters, config)
        cluster, _ = self.choose(models, EvaluateConfig(round=config.round, extras=config.extras))
        result = self.client.fit(models[cluster], config)
        update = fit_update(result, models[cluster])
        blocks = np.zeros((len(models), len(update)), np.float32)
        blocks[cluster] = update.vector
        return FitResult(
            parameters.with_vector(blocks.reshape(-1)),
            result.num_examples,
            {**result.metrics, CLUSTER_METRIC: cluster},
            is_update=True,
        )

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        models = self.models(parameters)
        if models is None:
            return self.client.evaluate(parameters, config)
        cluster, result = self.choose(models, config)
        return EvaluateResult(
            result.loss, result.num_examples, {**result.metrics, CLUSTER_METRIC: cluster}
        )

    def with_training_data(self, transform: DataTransform) -> Client:
        """The wrapped client on rewritten data (the simulator's data attacks), still clustered;
        a client that cannot rewrite its data refuses as it would unwrapped."""
        if not isinstance(self.client, TransformableData):
            raise ClientError(f"{type(self.client).__name__} cannot rewrite its training data")
        return ClusteredClient(self.client.with_training_data(transform), clusters=self.clusters)
