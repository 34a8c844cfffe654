"""The one task handler: what a client does with a task, on a deployed device and in simulation.

The client runtime (a deployed device), the simulator's executors and its
secure rounds all run a task through these functions, so every client
checks the same things before anything leaves it:

- ``fit`` results are turned into an update (local minus global; a wrong
  shape is a :class:`ClientError`), refused when not finite, and under
  user-level DP clipped (and, for local DP, noised) on the device, with
  noise from the CSPRNG (``seeded_noise`` is the simulator's alone: nothing
  in a task can ask for it);
- where the task names a codec (:mod:`shoal.core.compression`), the update is
  encoded for the upload, and what leaves is exactly what the coordinator will
  decode: the outcome's update is the decoded one, its payload the bytes; a
  top-k client keeps what it left out (``residual``) and adds it to its next
  update (error feedback);
- a secure round's :func:`secure_contribution` carries that update, the weight
  and the DP noise share into masking (SecAgg+) or encryption (CKKS).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from shoal.client.api import Client, EvaluateConfig, FitConfig, fit_update
from shoal.core.compression import EXTRAS_KEY as COMPRESSION_KEY
from shoal.core.compression import Compression, decode, encode, rescaled, with_feedback
from shoal.core.errors import ClientError, ConfigError
from shoal.core.parameters import Parameters, Vector, all_finite
from shoal.preprocessing import BOUNDS_KEY
from shoal.privacy.client import (
    client_noise,
    distributed_noise_std,
    privatize_update,
    uniform_weight,
)
from shoal.privacy.coordinator import CLIP_NORM, LOCAL_NOISE_STD
from shoal.privacy.noise import NoiseSource
from shoal.secure.client import Contribution


@dataclass(frozen=True, slots=True)
class FitOutcome:
    """What may leave the device after training: the update, its weight and metrics; where
    the task named a codec, the ``payload`` that carries the update (``update`` is what it
    decodes to) and the ``residual`` the client keeps for its next update."""

    update: Vector
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    noise: NoiseSource | None = None  # the task's DP noise, for a secure round's noise share
    payload: bytes | None = None
    residual: Vector | None = None
    codec: str = ""  # the payload's codec (its spec)


@dataclass(frozen=True, slots=True)
class EvaluateOutcome:
    """A client's evaluation of the global model."""

    loss: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def run_fit(
    client: Client,
    parameters: Parameters,
    config: FitConfig,
    *,
    seeded_noise: bool = False,
    residual: Vector | None = None,
) -> FitOutcome:
    """Train, and make the update fit to leave the device (see the module docstring);
    ``residual``: what this client's last compressed upload left out."""
    result = client.fit(parameters, config)
    update = fit_update(result, parameters).vector
    if not all_finite(update):
        raise ClientError("the update holds NaN or infinite values")
    if CLIP_NORM not in config.extras:
        outcome = FitOutcome(update, result.num_examples, dict(result.metrics))
    else:
        noise = _noise(config, seeded=seeded_noise)  # user-level DP: clip on the device
        private, metrics = privatize_update(update, config.extras, result.metrics, noise=noise)
        outcome = FitOutcome(private, result.num_examples, metrics, noise)
    return _compressed(outcome, config, residual=residual)


def _task_codec(config: FitConfig) -> Compression:
    """The codec ``config`` asks the update to be uploaded with (``none``: as it is)."""
    spec = config.extras.get(COMPRESSION_KEY)
    if spec is None:
        return Compression()
    try:
        return Compression.parse(spec)
    except ConfigError as exc:
        raise ClientError(
            f"the task asks for an upload codec this client cannot use: {exc}"
        ) from exc


def _compressed(outcome: FitOutcome, config: FitConfig, *, residual: Vector | None) -> FitOutcome:
    """``outcome`` with its update encoded as the task asks: the payload, what it decodes to,
    and (top-k) what it left out. The rounding is drawn from the task's seed, as the
    coordinator's own draws are: a run replays its uploads bit for bit."""
    codec = _task_codec(config)
    if not codec.enabled:
        return outcome
    target = with_feedback(outcome.update, residual) if codec.kind == "topk" else outcome.update
    rounding = np.random.default_rng([config.seed % 2**64, _ROUNDING])
    payload = encode(target, codec, rng=rounding)
    decoded = decode(payload, codec, size=len(target))
    left = target - decoded if codec.kind == "topk" else None
    payload, sent = _within_clip(payload, decoded, codec, config)  # what it scales away is gone
    return replace(outcome, update=sent, payload=payload, residual=left, codec=codec.spec)


_CLIP_MARGIN = 1 - 2**-20  # float32 rounding of the scaled payload stays under the norm


def _within_clip(
    payload: bytes, decoded: Vector, codec: Compression, config: FitConfig
) -> tuple[bytes, Vector]:
    """``payload`` (which decodes to ``decoded``) decoding to no more than the task's DP clip
    norm, and what it decodes to, where the coordinator
    clips what it decodes (central DP): a quantized update's rounding can raise its norm past
    the clip (a ternary one's by about 1.7 times), and the coordinator's clip would then
    count it as clipped, raising the adaptive clip norm (and its noise) round after round.
    The residual is what the codec left out, before this: what the clip takes is not sent
    later either (added back, it grew round after round)."""
    clip_norm = config.extras.get(CLIP_NORM)
    if not isinstance(clip_norm, int | float) or LOCAL_NOISE_STD in config.extras:
        return payload, decoded  # no DP, or noised here: the coordinator does not clip it
    norm = float(np.linalg.norm(decoded.astype(np.float64)))
    if norm <= clip_norm:
        return payload, decoded
    payload = rescaled(payload, codec, factor=clip_norm / norm * _CLIP_MARGIN)
    return payload, decode(payload, codec, size=len(decoded))


def run_evaluate(client: Client, parameters: Parameters, config: EvaluateConfig) -> EvaluateOutcome:
    """Evaluate the global model (a loss that is not finite is the coordinator's to refuse)."""
    result = client.evaluate(parameters, config)
    return EvaluateOutcome(float(result.loss), result.num_examples, dict(result.metrics))


def secure_contribution(
    outcome: FitOutcome, config: FitConfig, *, seeded_noise: bool = False
) -> Contribution:
    """A secure round's input: the update, its weight, and the task's DP noise share.

    Under user-level DP the training loss is withheld (the sum carries 0).
    """
    loss = outcome.metrics.get("loss", 0.0)
    noise = outcome.noise
    if noise is None and CLIP_NORM in config.extras:
        noise = _noise(config, seeded=seeded_noise)
    return Contribution(
        outcome.update,
        outcome.num_examples,
        float(loss) if isinstance(loss, int | float) else 0.0,
        uniform_weight=uniform_weight(config.extras),
        noise_std=distributed_noise_std(config.extras),
        noise=noise,
        exact_weight=BOUNDS_KEY in config.extras,  # a statistics run's moments
    )


_ROUNDING = 0x726F756E  # the stream of a task's seed that rounds its compressed update


def _noise(config: FitConfig, *, seeded: bool) -> NoiseSource:
    """The CSPRNG; the task's seed only when the simulator asked (``seeded``)."""
    return client_noise(seed=config.seed if seeded else None)
