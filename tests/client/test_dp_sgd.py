"""Tests of record-level DP-SGD: settings, per-example gradients, clipping, noise, both clients.

Statistical tests use fixed large samples and bounds of five standard errors
or more; the noise in secure mode is unpredictable by design, so those tests
cannot be seeded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shoal.client.api import EvaluateConfig, FitConfig, FitResult
from shoal.client.dp_sgd import (
    DpSgdSettings,
    PerExampleGradientModel,
    PoissonBatches,
    dp_sgd_gradient,
    per_example_clip_factors,
    poisson_sampling_rate,
    record_level_epsilon,
)
from shoal.client.numpy_models import (
    MLP,
    NumpyClient,
    NumpyModel,
    SoftmaxRegression,
    count_steps,
    local_sgd,
)
from shoal.core.errors import ClientError, ConfigError
from shoal.core.parameters import Parameters
from shoal.privacy.noise import InsecureNoiseWarning, NoiseSource
from shoal.simulation.datasets import Dataset, load_digits_split

FloatArray = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_split(test_fraction=0.25, seed=0)


def small_problem(seed: int, *, num_examples: int = 9) -> tuple[FloatArray, Labels]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_examples, 5)), rng.integers(0, 4, num_examples)


def small_models(weight_decay: float = 0.0) -> list[SoftmaxRegression | MLP]:
    return [
        SoftmaxRegression(num_features=5, num_classes=4, weight_decay=weight_decay),
        MLP(num_features=5, num_hidden=6, num_classes=4, weight_decay=weight_decay),
    ]


def seeded_settings(**options: Any) -> DpSgdSettings:
    """Non-secure settings: reproducible, and the caller must expect the warning."""
    return DpSgdSettings(secure=False, **{"clip_norm": 1.0, "noise_multiplier": 1.0, **options})


# --- settings ------------------------------------------------------------------


def test_secure_mode_is_the_default_and_draws_from_the_csprng() -> None:
    dp = DpSgdSettings(clip_norm=1.0, noise_multiplier=1.1)
    assert dp.secure
    assert dp.delta == 1e-5
    assert dp.noise_source(np.random.default_rng(0)).is_secure


def test_non_secure_mode_warns_and_uses_the_given_generator() -> None:
    with pytest.warns(InsecureNoiseWarning):
        source = seeded_settings().noise_source(np.random.default_rng(4))
    assert not source.is_secure
    np.testing.assert_array_equal(source.uniform(3), np.random.default_rng(4).random(3))


def test_settings_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        DpSgdSettings(1.0, 1.0)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": math.inf}, "clip_norm"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"clip_norm": 1e300, "noise_multiplier": 1e300}, "overflows"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DpSgdSettings(**{"clip_norm": 1.0, "noise_multiplier": 1.0, **options})


def test_zero_noise_is_allowed() -> None:
    assert DpSgdSettings(clip_norm=1.0, noise_multiplier=0.0).noise_multiplier == 0.0


# --- sampling ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_examples", "batch_size", "rate"),
    [(100, 10, 0.1), (100, 0, 1.0), (100, 500, 1.0), (1, 1, 1.0), (1347, 64, 64 / 1347)],
)
def test_sampling_rate_is_batch_over_examples(
    num_examples: int, batch_size: int, rate: float
) -> None:
    assert poisson_sampling_rate(num_examples=num_examples, batch_size=batch_size) == rate


def test_sampling_rate_needs_examples() -> None:
    with pytest.raises(ConfigError, match="at least one example"):
        poisson_sampling_rate(num_examples=0, batch_size=1)
    with pytest.raises(ConfigError, match="batch_size"):
        poisson_sampling_rate(num_examples=3, batch_size=-1)


def test_poisson_batches_include_each_example_at_the_sampling_rate() -> None:
    batches = PoissonBatches(
        num_examples=1000, sampling_rate=0.05, num_batches=400, noise=NoiseSource.secure()
    )
    assert len(batches) == 400
    drawn = list(batches)
    assert len(drawn) == 400
    sizes = np.array([len(batch) for batch in drawn])
    # 400,000 Bernoulli(0.05) trials: the standard error of the rate is 3.4e-4.
    assert abs(sizes.sum() / 400_000 - 0.05) < 0.002
    assert len(set(sizes.tolist())) > 5  # batch sizes vary
    assert all(batch == sorted(set(batch)) for batch in drawn)  # no repeats, in order
    counts = np.bincount(np.concatenate(drawn), minlength=1000)
    assert counts.min() >= 1  # expected 20 each: P(a given example is never drawn) = 1e-9


def test_poisson_batches_edge_cases() -> None:
    noise = NoiseSource.secure()
    full = PoissonBatches(num_examples=4, sampling_rate=1.0, num_batches=2, noise=noise)
    assert list(full) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert list(PoissonBatches(num_examples=0, sampling_rate=0.5, num_batches=2, noise=noise)) == [
        [],
        [],
    ]
    assert list(PoissonBatches(num_examples=5, sampling_rate=0.5, num_batches=0, noise=noise)) == []
    with pytest.raises(ConfigError, match="sampling rate"):
        PoissonBatches(num_examples=5, sampling_rate=0.0, num_batches=1, noise=noise)
    with pytest.raises(ConfigError, match="sampling rate"):
        PoissonBatches(num_examples=5, sampling_rate=1.5, num_batches=1, noise=noise)


# --- per-example gradients -------------------------------------------------------


def numeric_gradient(model: NumpyModel, vector: FloatArray, x: FloatArray, y: Labels) -> FloatArray:
    gradient = np.zeros_like(vector)
    step = 1e-6
    for index in range(vector.size):
        plus, minus = vector.copy(), vector.copy()
        plus[index] += step
        minus[index] -= step
        gradient[index] = (
            model.loss_and_gradient(plus, x, y)[0] - model.loss_and_gradient(minus, x, y)[0]
        ) / (2 * step)
    return gradient


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32), weight_decay=st.sampled_from([0.0, 0.3]))
def test_per_example_gradients_average_to_the_batch_gradient(
    seed: int, weight_decay: float
) -> None:
    x, y = small_problem(seed)
    for model in small_models(weight_decay):
        assert isinstance(model, PerExampleGradientModel)
        vector = np.random.default_rng(seed).normal(size=model.layout.size)
        loss, gradient = model.loss_and_gradient(vector, x, y)
        data_loss, rows = model.per_example_gradients(vector, x, y)
        assert rows.shape == (9, model.layout.size)
        mean = rows.mean(axis=0)
        penalty = model.add_weight_decay_(vector, mean)
        np.testing.assert_allclose(mean, gradient, rtol=1e-10, atol=1e-12)
        assert data_loss + penalty == pytest.approx(loss, rel=1e-12)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_each_row_is_its_own_examples_gradient(seed: int) -> None:
    x, y = small_problem(seed, num_examples=4)
    for model in small_models():
        vector = np.random.default_rng(seed).normal(size=model.layout.size)
        _, rows = model.per_example_gradients(vector, x, y)
        for index in range(4):
            single = numeric_gradient(model, vector, x[index : index + 1], y[index : index + 1])
            np.testing.assert_allclose(rows[index], single, rtol=1e-5, atol=1e-7)


def test_per_example_gradients_keep_float32() -> None:
    x, y = small_problem(1)
    for model in small_models():
        vector = np.ones(model.layout.size, np.float32)
        _, rows = model.per_example_gradients(vector, x.astype(np.float32), y)
        assert rows.dtype == np.float32


# --- clipping and noise ------------------------------------------------------------


def test_clip_factors_leave_short_rows_alone_and_shorten_long_ones() -> None:
    rows = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [0.6, 0.8]])  # norms 5, 0.5, 0, 1
    factors = per_example_clip_factors(rows, clip_norm=1.0)
    np.testing.assert_array_equal(factors, [0.2, 1.0, 1.0, 1.0])
    assert per_example_clip_factors(np.zeros((0, 3)), clip_norm=1.0).shape == (0,)


def test_one_huge_example_moves_the_gradient_by_at_most_c_over_b() -> None:
    rows = np.zeros((16, 50))
    rows[3] = 1e9 * np.random.default_rng(0).normal(size=50)
    gradient = dp_sgd_gradient(
        rows,
        clip_norm=0.7,
        noise_multiplier=0.0,
        expected_batch_size=16,
        noise=NoiseSource.secure(),
    )
    assert np.linalg.norm(gradient) == pytest.approx(0.7 / 16, rel=1e-12)


def test_clipped_mean_without_noise() -> None:
    rows = np.array([[30.0, 40.0], [0.3, 0.4]])
    gradient = dp_sgd_gradient(
        rows, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=2, noise=NoiseSource.secure()
    )
    np.testing.assert_allclose(gradient, [0.45, 0.6])
    empty = dp_sgd_gradient(
        np.zeros((0, 3)),
        clip_norm=1.0,
        noise_multiplier=0.0,
        expected_batch_size=2,
        noise=NoiseSource.secure(),
    )
    np.testing.assert_array_equal(empty, np.zeros(3))


def test_dp_sgd_gradient_rejects_bad_input() -> None:
    noise = NoiseSource.secure()
    with pytest.raises(ConfigError, match="per-example"):
        dp_sgd_gradient(
            np.zeros(3), clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1, noise=noise
        )
    with pytest.raises(ConfigError, match="expected_batch_size"):
        dp_sgd_gradient(
            np.zeros((1, 3)),
            clip_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=0,
            noise=noise,
        )


def test_added_noise_is_gaussian_with_std_z_c_over_b() -> None:
    z, clip_norm, batch, size = 1.3, 0.7, 16, 200_000
    rows = np.zeros((batch, size))  # the signal is zero: what comes out is the noise alone
    gradient = dp_sgd_gradient(
        rows,
        clip_norm=clip_norm,
        noise_multiplier=z,
        expected_batch_size=batch,
        noise=NoiseSource.secure(),
    )
    standardized = gradient / (z * clip_norm / batch)
    # Standard errors for n = 200,000: mean 0.0022, std 0.0016.
    assert abs(standardized.mean()) < 0.012
    assert abs(standardized.std() - 1.0) < 0.008
    assert stats.kstest(standardized, "norm").pvalue > 1e-4


def test_an_empty_batch_still_gets_the_noise() -> None:
    gradient = dp_sgd_gradient(
        np.zeros((0, 10_000)),
        clip_norm=2.0,
        noise_multiplier=1.0,
        expected_batch_size=4,
        noise=NoiseSource.secure(),
    )
    assert gradient.std() == pytest.approx(0.5, rel=0.05)


# --- local_sgd and the NumPy client --------------------------------------------------


def plain_sgd_reference(
    model: NumpyModel,
    start: Parameters,
    x: npt.NDArray[np.float32],
    y: Labels,
    *,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> npt.NDArray[np.float32]:
    """Mini-batch SGD as local_sgd ran it before DP-SGD existed, written out plainly."""
    rng = np.random.default_rng(seed)
    steps = count_steps(num_examples=len(y), epochs=epochs, batch_size=batch_size)
    weights = start.vector.copy()
    done = 0
    while done < steps:
        order = rng.permutation(len(y))
        for begin in range(0, len(y), batch_size):
            chosen = order[begin : begin + batch_size]
            _, gradient = model.loss_and_gradient(weights, x[chosen], y[chosen])
            gradient *= learning_rate
            weights -= gradient
            done += 1
            if done == steps:
                break
    return weights


NO_DP_OPTIONS: list[dict[str, Any]] = [{}, {"dp_sgd": None}]  # left out, or said to be off


def test_without_dp_sgd_training_is_bit_identical_to_plain_sgd(
    digits: tuple[Dataset, Dataset],
) -> None:
    train, _ = digits
    x, y = train.features[:300], train.labels[:300]
    model = MLP(num_features=64, num_hidden=16, num_classes=10)
    start = model.init_parameters(np.random.default_rng(0))
    epochs, batch_size, learning_rate = 2.5, 32, 0.3
    result, explicit = (
        local_sgd(
            model,
            start,
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            rng=np.random.default_rng(9),
            **dp_option,
        )
        for dp_option in NO_DP_OPTIONS
    )
    expected = plain_sgd_reference(
        model,
        start,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=9,
    )
    np.testing.assert_array_equal(result.parameters.vector, expected)
    np.testing.assert_array_equal(explicit.parameters.vector, expected)
    client = NumpyClient(model, train_data=(x, y))
    fit = client.fit(
        start, FitConfig(round=1, epochs=2.5, batch_size=32, learning_rate=0.3, seed=9)
    )
    assert set(fit.metrics) == {"loss", "steps"}
    assert isinstance(fit.parameters, Parameters)
    np.testing.assert_array_equal(fit.parameters.vector, expected)


@pytest.mark.parametrize("batch_size", [0, 5])
def test_one_changed_example_moves_a_dp_step_by_at_most_2_lr_c_over_b(batch_size: int) -> None:
    x, y = small_problem(5, num_examples=20)
    neighbor_x, neighbor_y = x.copy(), y.copy()
    neighbor_x[0], neighbor_y[0] = 1e6 * x[0], (y[0] + 1) % 4
    model = SoftmaxRegression(num_features=5, num_classes=4)
    start = Parameters.from_arrays([np.zeros((4, 5)), np.zeros(4)], names=["weight", "bias"])
    lr, clip_norm = 0.5, 0.1
    expected_batch = batch_size or 20

    def step(features: FloatArray, labels: Labels, dp: DpSgdSettings | None) -> np.ndarray:
        result = local_sgd(
            model,
            start,
            features,
            labels,
            epochs=0.01,
            batch_size=batch_size,
            learning_rate=lr,
            rng=np.random.default_rng(3),  # the same Poisson batch for both datasets
            dp_sgd=dp,
        )
        assert result.num_steps == 1
        return result.parameters.vector

    dp = DpSgdSettings(clip_norm=clip_norm, noise_multiplier=0.0, secure=False)
    with pytest.warns(InsecureNoiseWarning):
        moved = np.linalg.norm(step(x, y, dp) - step(neighbor_x, neighbor_y, dp))
    assert moved <= 2 * lr * clip_norm / expected_batch * (1 + 1e-6)
    if batch_size == 0:  # plain SGD on the same full batch: the outlier dominates
        unclipped = np.linalg.norm(step(x, y, None) - step(neighbor_x, neighbor_y, None))
        assert unclipped > 1000 * moved


def test_full_batch_dp_step_without_noise_is_the_clipped_mean() -> None:
    x, y = small_problem(6)
    model = MLP(num_features=5, num_hidden=6, num_classes=4, weight_decay=0.2)
    start = model.init_parameters(np.random.default_rng(1))
    dp = DpSgdSettings(clip_norm=0.05, noise_multiplier=0.0)
    result = local_sgd(
        model,
        start,
        x,
        y,
        epochs=1,
        batch_size=0,
        learning_rate=0.1,
        rng=np.random.default_rng(),
        dp_sgd=dp,
    )
    vector = start.vector.astype(np.float64)
    loss, rows = model.per_example_gradients(vector, x, y)
    factors = per_example_clip_factors(rows, clip_norm=0.05)
    gradient = factors @ rows / len(y)
    penalty = model.add_weight_decay_(vector, gradient)
    np.testing.assert_allclose(
        result.parameters.vector, vector - 0.1 * gradient, rtol=1e-5, atol=1e-7
    )
    assert result.train_loss == pytest.approx(loss + penalty, rel=1e-5)


def test_seeded_dp_sgd_is_reproducible_and_secure_dp_sgd_is_not(
    digits: tuple[Dataset, Dataset],
) -> None:
    train, _ = digits
    model = SoftmaxRegression(num_features=64, num_classes=10)

    def fit(dp: DpSgdSettings, seed: int) -> FitResult:
        client = NumpyClient(
            model, train_data=(train.features[:200], train.labels[:200]), dp_sgd=dp
        )
        return client.fit(client.get_parameters(), FitConfig(round=1, batch_size=20, seed=seed))

    def vector(result: FitResult) -> np.ndarray:
        assert isinstance(result.parameters, Parameters)
        return result.parameters.vector

    with pytest.warns(InsecureNoiseWarning):
        first, again, other = (fit(seeded_settings(), seed) for seed in (1, 1, 2))
    np.testing.assert_array_equal(vector(first), vector(again))
    assert not np.array_equal(vector(first), vector(other))
    secure = DpSgdSettings(clip_norm=1.0, noise_multiplier=1.0)
    assert not np.array_equal(vector(fit(secure, 1)), vector(fit(secure, 1)))


def test_digits_client_with_dp_sgd_still_learns(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    client = NumpyClient(
        MLP(num_features=64, num_hidden=32, num_classes=10),
        train_data=(train.features, train.labels),
        eval_data=(test.features, test.labels),
        dp_sgd=DpSgdSettings(clip_norm=1.0, noise_multiplier=1.0),
    )
    start = client.get_parameters()
    before = client.evaluate(start, EvaluateConfig(round=0))
    result = client.fit(start, FitConfig(round=1, epochs=3, batch_size=64, learning_rate=2.0))
    assert isinstance(result.parameters, Parameters)
    after = client.evaluate(result.parameters, EvaluateConfig(round=1))
    assert before.metrics["accuracy"] < 0.3
    assert after.metrics["accuracy"] > 0.6  # chance is 0.1; about 0.9 in practice
    assert result.metrics["steps"] == 66.0  # 3 * ceil(1347 / 64)
    assert result.metrics["dp_sgd_steps"] == 66.0
    assert result.metrics["dp_sgd_sampling_rate"] == 64 / 1347
    assert result.metrics["dp_sgd_noise_multiplier"] == 1.0
    assert result.metrics["dp_sgd_clip_norm"] == 1.0
    assert result.metrics["dp_sgd_delta"] == 1e-5


def test_proximal_term_still_pulls_under_dp_sgd(digits: tuple[Dataset, Dataset]) -> None:
    train, _ = digits
    model = SoftmaxRegression(num_features=64, num_classes=10)
    start = model.init_parameters(np.random.default_rng(0))
    dp = DpSgdSettings(clip_norm=1.0, noise_multiplier=0.0)

    def distance(mu: float) -> float:
        result = local_sgd(
            model,
            start,
            train.features,
            train.labels,
            epochs=2,
            batch_size=32,
            learning_rate=0.01,
            proximal_mu=mu,
            rng=np.random.default_rng(0),
            dp_sgd=dp,
        )
        return float(np.linalg.norm(result.parameters.vector - start.vector))

    assert distance(50.0) < 0.1 * distance(0.0)


def test_dp_sgd_needs_per_example_gradients() -> None:
    class OnlyBatchGradients:
        def __init__(self) -> None:
            self.inner = SoftmaxRegression(num_features=5, num_classes=4)
            self.num_classes = 4
            self.layout = self.inner.layout
            self.loss_and_gradient = self.inner.loss_and_gradient

    x, y = small_problem(0)
    model = OnlyBatchGradients()
    start = model.inner.init_parameters(np.random.default_rng())
    with pytest.raises(ClientError, match="per-example"):
        local_sgd(
            model,  # type: ignore[arg-type]
            start,
            x,
            y,
            epochs=1,
            batch_size=0,
            learning_rate=0.1,
            rng=np.random.default_rng(),
            dp_sgd=DpSgdSettings(clip_norm=1.0, noise_multiplier=1.0),
        )


def test_diverging_dp_sgd_is_reported() -> None:
    x, y = small_problem(0)
    model = SoftmaxRegression(num_features=5, num_classes=4)
    start = model.init_parameters(np.random.default_rng())
    with pytest.raises(ClientError, match="diverged"):
        local_sgd(
            model,
            start,
            x,
            y,
            epochs=3,
            batch_size=0,
            learning_rate=1e300,
            rng=np.random.default_rng(),
            dp_sgd=DpSgdSettings(clip_norm=1e30, noise_multiplier=1e5),
        )


# --- accounting ----------------------------------------------------------------------


def test_record_level_epsilon_matches_opacus_rdp_accountant() -> None:
    accountants = pytest.importorskip("opacus.accountants")
    opacus_rdp = accountants.RDPAccountant()
    for _ in range(120):
        opacus_rdp.step(noise_multiplier=1.1, sample_rate=0.02)
    ours = record_level_epsilon(noise_multiplier=1.1, sampling_rate=0.02, steps=120, delta=1e-5)
    assert ours == pytest.approx(opacus_rdp.get_epsilon(1e-5), rel=1e-6)


def test_record_level_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    def epsilon(*, z: float = 1.0, q: float = 0.05, steps: int = 100) -> float:
        return record_level_epsilon(noise_multiplier=z, sampling_rate=q, steps=steps, delta=1e-5)

    assert 0 < epsilon(steps=10) < epsilon(steps=100) < epsilon(steps=1000)
    assert epsilon(z=2.0) < epsilon(z=1.0) < epsilon(z=0.7)
    assert epsilon(q=0.01) < epsilon(q=0.05)
    assert epsilon(steps=0) == 0.0
    assert epsilon(z=0.0) == math.inf
    with pytest.raises(ConfigError):
        epsilon(q=1.5)
    with pytest.raises(ConfigError):
        epsilon(steps=-1)


# --- the PyTorch client through Opacus ----------------------------------------------------


@pytest.fixture(scope="module")
def torch_digits() -> Any:
    torch = pytest.importorskip("torch")
    pytest.importorskip("opacus")
    from torch.utils.data import DataLoader, TensorDataset

    train, test = load_digits_split(test_fraction=0.25, seed=0)
    train_set = TensorDataset(
        torch.from_numpy(train.features[:640]), torch.from_numpy(train.labels[:640])
    )
    test_set = TensorDataset(torch.from_numpy(test.features), torch.from_numpy(test.labels))
    return DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(test_set, batch_size=450)


def torch_client(loaders: Any, dp: DpSgdSettings | None, *, batchnorm: bool = False) -> Any:
    import torch

    from shoal.client.torch_client import TorchClient

    torch.manual_seed(0)
    middle = torch.nn.BatchNorm1d(32) if batchnorm else torch.nn.ReLU()
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), middle, torch.nn.Linear(32, 10))
    return TorchClient(
        net,
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=loaders[0],
        eval_loader=loaders[1],
        dp_sgd=dp,
    )


def test_torch_client_trains_with_opacus_and_reports_epsilon(torch_digits: Any) -> None:
    client = torch_client(torch_digits, DpSgdSettings(clip_norm=1.0, noise_multiplier=1.0))
    start = client.get_parameters()
    before = client.evaluate(start, EvaluateConfig(round=0))
    result = client.fit(start, FitConfig(round=1, epochs=3, learning_rate=1.0, seed=1))
    after = client.evaluate(result.parameters, EvaluateConfig(round=1))
    assert before.metrics["accuracy"] < 0.3
    assert after.metrics["accuracy"] > 0.5  # chance is 0.1
    metrics = result.metrics
    assert metrics["steps"] == metrics["dp_sgd_steps"] == 60.0
    assert metrics["dp_sgd_sampling_rate"] == 1 / 20  # Opacus' rate: 1 / len(train_loader)
    expected = record_level_epsilon(noise_multiplier=1.0, sampling_rate=0.05, steps=60, delta=1e-5)
    assert metrics["dp_sgd_epsilon"] == pytest.approx(expected, rel=1e-6)
    for parameter in client.module.parameters():  # Opacus leaves nothing behind
        assert not hasattr(parameter, "grad_sample")
        assert not hasattr(parameter, "summed_grad")
    for layer in client.module.modules():
        assert not layer._forward_hooks
        assert not layer._backward_hooks


def test_torch_noise_has_std_z_c_over_b(torch_digits: Any) -> None:
    def displacement(z: float) -> np.ndarray:
        client = torch_client(torch_digits, DpSgdSettings(clip_norm=1.0, noise_multiplier=z))
        start = client.get_parameters()
        result = client.fit(start, FitConfig(round=1, epochs=0.05, learning_rate=1.0))
        assert result.metrics["steps"] == 1.0
        return np.asarray(result.parameters.vector - start.vector, dtype=np.float64)

    # One step: the clipped signal has norm at most about C, the noise z C / B per value.
    signal = np.linalg.norm(displacement(0.0))
    assert 0 < signal < 2.0
    moved = displacement(40.0)
    assert moved.std() == pytest.approx(40.0 / 32, rel=0.08)  # 2,410 values: 1.4% std error


def test_seeded_torch_dp_sgd_is_reproducible_and_warns(torch_digits: Any) -> None:
    client = torch_client(torch_digits, seeded_settings())
    start = client.get_parameters()
    config = FitConfig(round=1, epochs=0.5, learning_rate=0.5, seed=3)
    with pytest.warns(InsecureNoiseWarning):
        first, again = client.fit(start, config), client.fit(start, config)
    np.testing.assert_array_equal(first.parameters.vector, again.parameters.vector)


def test_torch_proximal_term_still_pulls_under_dp_sgd(torch_digits: Any) -> None:
    client = torch_client(torch_digits, DpSgdSettings(clip_norm=1.0, noise_multiplier=0.0))
    start = client.get_parameters()

    def distance(mu: float) -> float:
        config = FitConfig(round=1, epochs=1, learning_rate=0.05, proximal_mu=mu)
        result = client.fit(start, config)
        return float(np.linalg.norm(result.parameters.vector - start.vector))

    assert distance(10.0) < 0.5 * distance(0.0)


def test_torch_dp_sgd_refuses_modules_opacus_cannot_handle(torch_digits: Any) -> None:
    client = torch_client(
        torch_digits, DpSgdSettings(clip_norm=1.0, noise_multiplier=1.0), batchnorm=True
    )
    with pytest.raises(ClientError, match="Opacus cannot train"):
        client.fit(client.get_parameters(), FitConfig(round=1))
