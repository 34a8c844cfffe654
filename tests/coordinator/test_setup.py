"""From the config to the coordinator's parts: the listed enrollment tokens and their limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shoal.config import parse_config
from shoal.coordinator.setup import connect_key_holder, listed_tokens_from_config
from shoal.core.errors import ConfigError
from shoal.registry import ListedToken


def test_no_listed_tokens() -> None:
    assert listed_tokens_from_config(parse_config({}).coordinator) == []


def test_listed_tokens_take_the_registry_defaults_where_the_config_is_silent() -> None:
    dated = datetime(2026, 6, 30, tzinfo=UTC)
    section = parse_config(
        {
            "coordinator": {
                "enrollment_tokens": [
                    "bare",
                    {"token": "pilot", "max_uses": 20, "ttl_days": 2.5},
                    {"token": "dated", "expires": dated},
                ]
            }
        }
    ).coordinator
    assert listed_tokens_from_config(section) == [
        ListedToken(token="bare"),
        ListedToken(token="pilot", max_uses=20, ttl=timedelta(days=2.5)),
        ListedToken(token="dated", expires_at=dated),
    ]
    bare = ListedToken(token="bare")
    assert (bare.max_uses, bare.ttl) == (100, timedelta(days=7))


@pytest.mark.parametrize("address", ["10.0.0.5:50061", "127.0.0.1.example.org:50061"])
def test_a_key_holder_elsewhere_needs_its_certificate_pinned(address: str) -> None:
    section = parse_config(
        {"secure_aggregation": {"protocol": "ckks", "key_holder": address}}
    ).secure_aggregation
    with pytest.raises(ConfigError, match="is not on this machine"):
        connect_key_holder(section)
