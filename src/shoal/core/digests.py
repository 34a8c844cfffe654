"""Content digests as they travel: a sha256 is 64 lowercase hex digits."""

from __future__ import annotations

from shoal.core.errors import ProtocolError

_HEX = frozenset("0123456789abcdef")


def check_sha256_hex(value: str, what: str) -> None:
    """Raise ``ProtocolError`` unless ``value`` is 64 lowercase hex digits."""
    if len(value) != 64 or not set(value) <= _HEX:
        shown = repr(value) if len(value) <= 80 else f"{value[:64]!r}... ({len(value)} characters)"
        raise ProtocolError(f"{what} must be a sha256 in 64 lowercase hex digits, got {shown}")
