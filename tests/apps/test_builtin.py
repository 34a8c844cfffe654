"""The built-in app: the sizes the simulator times devices by are the data's, found without it."""

from __future__ import annotations

import pytest

from shoal.apps.builtin import DataScenario
from shoal.simulation.population import client_name
from support.jobs import bare_config


@pytest.mark.parametrize(
    "data",
    [
        ["data.dataset=digits"],
        ["data.dataset=gaussian"],
        ["data.dataset=synthetic"],
        ["data.dataset=synthetic_iid"],
    ],
)
def test_example_counts_match_the_data_and_build_none_of_it(data: list[str]) -> None:
    config = bare_config([*data, "data.num_clients=30"])
    counted, built = DataScenario(config), DataScenario(config)
    for index in range(30):
        client = client_name(index)
        data = built.local_data(client)
        sizes = (counted.num_train_examples(client), counted.num_eval_examples(client))
        assert sizes == (data.train_y.size, data.eval_y.size)
    assert counted._cache == {}  # counting never generated a client's data
