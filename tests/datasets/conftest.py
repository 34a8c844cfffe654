"""The ``examples`` fixture: the same small table as a pair, a mapping, a DataFrame, a Dataset."""

from __future__ import annotations

import pytest

from support.tabular import KINDS, Examples, in_form, make_columns


@pytest.fixture(params=KINDS)
def examples(request: pytest.FixtureRequest) -> Examples:
    features, labels, users = make_columns()
    return Examples(features, labels, users, in_form(request.param, features, labels, users))
