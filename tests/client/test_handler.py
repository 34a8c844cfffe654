"""The one task handler that deployed and simulated clients share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.apps import builtin
from shoal.client.api import (
    Client,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
    fit_update,
)
from shoal.client.app import ClientApp, ClientContext
from shoal.client.handler import run_evaluate, run_fit, secure_contribution
from shoal.core import ClientError, Parameters
from shoal.core.compression import EXTRAS_KEY as COMPRESSION_KEY
from shoal.core.compression import Compression, decode
from shoal.privacy.coordinator import CLIP_NORM, LOCAL_NOISE_STD
from shoal.simulation import Simulation
from support.jobs import bare_config

MODEL = Parameters.from_arrays([np.zeros(4, np.float32)])


class Fixed(Client):
    """Returns ``values`` as its new local model."""

    def __init__(self, values: list[float]) -> None:
        self.values = np.array(values, np.float32)

    def get_parameters(self) -> Parameters:
        return MODEL

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        return FitResult([self.values], 3, {"loss": 0.5})

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return EvaluateResult(0.25, 2, {"accuracy": 1.0})


def test_an_update_leaves_as_local_minus_global() -> None:
    fit = run_fit(Fixed([1, 2, 3, 4]), MODEL, FitConfig(round=1))
    np.testing.assert_array_equal(fit.update, [1, 2, 3, 4])
    assert (fit.num_examples, fit.metrics, fit.noise) == (3, {"loss": 0.5}, None)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_update_never_leaves_the_device(bad: float) -> None:
    with pytest.raises(ClientError, match="NaN or infinite"):
        run_fit(Fixed([1, bad, 3, 4]), MODEL, FitConfig(round=1))


def test_a_wrong_shape_is_the_clients_error() -> None:
    with pytest.raises(ClientError, match="the model has 4"):
        run_fit(Fixed([1, 2]), MODEL, FitConfig(round=1))


def test_under_user_level_dp_the_update_is_clipped_and_the_loss_withheld() -> None:
    config = FitConfig(round=1, extras={CLIP_NORM: 1.0})
    fit = run_fit(Fixed([30, 40, 0, 0]), MODEL, config)
    assert float(np.linalg.norm(fit.update)) == pytest.approx(1.0, rel=1e-6)
    assert "loss" not in fit.metrics
    assert secure_contribution(fit, config).loss == 0.0


def test_evaluation_passes_through() -> None:
    evaluation = run_evaluate(Fixed([0, 0, 0, 0]), MODEL, EvaluateConfig(round=1))
    assert (evaluation.loss, evaluation.num_examples, evaluation.metrics) == (
        0.25,
        2,
        {"accuracy": 1.0},
    )


def poisoned(context: ClientContext) -> Client:
    """Client 0 trains to NaN; the rest are the built-in digits clients."""
    if context.partition_index == 0:
        return Fixed([float("nan")] * 650)
    return builtin.client_app(context)


def test_a_simulated_secure_round_refuses_a_nan_update_before_masking(tmp_path: Path) -> None:
    config = bare_config(
        [
            "data.num_clients=6",
            "round.clients_per_round=6",
            "round.over_selection=1.0",
            "round.quorum=0.5",
            "run.rounds=1",
            "evaluation.every=0",
            "simulation.workers=0",
            "secure_aggregation.protocol='secagg+'",
        ],
    )
    app = ClientApp(poisoned, num_examples=builtin.client_app.num_examples)
    summary = Simulation(config, tmp_path, client_app=app, server_app=builtin.server_app).run()
    assert summary["rounds_completed"] == 1  # the honest five still add up
    assert summary["final_accuracy"] is not None


@pytest.mark.parametrize(
    ("metrics", "refusal"),
    [
        ({5: 1.0}, "a metric's name is text, got int 5"),  # an AttributeError in the row before
        ({"big": 10**400}, "metric 'big' = 1000"),  # an OverflowError in the engine before
        ({"nested": {"big": -(10**400)}}, "metric 'nested.big'"),
        ([("loss", 1.0)], "metrics are a mapping"),
    ],
)
def test_metrics_no_run_could_record_are_refused_where_the_app_makes_them(
    metrics: Any, refusal: str
) -> None:
    """In the user's own fit or evaluate, as a ClientError the round reports as the client's
    failure with its reason, not in the coordinator's row afterwards."""
    with pytest.raises(ClientError, match=refusal):
        FitResult([np.zeros(2)], 1, metrics)
    with pytest.raises(ClientError, match=refusal):
        EvaluateResult(0.5, 1, metrics)


def test_metrics_of_every_recordable_kind_pass() -> None:
    metrics = {"loss": 1, "f1": np.float32(0.5), "ok": True, "nan": float("nan"), "note": "x"}
    assert FitResult([np.zeros(2)], 1, metrics).metrics == metrics


def test_a_fit_result_of_the_models_values_in_other_tensors_is_refused() -> None:
    """The same number of values as the model, but its tensors swapped or reshaped: before,
    only the count was compared, and the values landed in other tensors' places (in a
    simulation and from a deployed client alike, which sends them in the model's layout)."""
    model = Parameters.from_arrays([np.zeros((3, 2)), np.zeros(4)], names=["w", "b"])
    swapped = [np.ones(4), np.ones((3, 2))]
    with pytest.raises(
        ClientError, match=r"tensor 0 of shape \[4\] where the model's 'w' is \[3, 2\]"
    ):
        fit_update(FitResult(swapped, 1), model)
    with pytest.raises(ClientError, match=r"tensor 0 of shape \[2, 5\]"):
        fit_update(FitResult([np.ones((2, 5))], 1), model)
    with pytest.raises(ClientError, match="fit returned 9 values, the model has 10"):
        fit_update(FitResult([np.ones(9)], 1), model)
    # the model's shapes in its order, under any names, or one flat vector: as before
    renamed = Parameters.from_arrays([np.ones((3, 2)), np.ones(4)])
    np.testing.assert_array_equal(fit_update(FitResult(renamed, 1), model).vector, 1.0)
    flat = fit_update(FitResult([np.arange(10.0)], 1, is_update=True), model)
    np.testing.assert_array_equal(flat.vector, np.arange(10.0))


