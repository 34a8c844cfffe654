"""The built-in app: Shoal's datasets and NumPy models, written with the public app API.

``[data]`` picks the dataset (scikit-learn's digits, FedProx's
Synthetic(alpha, beta) generated lazily per device, or Gaussian classes)
and how it is split; ``[model]`` the NumPy model (softmax regression or a
one-hidden-layer MLP); ``[client]`` the local training. The same app runs in
simulation and on deployed clients (``shoal client run --partition-index I
--num-partitions N``): every client derives its share from the config and
the seed, so no data ever moves. The server side gives the initial model
and evaluates each committed model on the central held-out test set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.client.api import Client
from shoal.client.app import ClientApp, ClientContext
from shoal.client.dp_sgd import DpSgdSettings
from shoal.client.numpy_models import MLP, NumpyClient, SoftmaxRegression
from shoal.config import Config
from shoal.coordinator.app import ServerApp, ServerContext
from shoal.core.errors import ConfigError, DataError
from shoal.core.parameters import Parameters
from shoal.simulation.datasets import Dataset, SyntheticFederation, load_digits_split
from shoal.simulation.partition import (
    partition_dirichlet,
    partition_iid,
    partition_power_law,
    partition_shards,
)
from shoal.simulation.population import ClientNames, client_index, client_name

Features = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
NumpyModel = SoftmaxRegression | MLP

_CENTRAL_TEST_DEVICES = 200
_CACHED_CLIENTS = 4096
_CACHED_CONFIGS = 8
_GAUSSIAN_TEST_SAMPLES = 2000
_GAUSSIAN_SEPARATION = 1.5


@dataclass(frozen=True, slots=True)
class LocalData:
    """One client's data: a training part and a local evaluation part."""

    train_x: Features
    train_y: Labels
    eval_x: Features
    eval_y: Labels


