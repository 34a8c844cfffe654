"""Per-round pseudonyms for clients in stored telemetry, and timestamps coarsened to a granularity.

A client's pseudonym in round ``r`` of run ``R`` is a keyed hash,
HMAC-SHA256(key, R || r || client id), cut to 64 bits: a reader of the
stored round records (``round_participants``, the policy decision log) can
neither name the client nor link its rounds to each other, while the
coordinator, holding the key, resolves any pseudonym against its registry
for the poisoning playbook or unlearning. The key is a separate file
(``pseudonym.key``, 0600) beside the coordinator's signing key, never in the
metrics, the registry database or MLflow.

>>> names = Pseudonyms(b"k" * 32, run_id="demo")
>>> names.of("client-00001", round_number=3) == names.of("client-00001", round_number=3)
True
>>> names.of("client-00001", round_number=3) == names.of("client-00001", round_number=4)
False
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Protocol

from shoal.core.errors import ConfigError

PSEUDONYM_KEY_FILE = "pseudonym.key"
KEY_BYTES = 32
PREFIX = "p-"
# a client id's characters (shoal.core.identifiers): the tokens of a text that may be one
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)


class Names(Protocol):
    """How stored records name a client in a round (:class:`Pseudonyms` or :class:`PlainNames`)."""

    def of(self, client_id: str, *, round_number: int) -> str: ...


class Pseudonyms:
    """The pseudonyms of one run (see the module docstring)."""

    def __init__(self, key: bytes, *, run_id: str) -> None:
        if len(key) < 16:
            raise ConfigError("a pseudonym key needs at least 16 bytes")
        self._key = bytes(key)
        self.run_id = run_id
        # the latest round's pseudonyms: a round's records name its clients several times
        # (its row, its participants, its drift projection); swapped whole, never edited
        # by two threads at once into a mix of rounds
        self._round: tuple[int, dict[str, str]] = (-1, {})

    @classmethod
    def in_folder(cls, folder: str | Path, *, run_id: str) -> Pseudonyms:
        """The run's pseudonyms, with the key kept in ``folder`` (created, 0600, on first use)."""
        return cls(load_or_create_key(Path(folder) / PSEUDONYM_KEY_FILE), run_id=run_id)

    def of(self, client_id: str, *, round_number: int) -> str:
        cached_round, cache = self._round
        if cached_round != round_number:
            cache = {}
            self._round = (round_number, cache)
        name = cache.get(client_id)
        if name is None:
            message = f"{self.run_id}\x00{round_number}\x00{client_id}".encode()
            name = PREFIX + hmac.new(self._key, message, hashlib.sha256).hexdigest()[:16]
            cache[client_id] = name
        return name

    def resolve(
        self, pseudonym: str, *, round_number: int, candidates: Iterable[str]
    ) -> str | None:
        """The candidate that ``pseudonym`` stands for in ``round_number``, if any."""
        for client_id in candidates:
            if hmac.compare_digest(self.of(client_id, round_number=round_number), pseudonym):
                return client_id
        return None


class PlainNames:
    """The no-pseudonym policy (``metadata.pseudonyms = false``): clients under their ids."""

    run_id = ""

    def of(self, client_id: str, *, round_number: int) -> str:
        return client_id

    def resolve(
        self, pseudonym: str, *, round_number: int, candidates: Iterable[str]
    ) -> str | None:
        return pseudonym


def pseudonymize(value: Any, *, names: Names, clients: Collection[str], round_number: int) -> Any:
    """``value`` (a metrics row, a list, a text) with every id of ``clients`` under its
    pseudonym of ``round_number``: a string that is an id, and an id inside a text (a failure
    reason, an abort reason, a dictionary key), wherever it is nested.

    >>> names = Pseudonyms(b"k" * 32, run_id="demo")
    >>> row = pseudonymize({"failures": {"client-7 ran out of memory": 1}}, names=names,
    ...                    clients={"client-7"}, round_number=2)
    >>> "client-7" in str(row)
    False
    """
    members = frozenset(clients)
    if not members:
        return value

    def rename(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in members:
            return names.of(token, round_number=round_number)
        bare = token.rstrip("._-")  # a sentence's full stop is not part of the id
        if bare in members:
            return names.of(bare, round_number=round_number) + token[len(bare) :]
        return token

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            if members.isdisjoint(_candidates(item)):  # most texts: a field's name, a code
                return item
            return _TOKEN.sub(rename, item)
        if isinstance(item, dict):
            return {walk(key): walk(entry) for key, entry in item.items()}
        if isinstance(item, list | tuple):
            return type(item)(walk(entry) for entry in item)
        return item

    return walk(value)


@functools.lru_cache(maxsize=4096)
def _candidates(text: str) -> frozenset[str]:
    """What in ``text`` could be a client's id: each token, and each without its trailing
    punctuation (as :func:`pseudonymize` renames them). Kept per text: a row's keys and
    codes come back every round."""
    tokens = _TOKEN.findall(text)
    return frozenset({*tokens, *(token.rstrip("._-") for token in tokens)})


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path``; a new random one is written there (0600) when it is absent.

    A key readable by others is refused: whoever reads it links every round.
    """
    if path.exists():
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} is readable by others: chmod 600 it")
        key = path.read_bytes()
        if len(key) < 16:
            raise ConfigError(f"{path} holds {len(key)} bytes, not a pseudonym key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    return key
