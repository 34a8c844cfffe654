"""Tests of the NumPy reference models, local SGD and the NumPy client."""

from __future__ import annotations

import pickle

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.client.api import EvaluateConfig, FitConfig
from shoal.client.numpy_models import (
    MLP,
    NumpyClient,
    NumpyModel,
    SoftmaxRegression,
    count_steps,
    local_sgd,
    softmax_cross_entropy_,
)
from shoal.core.errors import ClientError, DataError
from shoal.core.parameters import Parameters
from shoal.simulation.datasets import Dataset, load_digits_split

FloatArray = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_split(test_fraction=0.25, seed=0)


def small_problem(
    seed: int, *, num_examples: int = 12, num_features: int = 5, num_classes: int = 4
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, num_features))
    return x, rng.integers(0, num_classes, num_examples)


def numeric_gradient(
    model: NumpyModel, vector: FloatArray, x: FloatArray, y: npt.NDArray[np.int64]
) -> FloatArray:
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


def models(weight_decay: float) -> list[NumpyModel]:
    return [
        SoftmaxRegression(num_features=5, num_classes=4, weight_decay=weight_decay),
        MLP(num_features=5, num_hidden=7, num_classes=4, weight_decay=weight_decay),
    ]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32), weight_decay=st.sampled_from([0.0, 0.3]))
def test_gradients_match_finite_differences(seed: int, weight_decay: float) -> None:
    x, y = small_problem(seed)
    for model in models(weight_decay):
        vector = np.random.default_rng(seed).normal(size=model.layout.size)
        _, analytic = model.loss_and_gradient(vector, x, y)
        numeric = numeric_gradient(model, vector, x, y)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_gradient_is_written_into_the_given_buffer() -> None:
    x, y = small_problem(0)
    model = SoftmaxRegression(num_features=5, num_classes=4)
    vector = np.ones(model.layout.size)
    out = np.full(model.layout.size, np.nan)
    _, gradient = model.loss_and_gradient(vector, x, y, out=out)
    assert gradient is out
    assert np.isfinite(out).all()


def test_a_model_reads_each_vector_it_is_given_not_an_earlier_one() -> None:
    """A model keeps the tensors' views of the last vectors it was given (a training step's
    weights and gradient): a vector made later, even where a freed one lay, is its own."""
    x, y = small_problem(1)
    for model in models(0.3):
        rng = np.random.default_rng(2)
        for _ in range(30):
            vector = rng.normal(size=model.layout.size)  # often where the last one was freed
            loss, gradient = model.loss_and_gradient(vector, x, y)
            unkept = pickle.loads(pickle.dumps(model))  # a pickled model keeps no views
            assert unkept._recent == ()
            assert unkept.loss_and_gradient(vector.copy(), x, y)[0] == loss
            other = rng.normal(size=model.layout.size)
            model.loss_and_gradient(other, x, y, out=np.empty_like(other))
            again, same = model.loss_and_gradient(vector, x, y)  # still the first vector's
            assert again == loss and np.array_equal(same, gradient)
            vector[:] = other  # changed in place: the same array, read as it is now
            assert (
                model.loss_and_gradient(vector, x, y)[0] == unkept.loss_and_gradient(other, x, y)[0]
            )
            del vector, other


def test_training_on_rows_holds_their_transpose_for_those_rows_alone() -> None:
    """Full-batch training multiplies a contiguous copy of the rows' transpose, made once:
    the same gradients (to rounding), only for the rows it was made from, and none after."""
    x, y = small_problem(3, num_examples=40)
    other, other_y = small_problem(4, num_examples=40)
    for model in models(0.3):
        vector = np.random.default_rng(5).normal(size=model.layout.size)
        loss, gradient = model.loss_and_gradient(vector, x, y)
        with model._training_on(x, y):
            held = model._transposed(x)
            assert held.flags.c_contiguous and np.array_equal(held, x.T)
            assert model._transposed(other).base is other  # another array: its view
            assert model._positions(y) is not None and model._positions(other_y) is None
            inside, inside_gradient = model.loss_and_gradient(vector, x, y)
            assert inside == pytest.approx(loss, rel=1e-12)
            np.testing.assert_allclose(inside_gradient, gradient, rtol=1e-10, atol=1e-12)
            # rows that are not the held ones are read as they are
            assert (
                model.loss_and_gradient(vector, other, other_y)[0]
                == (pickle.loads(pickle.dumps(model)).loss_and_gradient(vector, other, other_y)[0])
            )
        assert model._columns is None
        assert model._transposed(x).base is x


