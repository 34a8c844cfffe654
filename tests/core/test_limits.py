"""Upper bounds with their reasons: the Limit marker, memory budgets, sizes and addresses."""

from __future__ import annotations

from typing import Annotated

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from shoal.core.limits import (
    ABOVE_LIMIT,
    MAX_PORT,
    Limit,
    format_bytes,
    largest_count,
    split_host_port,
    within_budget,
)

Bounded = TypeAdapter(Annotated[int, Field(ge=0), Limit(10, "ten is plenty")] | None)


@pytest.mark.parametrize("value", [None, 0, 10])
def test_a_value_within_its_limit_passes(value: int | None) -> None:
    assert Bounded.validate_python(value) == value


def test_a_value_above_its_limit_carries_the_limit_and_the_reason() -> None:
    with pytest.raises(ValidationError) as caught:
        Bounded.validate_python(11)
    error = caught.value.errors()[0]
    assert error["type"] == ABOVE_LIMIT
    assert error["ctx"] == {"limit": 10, "why": "ten is plenty"}
    assert error["msg"] == "is above the limit of 10: ten is plenty"


def test_a_limit_must_say_why() -> None:
    with pytest.raises(ValueError, match="says why"):
        Limit(10, " ")


def test_a_budget_names_the_key_the_largest_value_that_fits_and_the_need() -> None:
    within_budget("k", 3, needed=900, budget=1000, bytes_each=300, what="it would need")
    with pytest.raises(PydanticCustomError) as caught:
        within_budget("k", 4, needed=1200, budget=1000, bytes_each=300, what="it would need")
    assert caught.value.context == {
        "limit": 3,
        "why": "it would need 1.17 KiB, over the 1,000 bytes allowed",
        "key": "k",
        "value": 4,
    }


@given(budget=st.integers(0, 2**40), each=st.integers(1, 2**20), fixed=st.integers(0, 2**30))
def test_largest_count_is_the_largest_that_fits(budget: int, each: int, fixed: int) -> None:
    count = largest_count(budget_bytes=budget, bytes_each=each, fixed_bytes=fixed)
    assert count >= 0
    if count:
        assert count * each + fixed <= budget
    assert (count + 1) * each + fixed > budget


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 bytes"),
        (1023, "1,023 bytes"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (64 * 2**20, "64 MiB"),
        (300_000_000_000, "279 GiB"),
        (5 * 2**40, "5 TiB"),
    ],
)
def test_sizes_read_in_binary_units(size: int, text: str) -> None:
    assert format_bytes(size) == text


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", MAX_PORT)),
        ("[::]:50051", ("[::]", 50051)),
        ("fl.example.com:443", ("fl.example.com", 443)),
    ],
)
def test_an_address_is_a_host_and_a_port(address: str, parts: tuple[str, int]) -> None:
    assert split_host_port(address) == parts


@pytest.mark.parametrize(
    "address", ["", "host", "host:", ":80", "host:65536", "host:-1", "host:8o", "host:1 2"]
)
def test_a_malformed_address_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT with a port from 0"):
        split_host_port(address)
