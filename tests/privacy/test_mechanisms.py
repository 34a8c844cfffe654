"""DP mechanisms: clipping bounds a client, noise has the configured std, adaptive clipping tracks
the target quantile, the noise split of Andrew et al., the fixed-denominator mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shoal.core import ConfigError
from shoal.core.transforms import chain
from shoal.privacy.client import privatize_update
from shoal.privacy.coordinator import (
    CLIP_NORM,
    DISTRIBUTED_NOISE_STD,
    LOCAL_NOISE_STD,
    DpCoordinator,
    DpSettings,
)
from shoal.privacy.mechanisms import (
    ClipState,
    clip_by_l2_norm,
    clip_transform,
    noise_transform,
    noised_mean,
    split_noise,
)
from shoal.privacy.noise import NoiseSource

pytestmark = pytest.mark.filterwarnings("ignore::shoal.privacy.noise.InsecureNoiseWarning")


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-100, 100, width=32), min_size=0, max_size=30),
    clip=st.floats(0.01, 10),
)
def test_clipping_bounds_the_norm_and_keeps_short_updates(values: list[float], clip: float) -> None:
    update = np.array(values, dtype=np.float32)
    result = clip_by_l2_norm(update, clip_norm=clip)
    assert np.linalg.norm(result.update.astype(np.float64)) <= clip * (1 + 1e-5)
    if result.unclipped:
        assert np.array_equal(result.update, update)
    else:  # the direction is kept
        assert np.allclose(result.update * result.norm / clip, update, rtol=1e-4, atol=1e-4)


def test_zero_update_and_bad_norm() -> None:
    assert clip_by_l2_norm(np.zeros(3, np.float32), clip_norm=1.0).unclipped
    with pytest.raises(ConfigError):
        clip_by_l2_norm(np.ones(3, np.float32), clip_norm=0.0)


def test_transforms_chain_clip_then_noise_with_the_configured_std() -> None:
    pipeline = chain(
        clip_transform(clip_norm=1.0), noise_transform(std=0.5, noise=NoiseSource.secure())
    )
    state = pipeline.init(np.zeros(200_000, np.float32))
    update = np.full(200_000, 10.0, np.float32)  # norm far above 1: clipped to 1 first
    out, _ = pipeline.update(update, state)
    clipped_value = 1.0 / math.sqrt(200_000)
    assert (out - clipped_value).std() == pytest.approx(0.5, rel=0.01)
    assert (out - clipped_value).mean() == pytest.approx(0.0, abs=0.01)


def test_noise_split_follows_andrew_et_al() -> None:
    split = split_noise(noise_multiplier=1.0, count_std=5.0)
    assert split.update_multiplier == pytest.approx((1.0 - 1 / 100) ** -0.5)
    assert split_noise(noise_multiplier=1.0, count_std=0.0).update_multiplier == 1.0
    with pytest.raises(ConfigError, match="must exceed half"):
        split_noise(noise_multiplier=5.0, count_std=1.0)
    with pytest.raises(ConfigError, match="must exceed half"):  # an OverflowError before
        split_noise(noise_multiplier=1.0, count_std=1e-300)


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile(quantile: float) -> None:
    rng = np.random.default_rng(3)
    state = ClipState(0.1, adaptive=True, target_quantile=quantile, learning_rate=0.2)
    clients = 100
    for _ in range(400):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=clients)
        unclipped = float((norms <= state.clip_norm).sum())
        noise = float(rng.normal(0, clients / 20))
        state = state.after_round(unclipped=unclipped, count_noise=noise, denominator=clients)
    target = float(np.exp(0.5 * stats.norm.ppf(quantile)))
    assert state.clip_norm == pytest.approx(target, rel=0.12)


def test_fixed_denominator_mean_and_its_noise() -> None:
    total = np.zeros(100_000)
    mean = noised_mean(total, std=2.0, denominator=10.0, noise=NoiseSource.secure())
    assert mean.std() == pytest.approx(0.2, rel=0.02)
    with pytest.raises(ConfigError):
        noised_mean(total, std=1.0, denominator=0.0, noise=NoiseSource.secure())


def test_placements_tell_clients_what_to_do() -> None:
    def extras(placement: str) -> dict[str, float]:
        settings = DpSettings(placement, 1.0, 0.5, clients_per_round=10, min_clients=4)  # type: ignore[arg-type]
        return DpCoordinator(settings, NoiseSource.secure()).fit_extras()

    assert extras("central") == {CLIP_NORM: 0.5}
    assert extras("local") == {CLIP_NORM: 0.5, LOCAL_NOISE_STD: 0.5}
    assert extras("distributed") == {CLIP_NORM: 0.5, DISTRIBUTED_NOISE_STD: pytest.approx(0.25)}


def test_local_dp_noises_on_the_device_with_the_configured_std() -> None:
    update = np.zeros(200_000, np.float32)
    noised, metrics = privatize_update(
        update, {CLIP_NORM: 1.0, LOCAL_NOISE_STD: 0.3}, noise=NoiseSource.secure()
    )
    assert metrics == {"dp_unclipped": 1.0}
    assert noised.std() == pytest.approx(0.3, rel=0.01)
    untouched, none = privatize_update(update, {})
    assert untouched is update and none == {}


def test_under_dp_only_the_dp_bookkeeping_leaves_the_device() -> None:
    update = np.full(10, 3.0, np.float32)
    trained = {"loss": 0.42, "steps": 7.0, "dp_sgd_steps": 7.0, "dp_sgd_noise_multiplier": 1.1}
    _, released = privatize_update(update, {CLIP_NORM: 1.0}, trained)
    assert released == {"dp_sgd_steps": 7.0, "dp_sgd_noise_multiplier": 1.1, "dp_unclipped": 0.0}
    _, plain = privatize_update(update, {}, trained)
    assert plain == trained  # without DP every metric goes


def test_central_dp_reclips_and_adds_the_noise_once() -> None:
    settings = DpSettings("central", 2.0, 1.0, clients_per_round=10, min_clients=5)
    dp = DpCoordinator(settings, NoiseSource.secure())
    clipped, within = dp.admit(np.full(4, 10.0, np.float32))
    assert not within and np.linalg.norm(clipped) == pytest.approx(1.0, rel=1e-5)
    mean = dp.private_mean(np.zeros(100_000), unclipped=3.0)
    assert mean.std() == pytest.approx(2.0 * 1.0 / 10, rel=0.02)  # z C / clients_per_round


def test_bad_settings() -> None:
    with pytest.raises(ConfigError):
        DpSettings("everywhere", 1.0, 1.0, clients_per_round=1, min_clients=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DpSettings("central", -1.0, 1.0, clients_per_round=1, min_clients=1)
    with pytest.raises(ConfigError):
        DpSettings("central", 1.0, 1.0, clients_per_round=3, min_clients=4)
