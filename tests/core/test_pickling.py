"""Task and outcome objects pickle as their fields, every field carried, their checks rerun."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from shoal.core.errors import ClientError
from shoal.core.pickling import pickled_by_fields
from shoal.simulation.executor import Job, Outcome
from shoal.tasks import EvaluateConfig, FitConfig


def test_a_chunk_of_jobs_and_outcomes_comes_back_whole() -> None:
    fit = FitConfig(
        round=3, epochs=0.5, batch_size=8, learning_rate=0.1, proximal_mu=0.01, seed=7,
        extras={"lr": 0.2, "phase": "warm"},
    )  # fmt: skip
    jobs = [
        Job("client-1", fit, seeded_noise=True),
        Job("client-2", EvaluateConfig(4, 16, {"k": 1})),
    ]
    assert pickle.loads(pickle.dumps(jobs)) == jobs
    update = np.arange(5, dtype=np.float32)
    outcome = Outcome(
        "client-1", 12, update=update, loss=0.5, metrics={"accuracy": 0.9}, error=None
    )
    back = pickle.loads(pickle.dumps(outcome))
    for field in dataclasses.fields(Outcome):
        if field.name == "update":
            np.testing.assert_array_equal(back.update, update)  # type: ignore[arg-type]
        else:
            assert getattr(back, field.name) == getattr(outcome, field.name)


def test_unpickling_runs_the_class_checks_again() -> None:
    kind, values = FitConfig(round=1).__reduce__()  # type: ignore[misc]
    tampered = (values[0], -1.0, *values[2:])  # epochs must be positive
    with pytest.raises(ClientError, match="epochs must be positive"):
        kind(*tampered)


def test_a_field_init_does_not_take_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Derived:
        x: int
        y: int = dataclasses.field(init=False, default=0)

    with pytest.raises(TypeError, match="__init__ does not take"):
        pickled_by_fields(Derived)