class DataScenario:
    """The built-in scenarios: digits, FedProx synthetic and Gaussian classes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.client_ids = ClientNames(config.data.num_clients)

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "client_ids": self.client_ids}  # caches stay per process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self.client_ids = state["client_ids"]

    # --- sizes ---------------------------------------------------------------------------

    def num_train_examples(self, client_id: str) -> int:
        return self._sizes(client_id)[0]

    def num_eval_examples(self, client_id: str) -> int:
        return self._sizes(client_id)[1]

    def _sizes(self, client_id: str) -> tuple[int, int]:
        """A client's (train, evaluate) example counts, from sizes alone: the coordinator's
        process times devices with them and never builds a client's data to count it."""
        data, index = self.config.data, client_index(client_id)
        if data.dataset in {"synthetic", "synthetic_iid"}:
            synthetic = self._synthetic
            train = synthetic.num_train_samples(index)
            return train, synthetic.num_samples(index) - train
        total = (
            data.samples_per_client
            if data.dataset == "gaussian"
            else int(self._digits_partition[index][1].size)
        )
        held = self._held_out(total)
        return total - held, held

    # --- model and clients ---------------------------------------------------------------

    @functools.cached_property
    def model(self) -> NumpyModel:
        features, classes = self._shape()
        if self.config.model.kind == "mlp":
            return MLP(
                num_features=features, num_hidden=self.config.model.hidden, num_classes=classes
            )
        return SoftmaxRegression(num_features=features, num_classes=classes)

    def initial_parameters(self) -> Parameters:
        return self._initial

    @functools.cached_property
    def _initial(self) -> Parameters:
        return self.model.init_parameters(np.random.default_rng([self.config.run.seed, 0x1A17]))

    def build_client(self, client_id: str) -> Client:
        data = self.local_data(client_id)
        settings = self.config.client
        dp_sgd = None
        if settings.dp_sgd:
            examples = max(1, int(data.train_y.size))
            dp_sgd = DpSgdSettings(
                clip_norm=settings.dp_sgd_clip_norm,
                noise_multiplier=settings.dp_sgd_noise_multiplier,
                secure=self.config.privacy.secure_noise,
                delta=settings.dp_sgd_delta or min(0.5, 1 / examples),
            )
        return NumpyClient(
            self.model,
            train_data=(data.train_x, data.train_y),
            eval_data=(data.eval_x, data.eval_y),
            parameters=self._initial,
            dp_sgd=dp_sgd,
        )

    def central_test_data(self) -> tuple[Features, Labels]:
        """The central held-out test set (features, labels)."""
        return self._central_test

    def probabilities(self, parameters: Parameters, features: np.ndarray) -> np.ndarray:
        """The model's class probabilities of each row of ``features``."""
        return self.model.probabilities(parameters.vector, np.asarray(features, np.float32))

    def evaluate_centrally(self, parameters: Parameters) -> tuple[float, float]:
        test_x, test_y = self._central_test
        loss, accuracy = self.model.evaluate(parameters.vector, test_x, test_y)
        return float(loss), float(accuracy)

    # --- data ----------------------------------------------------------------------------

    def _shape(self) -> tuple[int, int]:
        return self.config.data.shape

    def local_data(self, client_id: str) -> LocalData:
        index = client_index(client_id)
        if not 0 <= index < len(self.client_ids):
            raise DataError(f"no client {client_id!r} in a population of {len(self.client_ids)}")
        return self._local_data(index)

    def _local_data(self, index: int) -> LocalData:
        cache = self._cache
        if index not in cache:
            if len(cache) >= _CACHED_CLIENTS:
                cache.clear()
            cache[index] = self._make_local_data(index)
        return cache[index]

    @functools.cached_property
    def _cache(self) -> dict[int, LocalData]:
        return {}

    def _make_local_data(self, index: int) -> LocalData:
        dataset = self.config.data.dataset
        if dataset == "digits":
            x, y = self._digits_partition[index]
            return self._split_local(x, y, index)
        if dataset == "gaussian":
            x, y = self._gaussian(
                np.random.default_rng([self.config.run.seed, 0x6A55, index]),
                self.config.data.samples_per_client,
            )
            return self._split_local(x, y, index)
        train, test = self._synthetic.device(index)
        return LocalData(train.features, train.labels, test.features, test.labels)

    def _split_local(self, x: Features, y: Labels, index: int) -> LocalData:
        rng = np.random.default_rng([self.config.run.seed, 0x10CA1, index])
        order = rng.permutation(y.size)
        held = self._held_out(y.size)
        evaluation, training = order[:held], order[held:]
        return LocalData(x[training], y[training], x[evaluation], y[evaluation])

    def _held_out(self, count: int) -> int:
        """How many of a client's ``count`` examples it keeps for local evaluation."""
        held = round(self.config.data.local_eval_fraction * count)
        return 0 if count - held < 1 else held

    @functools.cached_property
    def _digits(self) -> tuple[Dataset, Dataset]:
        return load_digits_split(
            test_fraction=self.config.data.test_fraction, seed=self.config.run.seed
        )

    @functools.cached_property
    def _digits_partition(self) -> list[tuple[Features, Labels]]:
        train, _ = self._digits
        data = self.config.data
        rng = np.random.default_rng([self.config.run.seed, 0x9A27])
        if data.partition == "iid":
            parts = partition_iid(
                num_examples=train.labels.size, num_clients=data.num_clients, rng=rng
            )
        elif data.partition == "dirichlet":
            parts = partition_dirichlet(
                train.labels,
                num_clients=data.num_clients,
                alpha=data.dirichlet_alpha,
                rng=rng,
                min_size=data.min_samples,
            )
        elif data.partition == "shards":
            parts = partition_shards(
                train.labels,
                num_clients=data.num_clients,
                shards_per_client=data.shards_per_client,
                rng=rng,
            )
        else:
            parts = partition_power_law(
                num_examples=train.labels.size,
                num_clients=data.num_clients,
                exponent=data.power_law_exponent,
                min_size=data.min_samples,
                rng=rng,
            )
        return [(train.features[part], train.labels[part]) for part in parts]

    @functools.cached_property
    def _synthetic(self) -> SyntheticFederation:
        data = self.config.data
        iid = data.dataset == "synthetic_iid"
        return SyntheticFederation(  # the IID devices share one model: no alpha or beta
            alpha=0.0 if iid else data.synthetic_alpha,
            beta=0.0 if iid else data.synthetic_beta,
            iid=iid,
            num_devices=data.num_clients,
            seed=self.config.run.seed,
            max_samples=data.max_samples_per_client,
        )

    @functools.cached_property
    def _gaussian_means(self) -> Features:
        data = self.config.data
        rng = np.random.default_rng([self.config.run.seed, 0x6A55])
        means = rng.normal(size=(data.num_classes, data.num_features))
        scaled: Features = (means * _GAUSSIAN_SEPARATION / np.sqrt(data.num_features)).astype(
            np.float32
        )
        return scaled

    def _gaussian(self, rng: np.random.Generator, count: int) -> tuple[Features, Labels]:
        labels = rng.integers(0, self.config.data.num_classes, size=count)
        noise = rng.standard_normal((count, self.config.data.num_features), dtype=np.float32)
        return self._gaussian_means[labels] + noise * np.float32(0.5), labels.astype(np.int64)

    @functools.cached_property
    def _central_test(self) -> tuple[Features, Labels]:
        dataset = self.config.data.dataset
        if dataset == "digits":
            test = self._digits[1]
            return test.features, test.labels
        if dataset == "gaussian":
            return self._gaussian(
                np.random.default_rng([self.config.run.seed, 0x7E57]), _GAUSSIAN_TEST_SAMPLES
            )
        count = len(self.client_ids)
        picks = np.unique(np.linspace(0, count - 1, min(count, _CENTRAL_TEST_DEVICES)).astype(int))
        parts = [self._synthetic.device(int(index))[1] for index in picks]
        return np.concatenate([p.features for p in parts]), np.concatenate(
            [p.labels for p in parts]
        )