# --- compressed uploads ------------------------------------------------------------------------


def squeezed_task(spec: str, *, seed: int = 7, **extras: Any) -> FitConfig:
    return FitConfig(round=1, seed=seed, extras={COMPRESSION_KEY: spec, **extras})


@pytest.mark.parametrize("spec", ["int8", "ternary", "topk:0.5"])
def test_a_compressed_update_leaves_as_the_coordinator_will_decode_it(spec: str) -> None:
    fit = run_fit(Fixed([1, -2, 3, 0.5]), MODEL, squeezed_task(spec))
    assert fit.payload is not None
    codec = Compression.parse(spec)
    np.testing.assert_array_equal(fit.update, decode(fit.payload, codec, size=4))
    again = run_fit(Fixed([1, -2, 3, 0.5]), MODEL, squeezed_task(spec))
    assert again.payload == fit.payload  # the task's seed draws the rounding


def test_a_top_k_client_adds_what_its_last_upload_left_out() -> None:
    first = run_fit(Fixed([1, -2, 3, 0.5]), MODEL, squeezed_task("topk:0.5"))
    np.testing.assert_array_equal(first.update, [0, -2, 3, 0])
    assert first.residual is not None
    np.testing.assert_array_equal(first.residual, [1, 0, 0, 0.5])
    second = run_fit(
        Fixed([1.5, -2, 3, 0.5]), MODEL, squeezed_task("topk:0.5"), residual=first.residual
    )
    np.testing.assert_array_equal(second.update, [2.5, 0, 3, 0])  # 1.5 and the 1 left out
    assert second.residual is not None
    np.testing.assert_array_equal(second.residual, [0, -2, 0, 1])


def test_a_quantized_upload_keeps_no_residual() -> None:
    fit = run_fit(Fixed([1, -2, 3, 0.5]), MODEL, squeezed_task("int8"), residual=np.ones(4))
    assert fit.residual is None  # unbiased: nothing to carry


def test_under_user_level_dp_the_clipped_update_is_what_is_compressed() -> None:
    task = squeezed_task("topk:0.5", **{CLIP_NORM: 1.0})
    fit = run_fit(Fixed([3, 4, 0, 0]), MODEL, task)
    np.testing.assert_allclose(fit.update, [0.6, 0.8, 0, 0], rtol=1e-5)  # clipped to 1, then
    assert fit.residual is not None and np.abs(fit.residual).max() < 1e-5  # both kept


@pytest.mark.parametrize("spec", ["gzip", "topk:2", 5])
def test_a_task_naming_a_codec_the_client_cannot_use_is_its_error(spec: Any) -> None:
    with pytest.raises(ClientError, match="upload codec this client cannot use"):
        run_fit(Fixed([1, 2, 3, 4]), MODEL, squeezed_task(spec))


@pytest.mark.parametrize("spec", ["int8", "ternary", "topk:0.5"])
def test_under_central_dp_what_the_coordinator_decodes_is_within_the_clip_norm(spec: str) -> None:
    """A ternary update clipped to 1 decodes to a norm of about 1.7 (each value +-its block's
    scale): the coordinator would clip it again and count it as clipped."""
    values = list(np.random.default_rng(3).standard_normal(4))
    model = Parameters.from_arrays([np.zeros(4, np.float32)])
    for seed in range(20):
        fit = run_fit(Fixed(values), model, squeezed_task(spec, seed=seed, **{CLIP_NORM: 1.0}))
        assert fit.payload is not None
        decoded = decode(fit.payload, Compression.parse(spec), size=4)
        np.testing.assert_array_equal(fit.update, decoded)
        assert float(np.linalg.norm(decoded.astype(np.float64))) <= 1.0


def test_a_locally_noised_update_is_sent_as_rounded() -> None:
    """Under local DP the coordinator takes the update as it comes (clipping it would only
    bias the noise): the client rescales nothing."""
    task = squeezed_task("ternary", **{CLIP_NORM: 1.0, LOCAL_NOISE_STD: 0.0})
    fit = run_fit(Fixed([3, 4, 0, 0]), MODEL, task)
    assert fit.payload is not None
    magnitudes = np.abs(fit.update)
    assert np.all((magnitudes == 0) | np.isclose(magnitudes, 0.8, rtol=1e-6))
    assert float(np.linalg.norm(fit.update)) > 1.0  # both rounded to 0.8: not scaled back


def test_under_central_dp_what_the_clip_takes_is_not_carried_to_the_next_upload() -> None:
    """Clipped to 1 and added to a residual of 10, the target's norm is over 10: the payload
    is scaled back to 1, and only what top-k left out (nothing here) is kept."""
    residual = np.array([10, 0, 0, 0], np.float32)
    task = squeezed_task("topk:0.5", **{CLIP_NORM: 1.0})
    fit = run_fit(Fixed([3, 4, 0, 0]), MODEL, task, residual=residual)
    assert float(np.linalg.norm(fit.update)) <= 1.0
    assert fit.residual is not None and not fit.residual.any()
