"""Client ids: one rule, the same answer everywhere, a one-line reason for each refusal."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core import CLIENT_ID_PATTERN, MAX_CLIENT_ID_CHARS, check_client_id, is_client_id
from shoal.core.errors import ConfigError, ProtocolError, RegistryError

ALLOWED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


@pytest.mark.parametrize(
    "client_id", ["c", "7", "hospital-7", "client-00042", "silo_a.eu-west", "A" * 128, "a..b"]
)
def test_good_ids_pass_unchanged(client_id: str) -> None:
    assert check_client_id(client_id) == client_id


@pytest.mark.parametrize(
    "client_id",
    [
        "",
        "A" * 129,
        "../../etc/passwd",
        "..",
        ".hidden",
        "-rf",
        "_x",
        "'; DROP TABLE clients; --",
        "a\x00b",
        "a b",
        "a\nb",
        "a\tb",
        "\u0430dmin",
        "caf\u00e9",
        "\uff43",
        "x\u200b",
        "a/b",
        "a\\b",
        "a:b",
        "$(id)",
        "a%2fb",
    ],
)
def test_hostile_ids_are_refused_with_the_rule_on_one_line(client_id: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        check_client_id(client_id)
    message = str(caught.value)
    assert CLIENT_ID_PATTERN in message and "\n" not in message
    assert not is_client_id(client_id)


def test_the_error_type_is_the_callers_and_a_long_id_is_cut() -> None:
    with pytest.raises(RegistryError, match=r"got 'xxxx.*'\.\.\.$") as caught:
        check_client_id("x" * 10_000, error=RegistryError)
    assert len(str(caught.value)) < 300
    with pytest.raises(ConfigError):
        check_client_id(None, error=ConfigError)
    with pytest.raises(ConfigError):
        check_client_id(b"bytes", error=ConfigError)


@given(st.text(max_size=140))
def test_the_rule_is_the_documented_pattern(text: str) -> None:
    expected = re.fullmatch(CLIENT_ID_PATTERN, text, re.ASCII) is not None
    assert is_client_id(text) is expected
    assert expected is (
        0 < len(text) <= MAX_CLIENT_ID_CHARS
        and all(character in ALLOWED for character in text)
        and text[0] not in "._-"
    )


@given(st.text(alphabet=ALLOWED, min_size=1, max_size=128).filter(lambda t: t[0] not in "._-"))
def test_every_id_of_the_allowed_characters_passes(text: str) -> None:
    assert check_client_id(text) == text
