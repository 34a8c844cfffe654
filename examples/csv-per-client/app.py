"""Sites that each hold a CSV file of their own, and a NumPy softmax regression (core install).

A client reads its own file from the folder ``[app] options.data`` (default
``data/clients``, relative to the current directory) with
``shoal.datasets.partition_folder``: files sorted by name, client ``i`` takes
the ``i``-th, so the simulation needs as many clients as files. A deployed
site puts its one file in a folder of its own and runs
``shoal client run ... --option data=FOLDER --partition-index 0 --num-partitions 1``.
The coordinator evaluates each model on ``[app] options.test`` (default
``data/server/test.csv``). Write the files with ``python make_data.py data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shoal import ClientContext, ServerApp, ServerContext
from shoal.client.numpy_models import NumpyClient, SoftmaxRegression
from shoal.core.errors import ConfigError
from shoal.core.parameters import Parameters
from shoal.datasets import partition_folder

PIXEL_MAX = 16.0  # the files hold pixel intensities 0..16; the model sees them in [0, 1]
LOCAL_EVAL_FRACTION = 0.2  # of a site's rows, kept for federated evaluation
MODEL = SoftmaxRegression(num_features=64, num_classes=10)


def read_site(folder: str, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The features (scaled) and labels of site ``index`` of ``count`` in ``folder``."""
    sites = partition_folder(folder, label="label")
    if len(sites) != count:
        raise ConfigError(
            f"{folder} holds {len(sites)} client files but the run has {count} clients: "
            "set data.num_clients (or --num-partitions) to the number of files"
        )
    features, labels = sites[index].to_numpy()
    return features / PIXEL_MAX, labels


def client_fn(context: ClientContext) -> NumpyClient:
    """Site ``partition_index`` trains on its file, less a fifth kept for local evaluation."""
    index, count = context.require_partition()
    features, labels = read_site(context.options.get("data", "data/clients"), index, count)
    order = np.random.default_rng([context.seed, index]).permutation(labels.size)
    held = round(LOCAL_EVAL_FRACTION * labels.size)
    local_eval, train = order[:held], order[held:]
    return NumpyClient(
        MODEL,
        train_data=(features[train], labels[train]),
        eval_data=(features[local_eval], labels[local_eval]),
    )


def server_app(context: ServerContext) -> ServerApp:
    """Starts from zeros (the loss is convex) and evaluates every model on the held-out file."""
    test = Path(context.options.get("test", "data/server/test.csv"))
    features, labels = partition_folder(test.parent, label="label")[test.stem].to_numpy()
    features = features / PIXEL_MAX

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        loss, accuracy = MODEL.evaluate(parameters.vector, features, labels)
        return {"loss": loss, "accuracy": accuracy}

    return ServerApp(
        initial_parameters=lambda _: MODEL.init_parameters(np.random.default_rng(0)),
        evaluate=evaluate,
        architecture="digits-softmax-v1",
    )
