"""Datasets for simulations: scikit-learn's digits and FedProx's Synthetic(alpha, beta).

Nothing is downloaded: digits ships with scikit-learn and the synthetic
federation is generated. :class:`SyntheticFederation` is lazy: a device's data
exists only while someone holds the :class:`Dataset` it returned, so a
federation of 100,000 devices costs nothing until devices are asked for.

>>> federation = SyntheticFederation(alpha=0.5, beta=0.5, num_devices=30, seed=0)
>>> train, test = federation.device(3)
>>> train.features.shape[1], train.num_classes
(60, 10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError, DataError

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]
_Matrix = npt.NDArray[np.float64]

SYNTHETIC_DIMENSION = 60
SYNTHETIC_CLASSES = 10
# Per-dimension variances of x in the reference generator: Sigma = diag(j^-1.2).
SYNTHETIC_VARIANCES = np.arange(1, SYNTHETIC_DIMENSION + 1, dtype=np.float64) ** -1.2

# Spawn-key prefixes that keep the federation's random streams apart.
_DEVICE_STREAM = 0
_GLOBAL_STREAM = 1
_COUNT_STREAM = 0
_DATA_STREAM = 1
_SPLIT_STREAM = 2


@dataclass(frozen=True, eq=False, slots=True)
class Dataset:
    """Labelled examples: float32 features (n, d), int64 labels (n,), number of classes."""

    features: FloatArray
    labels: LabelArray
    num_classes: int

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.dtype != np.float32:
            raise DataError(
                f"features must be a 2-D float32 array, got {self.features.ndim}-D "
                f"{self.features.dtype}"
            )
        if self.labels.ndim != 1 or self.labels.dtype != np.int64:
            raise DataError(
                f"labels must be a 1-D int64 array, got {self.labels.ndim}-D {self.labels.dtype}"
            )
        if self.labels.shape[0] != self.features.shape[0]:
            raise DataError(
                f"{self.features.shape[0]} feature rows but {self.labels.shape[0]} labels"
            )
        if self.num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DataError(f"labels must lie in [0, {self.num_classes}), got values outside")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def subset(self, indices: npt.NDArray[np.integer]) -> Dataset:
        """The examples at ``indices`` (copies), e.g. one client's partition."""
        return Dataset(self.features[indices], self.labels[indices], self.num_classes)


class DeviceData(NamedTuple):
    """One synthetic device's local data: a training part and a held-out part."""

    train: Dataset
    test: Dataset


def load_digits_split(*, test_fraction: float = 0.25, seed: int) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits (1,797 images, 64 features in [0, 1], 10 classes).

    The split is stratified by label and deterministic in ``seed``; returns
    ``(train, test)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    features = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    total, classes = len(labels), 10
    tested = math.ceil(test_fraction * total)  # how scikit-learn rounds a fractional test size
    if not classes <= tested <= total - classes:
        low, high = classes / total, 1 - classes / total
        raise ConfigError(
            f"data.test_fraction = {test_fraction:g} leaves {tested} of digits' {total} "
            f"examples to test on and {total - tested} to train on; a split stratified by "
            f"label needs at least {classes} in each: use {math.ceil(low * 1000) / 1000:g} "
            f"to {math.floor(high * 1000) / 1000:g}"
        )
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return Dataset(train_x, train_y, 10), Dataset(test_x, test_y, 10)


def synthetic_sample_count(rng: np.random.Generator, *, max_samples: int | None = None) -> int:
    """A device's sample count as in the reference: ``int(lognormal(4, 2)) + 50``, capped."""
    count = int(rng.lognormal(4.0, 2.0)) + 50
    return count if max_samples is None else min(count, max_samples)


