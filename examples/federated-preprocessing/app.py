"""Hospitals that each hold their own patients' records, whose 30 measurements span six
orders of magnitude (scikit-learn's breast cancer data, which ships with it).

A model trained on the raw values barely learns: a cell's area is in the thousands and its
fractal dimension in the hundredths, so one learning rate is too large for the one and too
small for the other. Standardizing each feature fixes that, but needs every feature's mean
and standard deviation over all hospitals' patients, which no hospital holds. Pass 1
(``statistics.toml``) computes them, each hospital's moments hidden under SecAgg+; pass 2
(``train.toml``) trains with the scaler they give, which every task carries: the
``NumpyClient`` below standardizes its records with it (``config.scaler``), and the server
app's central evaluation with ``context.scaler``.

Nothing here knows which pass it is in: a statistics run asks each client for
``local_features()`` (a ``NumpyClient`` gives its training records' features, raw).
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_breast_cancer

from shoal import ClientContext, ServerApp, ServerContext
from shoal.client.numpy_models import NumpyClient, SoftmaxRegression
from shoal.core.parameters import Parameters

TEST_FRACTION = 0.25  # of the patients, held out for the coordinator's evaluation
LOCAL_EVAL_FRACTION = 0.2  # of a hospital's patients, kept for federated evaluation
MODEL = SoftmaxRegression(num_features=30, num_classes=2)


def patients(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The hospitals' patients and the held-out ones, (features, labels) each, shuffled."""
    data = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(data.target.size)
    held = round(TEST_FRACTION * order.size)
    features, labels = data.data.astype(np.float32), data.target.astype(np.int64)
    test, train = order[:held], order[held:]
    return (features[train], labels[train]), (features[test], labels[test])


def client_fn(context: ClientContext) -> NumpyClient:
    """Hospital ``partition_index`` of ``num_partitions``: a share of the patients, sized
    unevenly (a Dirichlet draw), less a fifth kept for local evaluation."""
    index, count = context.require_partition()
    (features, labels), _ = patients(context.seed)
    shares = np.random.default_rng([context.seed, 1]).dirichlet(np.full(count, 2.0))
    ends = np.round(np.cumsum(shares) * labels.size).astype(int)
    start = 0 if index == 0 else ends[index - 1]
    mine = np.arange(start, ends[index])
    held = round(LOCAL_EVAL_FRACTION * mine.size)
    return NumpyClient(
        MODEL,
        train_data=(features[mine[held:]], labels[mine[held:]]),
        eval_data=(features[mine[:held]], labels[mine[:held]]),
    )


def server_app(context: ServerContext) -> ServerApp:
    """Starts from zeros (the loss is convex) and evaluates every model on the held-out
    patients, standardized by the run's scaler as the hospitals' records are."""
    _, (features, labels) = patients(context.seed)
    if context.scaler is not None:
        features = context.scaler.transform(features)

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        loss, accuracy = MODEL.evaluate(parameters.vector, features, labels)
        return {"loss": float(loss), "accuracy": float(accuracy)}

    return ServerApp(
        initial_parameters=lambda _: Parameters.zeros(MODEL.layout),
        evaluate=evaluate,
        architecture="breast-cancer-softmax",
    )
