"""DP noise: the CSPRNG source is the default and its Gaussians are Gaussian; seeded noise warns."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from shoal.core import ConfigError
from shoal.privacy.noise import InsecureNoiseWarning, NoiseSource


def test_secure_normals_are_standard_normal() -> None:
    source = NoiseSource.secure()
    assert source.is_secure
    values = source.normal(200_001, std=2.0)
    assert values.shape == (200_001,)
    assert abs(values.mean()) < 0.02
    assert values.std() == pytest.approx(2.0, rel=0.01)
    assert stats.kstest(values / 2.0, "norm").pvalue > 1e-4


def test_secure_uniforms_cover_the_unit_interval() -> None:
    values = NoiseSource.secure().uniform(100_000)
    assert values.min() >= 0.0 and values.max() < 1.0
    assert stats.kstest(values, "uniform").pvalue > 1e-4
    assert not np.array_equal(NoiseSource.secure().uniform(8), NoiseSource.secure().uniform(8))


@pytest.mark.parametrize("sigma", [0.5, 3.0, 40.0])
def test_discrete_gaussian_has_the_right_spread(sigma: float) -> None:
    values = NoiseSource.secure().discrete_gaussian(100_000, sigma=sigma)
    assert values.dtype == np.int64
    assert abs(values.mean()) < 0.05 * max(sigma, 1)
    expected = (
        sigma**2
        if sigma >= 1
        else float(
            (np.arange(-20, 21) ** 2 * np.exp(-(np.arange(-20, 21) ** 2) / (2 * sigma**2))).sum()
            / np.exp(-(np.arange(-20, 21) ** 2) / (2 * sigma**2)).sum()
        )
    )
    assert values.var() == pytest.approx(expected, rel=0.05)


def test_zero_and_empty_cases() -> None:
    source = NoiseSource.secure()
    assert source.normal(0).size == 0
    assert np.all(source.normal(5, std=0.0) == 0)
    assert np.all(source.discrete_gaussian(5, sigma=0.0) == 0)
    assert source.discrete_gaussian(0, sigma=3.0).size == 0


def test_seeded_noise_is_reproducible_and_warns() -> None:
    with pytest.warns(InsecureNoiseWarning, match="predictable"):
        first = NoiseSource.seeded(7)
    with pytest.warns(InsecureNoiseWarning):
        second = NoiseSource.seeded(7)
    assert not first.is_secure
    assert np.array_equal(first.normal(10), second.normal(10))
    assert np.array_equal(
        first.discrete_gaussian(10, sigma=4), second.discrete_gaussian(10, sigma=4)
    )


def test_bad_scales_are_refused() -> None:
    with pytest.raises(ConfigError):
        NoiseSource.secure().normal(3, std=-1.0)
    with pytest.raises(ConfigError):
        NoiseSource.secure().discrete_gaussian(3, sigma=float("nan"))
