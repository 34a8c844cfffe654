"""Distributed DP: the clients' discrete noise shares add up, inside SecAgg+, to the target."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.privacy.noise import NoiseSource
from shoal.secure.client import Contribution
from shoal.secure.loopback import run_loopback_round
from shoal.secure.messages import Stage
from shoal.secure.quantization import Quantization
from shoal.secure.server import StageDeadlines, SumReady


@pytest.mark.parametrize("dropped", [0, 3])
def test_the_secure_sum_carries_the_target_noise(dropped: int) -> None:
    clients, length, target_std = 12, 40_000, 0.05
    share_std = target_std / np.sqrt(clients - dropped)  # sized for the survivors
    contributions = {
        f"c{i:02d}": Contribution(
            np.zeros(length, np.float32),
            num_examples=1,
            uniform_weight=True,
            noise_std=share_std,
            noise=NoiseSource.secure(),
        )
        for i in range(clients)
    }
    gone = dict.fromkeys(sorted(contributions)[:dropped], Stage.MASKED_INPUT)
    quantization = Quantization(clip=1.0, max_weight=1).fitted(clients * 4)  # headroom for noise
    outcome = run_loopback_round(
        contributions,
        degree=11,
        quantization=quantization,
        dropouts=gone,
        deadlines=StageDeadlines(advertise_keys=5, share_keys=5, masked_input=5, unmask=5),
    )
    assert isinstance(outcome.result, SumReady)
    total = outcome.result.result.decoded.weighted_sum
    assert len(outcome.result.result.contributors) == clients - dropped
    assert abs(total.mean()) < 4 * target_std / np.sqrt(length)
    # the variance of the sum: the noise shares plus the rounding, far smaller at this precision
    assert total.std() == pytest.approx(target_std, rel=0.03)
    assert outcome.result.result.decoded.total_weight == clients - dropped  # uniform weights


def test_noise_that_crosses_zero_still_decodes() -> None:
    """Noise pushes some coordinates of the sum below zero and past the top: the centred
    decoding reads them back as the small signed values they are."""
    contributions = {
        f"c{i}": Contribution(
            np.full(1000, -1.0, np.float32),
            num_examples=1,
            uniform_weight=True,
            noise_std=0.2,
            noise=NoiseSource.secure(),
        )
        for i in range(4)
    }
    quantization = Quantization(clip=1.0, max_weight=1).fitted(16)
    outcome = run_loopback_round(contributions, degree=3, quantization=quantization)
    assert isinstance(outcome.result, SumReady)
    total = outcome.result.result.decoded.weighted_sum
    assert total.mean() == pytest.approx(-4.0, abs=0.05)
    assert total.std() == pytest.approx(0.4, rel=0.1)