def test_full_batch_training_gives_what_its_steps_give_one_by_one() -> None:
    """local_sgd's full-batch steps (the rows' transpose held) against the same steps taken
    by hand through the model's public method."""
    x, y = small_problem(6, num_examples=30)
    for model in models(0.1):
        parameters = model.init_parameters(np.random.default_rng(7))
        trained = local_sgd(
            model,
            parameters,
            x,
            y,
            epochs=4,
            batch_size=0,
            learning_rate=0.3,
            proximal_mu=0.0,
            rng=0,
        )
        weights = parameters.vector.copy()
        for _ in range(4):
            _, gradient = model.loss_and_gradient(weights, x, y)
            weights -= 0.3 * gradient
        np.testing.assert_allclose(trained.parameters.vector, weights, rtol=1e-9, atol=1e-12)


def test_cross_entropy_is_stable_for_huge_logits() -> None:
    logits = np.array([[1e4, -1e4], [0.0, 1e4], [-1e4, 0.0]])  # (classes, examples)
    labels = np.array([0, 2])
    loss = softmax_cross_entropy_(logits.copy(), labels)
    # example 0 is certain of class 0: loss 0; example 1 puts all mass on class 1.
    assert loss == pytest.approx((0.0 + 1e4) / 2)
    gradient = logits.copy()
    softmax_cross_entropy_(gradient, labels)
    assert np.isfinite(gradient).all()
    np.testing.assert_allclose(gradient.sum(axis=0), 0.0, atol=1e-12)


def test_loss_at_zero_parameters_is_log_of_the_class_count() -> None:
    x, y = small_problem(1)
    model = SoftmaxRegression(num_features=5, num_classes=4)
    loss, _ = model.loss_and_gradient(model.init_parameters(np.random.default_rng()).vector, x, y)
    assert loss == pytest.approx(np.log(4), rel=1e-6)


def test_mlp_initialization_is_seeded_and_named() -> None:
    model = MLP(num_features=64, num_hidden=32, num_classes=10)
    first = model.init_parameters(np.random.default_rng(5))
    again = model.init_parameters(np.random.default_rng(5))
    np.testing.assert_array_equal(first.vector, again.vector)
    assert first.layout.names == ("hidden.weight", "hidden.bias", "output.weight", "output.bias")
    assert first.views()["hidden.weight"].shape == (32, 64)
    assert np.abs(first.views()["hidden.weight"]).max() <= 1 / 8


@pytest.mark.parametrize(
    "model",
    [
        SoftmaxRegression(num_features=64, num_classes=10),
        MLP(num_features=64, num_hidden=32, num_classes=10),
    ],
)
def test_local_sgd_lowers_the_loss_on_digits(
    model: NumpyModel, digits: tuple[Dataset, Dataset]
) -> None:
    train, test = digits
    start = model.init_parameters(np.random.default_rng(0))
    loss_before, accuracy_before = model.evaluate(start.vector, test.features, test.labels)
    result = local_sgd(
        model,
        start,
        train.features,
        train.labels,
        epochs=3,
        batch_size=32,
        learning_rate=0.5,
        rng=np.random.default_rng(1),
    )
    loss_after, accuracy_after = model.evaluate(
        result.parameters.vector, test.features, test.labels
    )
    assert loss_after < 0.5 * loss_before
    assert accuracy_before < 0.3
    assert accuracy_after > 0.75
    assert result.num_steps == 3 * 43  # ceil(1347 / 32) steps per epoch
    assert result.parameters.vector.dtype == np.float32
    assert result.parameters.layout == start.layout
    np.testing.assert_array_equal(
        start.vector, model.init_parameters(np.random.default_rng(0)).vector
    )


