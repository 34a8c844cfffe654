"""A two-layer CNN on scikit-learn's 8x8 digits: one app, run simulated and deployed unchanged.

Every process (a simulated client, a deployed client, the coordinator)
loads the digits that ship with scikit-learn and cuts them the same way from
the run's seed: a quarter is held out for the coordinator's central
evaluation, the rest is split evenly across the clients, and each client
keeps a fifth of its share for federated evaluation. A client learns where
it stands from its context: its partition index among ``num_partitions``
(``shoal client run --partition-index I --num-partitions N`` when deployed).

``[client]`` sets the local training (epochs, batch size, learning rate);
``[client] dp_sgd = true`` trains with record-level DP-SGD through Opacus
(see ``job-dp.toml``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from shoal import ClientApp, ClientContext, ServerApp, ServerContext
from shoal.client.api import EvaluateConfig
from shoal.client.dp_sgd import DpSgdSettings
from shoal.client.torch_client import TorchClient
from shoal.core.parameters import Parameters

TEST_FRACTION = 0.25  # of all digits, held out for the central evaluation
LOCAL_EVAL_FRACTION = 0.2  # of a client's share, kept for federated evaluation

Arrays = tuple[np.ndarray, np.ndarray]

# The model is tiny: one thread per process trains it fastest (more only hand the small
# convolutions back and forth), and a simulation already runs its clients in parallel processes.
torch.set_num_threads(1)


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (16 and 32 channels), a 2x2 max pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = functional.relu(self.conv1(images))
        hidden = functional.max_pool2d(functional.relu(self.conv2(hidden)), 2)
        return self.head(hidden.flatten(1))


def make_model(seed: int) -> DigitsCNN:
    """The CNN with weights drawn from ``seed`` (the global torch generator is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DigitsCNN()


@functools.cache
def digits_split(seed: int) -> tuple[Arrays, Arrays]:
    """(train, test): images (n, 1, 8, 8) in [0, 1] and their labels, shuffled by ``seed``."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(labels.size)
    held = round(TEST_FRACTION * labels.size)
    test, train = order[:held], order[held:]
    return (images[train], labels[train]), (images[test], labels[test])


def client_data(seed: int, index: int, count: int) -> tuple[Arrays, Arrays]:
    """Client ``index`` of ``count``: its (train, local evaluation) share of the training split."""
    (images, labels), _ = digits_split(seed)
    share = np.array_split(np.arange(labels.size), count)[index]
    held = round(LOCAL_EVAL_FRACTION * share.size)
    local_eval, local_train = share[:held], share[held:]
    return (images[local_train], labels[local_train]), (images[local_eval], labels[local_eval])


def loader(arrays: Arrays, *, batch_size: int, shuffle: bool = False) -> DataLoader:
    images, labels = arrays
    dataset = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    return DataLoader(dataset, batch_size=batch_size or len(dataset), shuffle=shuffle)


def client_fn(context: ClientContext) -> TorchClient:
    """This client's CNN on its share of the digits, with DP-SGD when ``[client] dp_sgd``."""
    index, count = context.require_partition()
    train, local_eval = client_data(context.seed, index, count)
    settings = context.config.client
    dp_sgd = None
    if settings.dp_sgd:
        dp_sgd = DpSgdSettings(
            clip_norm=settings.dp_sgd_clip_norm,
            noise_multiplier=settings.dp_sgd_noise_multiplier,
            delta=settings.dp_sgd_delta or 1 / train[1].size,
            secure=context.config.privacy.secure_noise,
        )
    return TorchClient(
        make_model(context.seed),
        loss_fn=functional.cross_entropy,
        train_loader=loader(train, batch_size=settings.batch_size, shuffle=True),
        eval_loader=loader(local_eval, batch_size=256),
        dp_sgd=dp_sgd,
    )


def num_examples(context: ClientContext) -> tuple[int, int]:
    """(train, local evaluation) examples of a client: the simulator times its device by them."""
    train, local_eval = client_data(context.seed, *context.require_partition())
    return train[1].size, local_eval[1].size


client_app = ClientApp(client_fn, num_examples=num_examples)


def server_app(context: ServerContext) -> ServerApp:
    """The seeded initial CNN, and each new model evaluated on the held-out test split."""
    _, test = digits_split(context.seed)
    evaluator = TorchClient(
        make_model(context.seed),
        loss_fn=functional.cross_entropy,
        eval_loader=loader(test, batch_size=256),
    )

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        result = evaluator.evaluate(parameters, EvaluateConfig(round=round_number))
        return {"loss": result.loss, "accuracy": result.metrics["accuracy"]}

    return ServerApp(
        initial_parameters=lambda _: evaluator.get_parameters(),
        evaluate=evaluate,
        architecture="digits-cnn-v1",
    )
