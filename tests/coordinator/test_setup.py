"""From the config to the coordinator's parts: the listed enrollment tokens and their limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shoal.config import parse_config
from shoal.coordinator.setup import connect_key_holder, listed_tokens_from_config
from shoal.core.errors import ConfigError, TransportError
from shoal.registry import ListedToken
from shoal.secure.keyholder import KeyHolder
from shoal.transport.certs import init_certificates, issue_client_certificate
from shoal.transport.keyholder_service import serve_keyholder
from shoal.transport.signing import generate_client_key


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


def test_a_key_holder_that_requires_mutual_tls_gets_the_coordinators_certificate(
    tmp_path: Path,
) -> None:
    """``shoal keyholder serve --mutual-tls`` refused the coordinator before: it had no way
    to present a certificate, so the key holder's port was open to anyone who reached it."""
    certs = init_certificates(tmp_path / "certs")
    mine = issue_client_certificate(tmp_path / "certs", "coordinator", tmp_path / "mine")
    silos = {f"silo-{index}": generate_client_key()[1] for index in range(2)}
    KeyHolder.init(tmp_path / "keyholder", min_contributors=2, silos=silos)
    ca = str(certs.ca.certificate)
    with serve_keyholder(
        tmp_path / "keyholder",
        address="127.0.0.1:0",
        server_certificate=certs.server,
        client_ca=ca,
    ) as server:
        section = {"protocol": "ckks", "key_holder": server.address, "key_holder_ca": ca}
        anonymous = parse_config({"secure_aggregation": section}).secure_aggregation
        with pytest.raises(TransportError, match="the client certificate if it requires mutual"):
            connect_key_holder(anonymous).close()
        with_certificate = parse_config(
            {
                "secure_aggregation": section
                | {
                    "key_holder_certificate": str(mine.certificate),
                    "key_holder_key": str(mine.private_key),
                }
            }
        ).secure_aggregation
        client = connect_key_holder(with_certificate)
        try:
            assert client.public_context()
        finally:
            client.close()


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"key_holder_certificate": "c.pem"}, "give both"),
        ({"key_holder_key": "c.key", "key_holder_ca": "ca.pem"}, "give both"),
        ({"key_holder_certificate": "c.pem", "key_holder_key": "c.key"}, "needs key_holder_ca"),
    ],
)
def test_a_client_certificate_for_the_key_holder_comes_whole(
    keys: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config({"secure_aggregation": {"protocol": "ckks", **keys}})


def test_a_short_listed_token_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """A listed token is a secret the operator chose: "demo" can be guessed online."""
    section = parse_config({"coordinator": {"enrollment_tokens": ["demo", "x" * 16]}}).coordinator
    with caplog.at_level("WARNING", "shoal.coordinator"):
        listed_tokens_from_config(section)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "enrollment_tokens[0] has 4 characters" in warning
    assert "demo" not in warning  # the secret itself is never logged
