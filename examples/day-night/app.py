"""Two populations that a single model cannot serve: "day" and "night" devices on the digits.

Even-numbered clients are *day* devices and label the digits as they are;
odd-numbered clients are *night* devices, whose labels follow another rule
(digit ``d`` is labelled ``(d + 5) % 10``). One global model must split the
difference; clustered FL (``[clustering] clusters = 2``) trains one model per
population without being told who is who: each client picks the cluster
model with the lowest loss on its own data.

The app is an ordinary client app (the clustering wraps it): a NumPy softmax
regression on an even share of the training digits, a fifth held out.
"""

from __future__ import annotations

import functools

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from shoal import ClientContext
from shoal.client.api import Client, EvaluateConfig
from shoal.client.clustered import ClusteredClient
from shoal.client.numpy_models import NumpyClient, SoftmaxRegression
from shoal.core.parameters import Parameters

MODEL = SoftmaxRegression(num_features=64, num_classes=10)
POPULATIONS = ("day", "night")
Arrays = tuple[np.ndarray, np.ndarray]


@functools.cache
def digits_split(seed: int) -> tuple[Arrays, Arrays]:
    """(train, test) digits, features in [0, 1], a stratified quarter held out."""
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        features, digits.target, test_size=0.25, stratify=digits.target, random_state=seed
    )
    return (train_x, train_y), (test_x, test_y)


def population(index: int) -> str:
    """Client ``index``'s population: day for even indices, night for odd ones."""
    return POPULATIONS[index % 2]


def relabel(labels: np.ndarray, which: str) -> np.ndarray:
    """The labels as ``which`` population writes them."""
    return labels if which == "day" else (labels + 5) % 10


def client_fn(context: ClientContext) -> NumpyClient:
    """Client ``i`` of ``n``: the ``i``-th share of the training digits, as its population
    labels them, a fifth held out for its evaluation."""
    index, count = context.require_partition()
    (features, labels), _ = digits_split(context.seed)
    share = np.random.default_rng(context.seed).permutation(labels.size)
    mine = np.array_split(share, count)[index]
    labels = relabel(labels, population(index))
    held = round(0.2 * mine.size)
    return NumpyClient(
        MODEL,
        train_data=(features[mine[held:]], labels[mine[held:]]),
        eval_data=(features[mine[:held]], labels[mine[:held]]),
    )


def population_accuracy(
    parameters: Parameters, *, clusters: int, num_clients: int, seed: int = 0
) -> dict[str, float]:
    """Each population's accuracy, as federated evaluation measures it: every client scores
    the model on its own held-out digits (a clustered model: the cluster model with the lowest
    loss there), weighted by examples."""
    correct = dict.fromkeys(POPULATIONS, 0.0)
    examples = dict.fromkeys(POPULATIONS, 0)
    for index in range(num_clients):
        context = ClientContext(f"client-{index}", index, num_clients, seed=seed)
        client: Client = client_fn(context)
        if clusters > 1:
            client = ClusteredClient(client, clusters=clusters)
        result = client.evaluate(parameters, EvaluateConfig(round=0))
        which = population(index)
        correct[which] += result.metrics["accuracy"] * result.num_examples
        examples[which] += result.num_examples
    return {which: correct[which] / examples[which] for which in POPULATIONS}
