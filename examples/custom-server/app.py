"""A server app that does more than the defaults: central evaluation, a learning-rate schedule,
and its own aggregation of a metric the clients report.

- ``evaluate``: every new model is scored on a held-out quarter of the digits (loss,
  accuracy and macro F1); the row gets them as ``test_loss``, ``test_accuracy``,
  ``test_macro_f1``.
- ``fit_config``: the learning rate decays by ``[app] options.decay`` each round from
  ``[client] learning_rate``; a round config's ``learning_rate`` replaces the task's, and a
  key that is not a task setting (``f1_average`` here) reaches the client in ``config.extras``.
- ``fit_metrics``: each client reports the macro F1 of its new local model on its own
  held-out digits (``local_f1``); the row gets their mean weighted by examples and the worst
  client's, ``worst_local_f1``.

The clients train a one-hidden-layer NumPy MLP on an even share of the digits (core install).
"""

from __future__ import annotations

import functools

import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

from shoal import ClientContext, ServerApp, ServerContext
from shoal.client.api import FitConfig, FitResult
from shoal.client.numpy_models import MLP, NumpyClient
from shoal.coordinator.app import ClientMetrics, weighted_mean_of
from shoal.core.parameters import Parameters

MODEL = MLP(num_features=64, num_hidden=32, num_classes=10)
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


def f1(parameters: Parameters, features: np.ndarray, labels: np.ndarray, *, average: str) -> float:
    """The F1 score of the model ``parameters`` on ``(features, labels)``."""
    predictions = MODEL.predict(parameters.vector, features)
    return float(f1_score(labels, predictions, average=average, zero_division=0))


class F1Client(NumpyClient):
    """A NumPy client that also reports the F1 of its new model on its local held-out digits."""

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        result = super().fit(parameters, config)
        metrics = {**result.metrics, "learning_rate": config.learning_rate}
        if self.eval_data is not None:
            average = str(config.extras.get("f1_average", "macro"))
            metrics["local_f1"] = f1(self.get_parameters(), *self.eval_data, average=average)
        return FitResult(result.parameters, result.num_examples, metrics)


def client_fn(context: ClientContext) -> F1Client:
    """Client ``i`` of ``n``: the ``i``-th even share of the training digits, a fifth held out."""
    index, count = context.require_partition()
    (features, labels), _ = digits_split(context.seed)
    share = np.array_split(np.arange(labels.size), count)[index]
    held = round(0.2 * share.size)
    local_eval, train = share[:held], share[held:]
    return F1Client(
        MODEL,
        train_data=(features[train], labels[train]),
        eval_data=(features[local_eval], labels[local_eval]),
    )


def local_f1_metrics(results: ClientMetrics) -> dict[str, float]:
    """The clients' ``local_f1`` weighted by their examples, and the worst client's."""
    scores = [metrics["local_f1"] for _, metrics in results if "local_f1" in metrics]
    worst = {"worst_local_f1": min(scores)} if scores else {}
    return {**weighted_mean_of("local_f1")(results), **worst}


def server_app(context: ServerContext) -> ServerApp:
    """Central evaluation, a decaying learning rate and the clients' F1, aggregated."""
    _, (test_x, test_y) = digits_split(context.seed)
    start = context.config.client.learning_rate
    decay = float(context.options.get("decay", "0.9"))

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        loss, accuracy = MODEL.evaluate(parameters.vector, test_x, test_y)
        macro_f1 = f1(parameters, test_x, test_y, average="macro")
        return {"loss": loss, "accuracy": accuracy, "macro_f1": macro_f1}

    def fit_config(round_number: int) -> dict[str, object]:
        return {"learning_rate": start * decay ** (round_number - 1), "f1_average": "macro"}

    return ServerApp(
        initial_parameters=lambda _: MODEL.init_parameters(np.random.default_rng(context.seed)),
        evaluate=evaluate,
        fit_config=fit_config,
        fit_metrics=local_f1_metrics,
        architecture="digits-mlp-32",
    )
