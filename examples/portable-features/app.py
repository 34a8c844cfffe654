"""Phones that predict whether their user will open a notification, from features that one
WebAssembly module computes on every phone and on the server alike.

Each phone holds raw records (``timestamp_ms``, ``latitude``, ``longitude``,
``battery_level``) and whether the user opened the notification sent then. The
app never computes a feature itself: it gives its raw records to the run's
feature module (``context.features``, the job's ``[features] module``: a deployed
phone's own copy, pinned, or the coordinator's, checked against the sha256 signed
with each model version) and trains a NumPy softmax regression on what comes back.
The coordinator's central evaluation computes its held-out records' features
with the same module. ``features.wat`` is the module; ``reference.py`` says
what each feature is.

The records are synthetic and made here from the run's seed: phones in a few
cities, four weeks of December 2026, users who open notifications more in the
evening, at weekends, on a charged battery, and more in the north.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shoal import ClientContext, ServerApp, ServerContext
from shoal.client.numpy_models import NumpyClient, SoftmaxRegression
from shoal.core.errors import ConfigError
from shoal.core.parameters import Parameters
from shoal.features import FeatureModule

INPUTS = ("timestamp_ms", "latitude", "longitude", "battery_level")
NUM_FEATURES = 6  # what phone-context 1.0.0 computes (its manifest's outputs)
CITIES = ((52.52, 13.40), (48.86, 2.35), (40.42, -3.70), (59.33, 18.07), (41.90, 12.50))
START_MS = 1_796_083_200_000  # 2026-12-01T00:00:00Z
SPAN_MS = 28 * 86_400_000  # four weeks
RECORDS_PER_PHONE = 300
HELD_OUT = 2_000  # the coordinator's own records, for the central evaluation
LOCAL_EVAL_FRACTION = 0.2
MODEL = SoftmaxRegression(num_features=NUM_FEATURES, num_classes=2)


def phone_records(
    rng: np.random.Generator, count: int
) -> tuple[dict[str, npt.NDArray[np.float64]], npt.NDArray[np.int64]]:
    """``count`` raw records of one phone (its city drawn first) and the user's answers."""
    lat, lon = CITIES[int(rng.integers(len(CITIES)))]
    records = {
        "timestamp_ms": np.floor(START_MS + rng.uniform(0, SPAN_MS, count)),
        "latitude": lat + rng.normal(0, 0.05, count),
        "longitude": lon + rng.normal(0, 0.05, count),
        "battery_level": rng.beta(2.0, 1.5, count),
    }
    return records, _answers(records, rng)


def _answers(
    records: dict[str, npt.NDArray[np.float64]], rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """The world's behaviour (not the model's features): opens peak at 20:00 UTC, rise at
    weekends, with charge, and with latitude."""
    ms = records["timestamp_ms"]
    hour = (ms % 86_400_000) / 3_600_000
    weekday = (np.floor(ms / 86_400_000) + 4) % 7  # 0 is Sunday: 1970-01-01 was a Thursday
    weekend = (weekday == 0) | (weekday == 6)
    logit = (
        2.5 * np.cos(2 * np.pi * (hour - 20) / 24)
        + 1.5 * weekend
        + 2.0 * (records["battery_level"] - 0.5)
        + 0.08 * (records["latitude"] - 48)
        - 0.5
    )
    return (rng.random(ms.size) < 1 / (1 + np.exp(-logit))).astype(np.int64)


def features_of(
    module: FeatureModule | None, records: dict[str, npt.NDArray[np.float64]]
) -> npt.NDArray[np.float32]:
    """The model's inputs: the run's feature module applied to raw records (the bucket
    scaled to [0, 1] like the rest)."""
    if module is None:
        raise ConfigError(
            "this app computes its features with a feature module: set "
            "[features] module = 'features.wat' in the job"
        )
    features = module.extract(records)
    features[:, module.outputs.index("battery_bucket")] /= 9.0
    return features


def client_fn(context: ClientContext) -> NumpyClient:
    """Phone ``partition_index``: its records' features, less a fifth for local evaluation."""
    index, _ = context.require_partition()
    rng = np.random.default_rng([context.seed, index])
    records, answers = phone_records(rng, RECORDS_PER_PHONE)
    features = features_of(context.features, records)
    held = round(LOCAL_EVAL_FRACTION * answers.size)
    return NumpyClient(
        MODEL,
        train_data=(features[held:], answers[held:]),
        eval_data=(features[:held], answers[:held]),
    )


def server_app(context: ServerContext) -> ServerApp:
    """Starts from zeros and evaluates each model on held-out records from every city, their
    features computed by the same module as the phones'."""
    rng = np.random.default_rng([context.seed, 2**31])
    parts = [phone_records(rng, HELD_OUT // len(CITIES)) for _ in CITIES]
    records = {name: np.concatenate([part[0][name] for part in parts]) for name in INPUTS}
    answers = np.concatenate([part[1] for part in parts])
    features = features_of(context.features, records)

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        loss, accuracy = MODEL.evaluate(parameters.vector, features, answers)
        return {"loss": loss, "accuracy": accuracy}

    return ServerApp(
        initial_parameters=lambda _: MODEL.init_parameters(np.random.default_rng(0)),
        evaluate=evaluate,
        architecture="notification-softmax-v1",
    )