def test_huge_proximal_term_keeps_the_model_near_the_global(
    digits: tuple[Dataset, Dataset],
) -> None:
    train, _ = digits
    model = SoftmaxRegression(num_features=64, num_classes=10)
    start = model.init_parameters(np.random.default_rng(0))

    def distance(mu: float) -> float:
        result = local_sgd(
            model,
            start,
            train.features,
            train.labels,
            epochs=3,
            batch_size=32,
            learning_rate=0.01,
            proximal_mu=mu,
            rng=np.random.default_rng(2),
        )
        return float(np.linalg.norm(result.parameters.vector - start.vector))

    # lr * mu = 0.5: the proximal pull takes back half the drift at every step.
    assert distance(50.0) < 0.1 * distance(0.0)
    assert distance(1.0) < distance(0.0)


def test_zero_proximal_term_is_plain_sgd() -> None:
    x, y = small_problem(3)
    model = SoftmaxRegression(num_features=5, num_classes=4)
    start = Parameters.from_arrays([np.ones((4, 5)), np.zeros(4)], names=["weight", "bias"])
    plain = local_sgd(
        model, start, x, y, epochs=1, batch_size=0, learning_rate=0.1, rng=np.random.default_rng()
    )
    vector = start.vector.copy()
    loss, gradient = model.loss_and_gradient(vector, x, y)
    np.testing.assert_allclose(plain.parameters.vector, vector - 0.1 * gradient, rtol=1e-6)
    assert plain.train_loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize(
    ("num_examples", "epochs", "batch_size", "steps"),
    [
        (100, 1.0, 10, 10),
        (100, 0.5, 10, 5),
        (100, 0.01, 10, 1),
        (100, 2.0, 30, 8),
        (100, 3.0, 0, 3),
        (100, 1.0, 500, 1),
        (1, 0.3, 0, 1),
    ],
)
def test_count_steps(num_examples: int, epochs: float, batch_size: int, steps: int) -> None:
    assert count_steps(num_examples=num_examples, epochs=epochs, batch_size=batch_size) == steps


def test_full_batch_is_the_same_as_a_batch_larger_than_the_data() -> None:
    x, y = small_problem(4)
    model = MLP(num_features=5, num_hidden=3, num_classes=4)
    start = model.init_parameters(np.random.default_rng(0))
    runs = [
        local_sgd(
            model,
            start,
            x,
            y,
            epochs=4,
            batch_size=size,
            learning_rate=0.1,
            rng=np.random.default_rng(seed),
        )
        for size, seed in ((0, 1), (100, 2))
    ]
    np.testing.assert_array_equal(runs[0].parameters.vector, runs[1].parameters.vector)
    assert runs[0].num_steps == 4


@pytest.mark.parametrize("batch_size", [0, 32])
def test_local_sgd_from_a_seed_trains_as_from_the_generator_it_makes(
    batch_size: int, digits: tuple[Dataset, Dataset]
) -> None:
    train, _ = digits
    model = SoftmaxRegression(num_features=64, num_classes=10)
    start = model.init_parameters(np.random.default_rng(0))
    runs = [
        local_sgd(
            model,
            start,
            train.features[:300],
            train.labels[:300],
            epochs=2,
            batch_size=batch_size,
            learning_rate=0.5,
            rng=rng,
        )
        for rng in (11, np.random.default_rng(11), np.int64(11))
    ]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.parameters.vector, runs[0].parameters.vector)
        assert run.train_loss == runs[0].train_loss


def test_local_sgd_rejects_bad_inputs() -> None:
    x, y = small_problem(0)
    model = SoftmaxRegression(num_features=5, num_classes=4)
    start = model.init_parameters(np.random.default_rng())
    rng = np.random.default_rng()
    with pytest.raises(ClientError, match="zero examples"):
        local_sgd(model, start, x[:0], y[:0], epochs=1, batch_size=0, learning_rate=0.1, rng=rng)
    with pytest.raises(DataError, match="labels"):
        local_sgd(model, start, x, y + 4, epochs=1, batch_size=0, learning_rate=0.1, rng=rng)
    with pytest.raises(DataError, match="labels"):
        local_sgd(model, start, x, y - 4, epochs=1, batch_size=0, learning_rate=0.1, rng=rng)
    with pytest.raises(ClientError, match="epochs"):
        local_sgd(model, start, x, y, epochs=0, batch_size=0, learning_rate=0.1, rng=rng)
    with pytest.raises(ClientError, match="diverged"):
        local_sgd(model, start, x * 1e30, y, epochs=5, batch_size=0, learning_rate=1e30, rng=rng)


