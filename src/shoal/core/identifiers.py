"""Client ids: the one character set and length that every part of Shoal accepts.

A client id is 1 to 128 ASCII characters: a letter or a digit, then
letters, digits, ``.``, ``_`` or ``-`` (:data:`CLIENT_ID_PATTERN`). It is
a name in the registry, in log lines, in certificate subjects and in the
operator's commands, so it holds nothing that a path, a shell, SQL, a
terminal or a reader could take for something else: no ``/``, no quote, no
space, no control character, no look-alike from another alphabet. The
coordinator checks it in every request (a refused enrollment tells the
client why), the registry on every write, the CLI on every argument.

>>> check_client_id("hospital-7")
'hospital-7'
>>> is_client_id("../../etc/passwd")
False
"""

from __future__ import annotations

import re

from shoal.core.errors import ProtocolError, ShoalError

MAX_CLIENT_ID_CHARS = 128
CLIENT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN, re.ASCII)
_SHOWN_CHARS = 40  # of a refused id, in the error: enough to recognize it, never a flood


def is_client_id(value: object) -> bool:
    """Whether ``value`` is a client id Shoal accepts."""
    return isinstance(value, str) and _CLIENT_ID.fullmatch(value) is not None


def check_client_id(value: object, *, error: type[ShoalError] = ProtocolError) -> str:
    """``value`` when it is a valid client id; otherwise ``error`` with a one-line reason.

    The error names the rule and shows the refused value (its first 40
    characters, escaped), so that whoever sent it sees what to change.
    """
    if is_client_id(value):
        assert isinstance(value, str)
        return value
    shown = value[:_SHOWN_CHARS] if isinstance(value, str) else value
    more = "..." if isinstance(value, str) and len(value) > _SHOWN_CHARS else ""
    raise error(
        f"a client id is 1 to {MAX_CLIENT_ID_CHARS} ASCII letters, digits, '.', '_' or '-', "
        f"starting with a letter or digit ({CLIENT_ID_PATTERN}); got {shown!r}{more}"
    )
