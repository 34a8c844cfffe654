"""A sha256 named on the wire: 64 lowercase hex digits, and an error of bounded size."""

from __future__ import annotations

import pytest

from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ProtocolError


def test_a_sha256_is_64_lowercase_hex_digits() -> None:
    check_sha256_hex("0" * 64, "the model's sha256")
    for bad in ("0" * 63, "A" * 64, "g" * 64, ""):
        with pytest.raises(ProtocolError, match="64 lowercase hex digits"):
            check_sha256_hex(bad, "the model's sha256")


def test_a_huge_value_is_not_echoed_whole() -> None:
    """A peer's 4 MiB "digest" was echoed whole in the error, and so in a log line."""
    with pytest.raises(ProtocolError) as refused:
        check_sha256_hex("a" * 4 * 2**20, "the model's sha256")
    assert len(str(refused.value)) < 200
    assert f"({4 * 2**20} characters)" in str(refused.value)