def make_client(digits: tuple[Dataset, Dataset], *, with_eval: bool = True) -> NumpyClient:
    train, test = digits
    return NumpyClient(
        MLP(num_features=64, num_hidden=16, num_classes=10),
        train_data=(train.features[:200], train.labels[:200]),
        eval_data=(test.features, test.labels) if with_eval else None,
    )


def test_client_fit_is_deterministic_in_the_seed(digits: tuple[Dataset, Dataset]) -> None:
    client = make_client(digits)
    start = client.get_parameters()
    config = FitConfig(round=1, epochs=1.0, batch_size=16, learning_rate=0.1, seed=7)
    first, again = client.fit(start, config), client.fit(start, config)
    other = client.fit(start, FitConfig(round=1, batch_size=16, learning_rate=0.1, seed=8))
    assert isinstance(first.parameters, Parameters)
    assert isinstance(again.parameters, Parameters)
    assert isinstance(other.parameters, Parameters)
    np.testing.assert_array_equal(first.parameters.vector, again.parameters.vector)
    assert not np.array_equal(first.parameters.vector, other.parameters.vector)
    assert first.num_examples == 200
    assert first.metrics["steps"] == 13.0
    assert first.metrics["loss"] > 0


def test_client_fractional_epochs_run_fewer_steps(digits: tuple[Dataset, Dataset]) -> None:
    client = make_client(digits)
    config = FitConfig(round=1, epochs=0.25, batch_size=20, seed=1)
    assert client.fit(client.get_parameters(), config).metrics["steps"] == 2.0  # round(0.25 * 10)


def test_client_training_improves_evaluation(digits: tuple[Dataset, Dataset]) -> None:
    client = make_client(digits)
    start = client.get_parameters()
    before = client.evaluate(start, EvaluateConfig(round=0))
    result = client.fit(start, FitConfig(round=1, epochs=5, batch_size=20, learning_rate=0.5))
    assert isinstance(result.parameters, Parameters)
    after = client.evaluate(result.parameters, EvaluateConfig(round=1))
    assert after.num_examples == 450
    assert after.loss < before.loss
    assert after.metrics["accuracy"] > before.metrics["accuracy"] + 0.3


def test_client_without_eval_data_reports_zero_examples(digits: tuple[Dataset, Dataset]) -> None:
    client = make_client(digits, with_eval=False)
    result = client.evaluate(client.get_parameters(), EvaluateConfig(round=0))
    assert result.num_examples == 0


def test_client_rejects_parameters_of_another_model(digits: tuple[Dataset, Dataset]) -> None:
    client = make_client(digits)
    wrong = SoftmaxRegression(num_features=64, num_classes=10).init_parameters(
        np.random.default_rng()
    )
    with pytest.raises(ClientError, match="received"):
        client.fit(wrong, FitConfig(round=1))
    with pytest.raises(ClientError, match="received"):
        client.evaluate(wrong, EvaluateConfig(round=1))


def test_client_rejects_mismatched_arrays() -> None:
    with pytest.raises(DataError, match="features"):
        NumpyClient(
            SoftmaxRegression(num_features=2, num_classes=2),
            train_data=(np.zeros((3, 2)), np.zeros(2)),
        )


def test_models_reject_bad_sizes() -> None:
    with pytest.raises(DataError, match="num_hidden"):
        MLP(num_features=3, num_hidden=0, num_classes=2)
    with pytest.raises(DataError, match="weight_decay"):
        SoftmaxRegression(num_features=3, num_classes=2, weight_decay=-1.0)
    with pytest.raises(DataError, match="zero examples"):
        SoftmaxRegression(num_features=3, num_classes=2).evaluate(
            np.zeros(8), np.zeros((0, 3)), np.zeros(0, np.int64)
        )


def test_predict_returns_the_argmax_class() -> None:
    model = SoftmaxRegression(num_features=2, num_classes=3)
    weight = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    vector = np.concatenate([weight.ravel(), np.zeros(3)])
    predicted = model.predict(vector, np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]]))
    np.testing.assert_array_equal(predicted, [0, 1, 2])
    assert predicted.dtype == np.int64
