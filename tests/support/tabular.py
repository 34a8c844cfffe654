"""Small labelled tables built in memory, in each form :func:`shoal.datasets.partition` takes.

Every form holds the same examples: features ``a`` and ``b``, an integer
``label`` with five classes, and a ``user`` id with seven values, so a test
can compare a partition's numpy arrays with the source rows it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

KINDS = ["pair", "mapping", "dataframe", "hf_dataset"]
NUM_ROWS = 400
NUM_CLASSES = 5
USERS = ("ann", "bo", "cy", "dee", "ed", "flo", "gus")


@dataclass(frozen=True)
class Examples:
    """One table's columns as numpy, and the same rows in the form under test."""

    features: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    users: npt.NDArray[np.str_]
    data: Any


def make_columns(
    *, num_rows: int = NUM_ROWS, seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.str_]]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_rows, 2))
    labels = rng.integers(0, NUM_CLASSES, num_rows)
    users = rng.choice(np.array(USERS), num_rows)
    return features, labels, users


def in_form(
    kind: str,
    features: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    users: npt.NDArray[np.str_],
) -> Any:
    """The examples as a pair, a mapping, a DataFrame or a Hugging Face Dataset."""
    columns = {"a": features[:, 0], "b": features[:, 1], "label": labels, "user": users}
    if kind == "pair":
        return (features, labels)
    if kind == "mapping":
        return columns
    if kind == "dataframe":
        import pandas as pd

        return pd.DataFrame(columns)
    import datasets

    return datasets.Dataset.from_dict({name: list(values) for name, values in columns.items()})
