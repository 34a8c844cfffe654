"""Where DP noise comes from: a CSPRNG by default, or an explicit seeded generator in tests.

The privacy guarantee holds only if the noise cannot be predicted, so the
secure source draws its bits from the AES-256-CTR keystream of a key taken
from the operating system's CSPRNG, never from numpy's PCG64. Uniforms take
53 bits each; Gaussians come from the Box-Muller transform of pairs of them;
discrete Gaussians from rejection sampling over discrete Laplace candidates
(Canonne, Kamath and Steinke 2020), with float64 arithmetic for the
acceptance tests. (Floating-point samplers leak in theory through the
lowest bits (Mironov 2012); the granularity here is 2^-53 of the noise
scale.)

The seeded source wraps an explicit ``numpy.random.Generator`` so that a
test or a benchmark is reproducible; it warns, as opacus does, that it is
not for production.

>>> NoiseSource.secure().normal(3).shape
(3,)
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from shoal.core.errors import ConfigError

Floats = npt.NDArray[np.float64]
Integers = npt.NDArray[np.int64]


class InsecureNoiseWarning(UserWarning):
    """DP noise from a seeded generator: reproducible, and predictable to whoever has the seed."""


class NoiseSource:
    """Uniform, Gaussian and discrete Gaussian noise from one stream of random bits."""

    def __init__(self, rng: np.random.Generator | None) -> None:
        self._rng = rng
        self._cipher = (
            None
            if rng is not None
            else Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
        )

    @classmethod
    def secure(cls) -> NoiseSource:
        """Bits from AES-256-CTR under a fresh key from the OS CSPRNG (the default)."""
        return cls(None)

    @classmethod
    def seeded(cls, seed: int | np.random.Generator) -> NoiseSource:
        """Bits from a numpy generator: for tests and benchmarks only; warns."""
        warnings.warn(
            "DP noise from a seeded generator is reproducible and therefore predictable; "
            "use the secure source outside tests",
            InsecureNoiseWarning,
            stacklevel=2,
        )
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return cls(rng)

    @property
    def is_secure(self) -> bool:
        return self._rng is None

    def uniform(self, size: int) -> Floats:
        """``size`` uniforms in [0, 1) with 53 random bits each."""
        if self._rng is not None:
            return self._rng.random(size)
        assert self._cipher is not None
        words = np.frombuffer(self._cipher.update(bytes(8 * size)), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normal(self, size: int, *, std: float = 1.0) -> Floats:
        """``size`` Gaussians N(0, std^2) (Box-Muller)."""
        if std < 0 or not math.isfinite(std):
            raise ConfigError(f"a noise standard deviation must be finite and >= 0, got {std}")
        if self._rng is not None:
            return self._rng.normal(0.0, 1.0, size) * std
        pairs = (size + 1) // 2
        u1 = 1.0 - self.uniform(pairs)  # (0, 1]: the logarithm stays finite
        u2 = self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]
        return values * std

    def discrete_gaussian(self, size: int, *, sigma: float) -> Integers:
        """``size`` draws of the discrete Gaussian on the integers with parameter ``sigma``."""
        if sigma < 0 or not math.isfinite(sigma):
            raise ConfigError(f"a discrete Gaussian needs a finite sigma >= 0, got {sigma}")
        if sigma == 0 or size == 0:
            return np.zeros(size, dtype=np.int64)
        scale = math.floor(sigma) + 1  # the discrete Laplace's scale t
        found: list[Integers] = []
        needed = size
        while needed > 0:
            batch = max(64, int(needed * 1.6))
            candidates = self._discrete_laplace(batch, scale=scale)
            excess = np.abs(candidates) - sigma**2 / scale
            accept = self.uniform(batch) < np.exp(-(excess**2) / (2 * sigma**2))
            kept = candidates[accept][:needed]
            found.append(kept)
            needed -= kept.size
        return np.concatenate(found)

    def _discrete_laplace(self, size: int, *, scale: int) -> Integers:
        """P(y) proportional to exp(-|y| / scale): a difference of two geometric variables."""
        log_keep = -1.0 / scale  # log of the geometric's failure probability exp(-1/t)
        first = np.floor(np.log(1.0 - self.uniform(size)) / log_keep)
        second = np.floor(np.log(1.0 - self.uniform(size)) / log_keep)
        return (first - second).astype(np.int64)