def synthetic_device_model(
    rng: np.random.Generator, *, alpha: float, beta: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The non-IID device's (mean of x, W, b), drawn in the reference's order.

    mean_W ~ N(0, alpha), mean_b = mean_W, B ~ N(0, beta), v ~ N(B, 1) per
    dimension, W ~ N(mean_W, 1) (60 x 10), b ~ N(mean_b, 1); alpha and beta
    are standard deviations.
    """
    mean_w = rng.normal(0.0, alpha)
    shift = rng.normal(0.0, beta)
    mean_x = rng.normal(shift, 1.0, SYNTHETIC_DIMENSION)
    weight = rng.normal(mean_w, 1.0, (SYNTHETIC_DIMENSION, SYNTHETIC_CLASSES))
    bias = rng.normal(mean_w, 1.0, SYNTHETIC_CLASSES)
    return mean_x, weight, bias


def synthetic_global_model(
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The IID variant's shared (W, b), both standard normal as in the reference."""
    weight = rng.normal(0.0, 1.0, (SYNTHETIC_DIMENSION, SYNTHETIC_CLASSES))
    bias = rng.normal(0.0, 1.0, SYNTHETIC_CLASSES)
    return weight, bias


def sample_synthetic_examples(
    rng: np.random.Generator,
    *,
    mean_x: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    bias: npt.NDArray[np.float64],
    num_samples: int,
) -> Dataset:
    """x ~ N(mean_x, diag(j^-1.2)) and y = argmax(softmax(x W + b)) for each example."""
    noise = rng.standard_normal((num_samples, SYNTHETIC_DIMENSION))
    features = mean_x + noise * np.sqrt(SYNTHETIC_VARIANCES)
    # softmax is monotone, so the argmax of the logits is the argmax of the softmax.
    labels = np.argmax(features @ weight + bias, axis=1).astype(np.int64)
    return Dataset(features.astype(np.float32), labels, SYNTHETIC_CLASSES)


class SyntheticFederation:
    """FedProx's Synthetic(alpha, beta) and Synthetic-IID federations, generated lazily.

    The distributions are those of the reference generator (Li et al. 2020,
    github.com/litian96/FedProx, ``data/synthetic_*/generate_synthetic.py`` and
    ``data/synthetic_iid/generate_iid.py``): 60 features, 10 classes,
    ``int(lognormal(4, 2)) + 50`` samples per device. Non-IID devices draw
    their own model and feature mean (see :func:`synthetic_device_model`);
    IID devices share one W, b ~ N(0, 1) and all draw x ~ N(0, Sigma).

    Unlike the reference, which draws every device from one global stream,
    each device has its own stream derived from ``(seed, k)`` alone: device k
    is the same whichever other devices were generated, and in whatever
    order. Its sample count comes from a separate stream, so
    :meth:`num_samples` is cheap. ``max_samples`` caps the heavy-tailed
    counts (None: no cap, as in the reference). ``test_fraction`` is the
    held-out share of each device: the FedProx paper states 80/20, its
    released scripts use 90/10 (``test_fraction=0.1``).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.0,
        beta: float = 0.0,
        iid: bool = False,
        num_devices: int,
        seed: int,
        test_fraction: float = 0.2,
        max_samples: int | None = None,
    ) -> None:
        _check_synthetic_arguments(alpha, beta, iid, num_devices, seed, test_fraction, max_samples)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.iid = iid
        self.num_devices = num_devices
        self.seed = seed
        self.test_fraction = float(test_fraction)
        self.max_samples = max_samples
        self._global_model: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None

    def __len__(self) -> int:
        return self.num_devices

    def __repr__(self) -> str:
        kind = "iid" if self.iid else f"alpha={self.alpha}, beta={self.beta}"
        return f"SyntheticFederation({kind}, num_devices={self.num_devices}, seed={self.seed})"

    def num_samples(self, k: int) -> int:
        """Device k's total number of examples (train plus test), without generating them."""
        rng = self._stream(k, _COUNT_STREAM)
        return synthetic_sample_count(rng, max_samples=self.max_samples)

    def num_train_samples(self, k: int) -> int:
        """Device k's number of training examples."""
        return _train_size(self.num_samples(k), self.test_fraction)

    def device_model(self, k: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The (W, b) that label device k's examples: shared by all devices when IID."""
        _, _, weight, bias = self._device_draws(k)
        return weight, bias

    def device_dataset(self, k: int) -> Dataset:
        """All of device k's examples, in generation order (no train/test split)."""
        rng, mean_x, weight, bias = self._device_draws(k)
        return sample_synthetic_examples(
            rng, mean_x=mean_x, weight=weight, bias=bias, num_samples=self.num_samples(k)
        )

    def device(self, k: int) -> DeviceData:
        """Device k's data, shuffled and split into train and held-out parts."""
        data = self.device_dataset(k)
        order = self._stream(k, _SPLIT_STREAM).permutation(len(data))
        num_train = _train_size(len(data), self.test_fraction)
        return DeviceData(data.subset(order[:num_train]), data.subset(order[num_train:]))

    def _stream(self, k: int, stream: int) -> np.random.Generator:
        if not 0 <= k < self.num_devices:
            raise DataError(f"device index {k} outside [0, {self.num_devices})")
        sequence = np.random.SeedSequence(self.seed, spawn_key=(_DEVICE_STREAM, k, stream))
        return np.random.default_rng(sequence)

    def _device_draws(
        self, k: int
    ) -> tuple[np.random.Generator, npt.NDArray[np.float64], _Matrix, _Matrix]:
        """Device k's data stream, positioned after its model draws, and that model."""
        rng = self._stream(k, _DATA_STREAM)
        if self.iid:
            weight, bias = self._shared_model()
            return rng, np.zeros(SYNTHETIC_DIMENSION), weight, bias
        mean_x, weight, bias = synthetic_device_model(rng, alpha=self.alpha, beta=self.beta)
        return rng, mean_x, weight, bias

    def _shared_model(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        if self._global_model is None:
            sequence = np.random.SeedSequence(self.seed, spawn_key=(_GLOBAL_STREAM,))
            self._global_model = synthetic_global_model(np.random.default_rng(sequence))
        return self._global_model


def _train_size(num_samples: int, test_fraction: float) -> int:
    """The reference's ``int(train_share * n)``, keeping at least one training example."""
    return min(num_samples, max(1, int((1.0 - test_fraction) * num_samples)))


def _check_synthetic_arguments(
    alpha: float,
    beta: float,
    iid: bool,
    num_devices: int,
    seed: int,
    test_fraction: float,
    max_samples: int | None,
) -> None:
    if not (math.isfinite(alpha) and alpha >= 0 and math.isfinite(beta) and beta >= 0):
        raise DataError(f"alpha and beta are standard deviations >= 0, got {alpha}, {beta}")
    if iid and (alpha != 0 or beta != 0):
        raise DataError("the IID variant has no alpha or beta: leave them at 0")
    if num_devices < 1:
        raise DataError(f"num_devices must be >= 1, got {num_devices}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be >= 1 or None, got {max_samples}")
