"""The one task handler that deployed and simulated clients share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoal.apps import builtin
from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.app import ClientApp, ClientContext
from shoal.client.handler import run_evaluate, run_fit, secure_contribution
from shoal.core import ClientError, Parameters
from shoal.privacy.coordinator import CLIP_NORM
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