_SCENARIOS: dict[int, tuple[Config, DataScenario]] = {}


def scenario_of(config: Config) -> DataScenario:
    """The scenario of ``config``, built once per process (its data is cached inside)."""
    held = _SCENARIOS.get(id(config))
    if held is None or held[0] is not config:
        if len(_SCENARIOS) >= _CACHED_CONFIGS:
            _SCENARIOS.clear()
        held = (config, DataScenario(config))
        _SCENARIOS[id(config)] = held
    return held[1]


def _client(context: ClientContext) -> Client:
    index, count = _placement(context)
    return scenario_of(_population_config(context.config, count)).build_client(client_name(index))


def _num_examples(context: ClientContext) -> tuple[int, int]:
    index, count = _placement(context)
    scenario = scenario_of(_population_config(context.config, count))
    name = client_name(index)
    return scenario.num_train_examples(name), scenario.num_eval_examples(name)


def _placement(context: ClientContext) -> tuple[int, int]:
    index, count = context.require_partition()
    if not 0 <= index < count:
        raise ConfigError(f"partition index must be in [0, {count}), got {index}")
    return index, count


def _population_config(config: Config, count: int) -> Config:
    """``config`` for a population of ``count`` (a deployed client may be told another size)."""
    if count == config.data.num_clients:
        return config
    return config.model_copy(update={"data": config.data.model_copy(update={"num_clients": count})})


client_app = ClientApp(_client, num_examples=_num_examples)
"""The built-in client app: one client's share of the ``[data]`` dataset, the ``[model]`` model."""


def server_app(context: ServerContext) -> ServerApp:
    """The built-in server app: the model's seeded initial parameters, the central test set
    (standardized by the run's scaler, as every client's data is)."""
    scenario = scenario_of(context.config)
    scaler = context.scaler

    @functools.cache
    def test_data() -> tuple[Features, Labels]:
        features, labels = scenario.central_test_data()
        return (features if scaler is None else scaler.transform(features)), labels

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        features, labels = test_data()
        loss, accuracy = scenario.model.evaluate(parameters.vector, features, labels)
        return {"loss": float(loss), "accuracy": float(accuracy)}

    return ServerApp(
        initial_parameters=lambda _: scenario.initial_parameters(),
        evaluate=evaluate,
        architecture=context.config.model.kind,
        test_data=test_data,
        probabilities=scenario.probabilities,
    )
