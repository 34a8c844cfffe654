"""Per-round pseudonyms: unlinkable across rounds, stable in one, resolvable only with the key."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core import ConfigError
from shoal.core.identifiers import CLIENT_ID_PATTERN
from shoal.governance.pseudonyms import (
    PSEUDONYM_KEY_FILE,
    PlainNames,
    Pseudonyms,
    load_or_create_key,
    pseudonymize,
)

KEY = b"k" * 32
CLIENTS = [f"client-{index}" for index in range(12)]
client_ids = st.from_regex(CLIENT_ID_PATTERN, fullmatch=True)


@settings(max_examples=50, deadline=None)
@given(client_ids, st.integers(1, 10_000))
def test_a_pseudonym_is_stable_in_its_round_and_changes_with_the_round(
    client: str, round_number: int
) -> None:
    names = Pseudonyms(KEY, run_id="run-1")
    here = names.of(client, round_number=round_number)
    assert here == names.of(client, round_number=round_number)
    assert here != names.of(client, round_number=round_number + 1)
    assert here != Pseudonyms(KEY, run_id="run-2").of(client, round_number=round_number)
    assert here != client and here.startswith("p-") and len(here) == 18


def test_the_key_resolves_a_pseudonym_and_another_key_does_not() -> None:
    names = Pseudonyms(KEY, run_id="run-1")
    stored = [names.of(client, round_number=3) for client in CLIENTS]
    assert len(set(stored)) == len(CLIENTS)
    assert [names.resolve(p, round_number=3, candidates=CLIENTS) for p in stored] == CLIENTS
    assert names.resolve(stored[0], round_number=4, candidates=CLIENTS) is None  # not that round
    guess = Pseudonyms(b"g" * 32, run_id="run-1")  # a reader without the key tries its own
    assert all(guess.resolve(p, round_number=3, candidates=CLIENTS) is None for p in stored)


def test_plain_names_are_the_ids() -> None:
    plain = PlainNames()
    assert plain.of("client-1", round_number=5) == "client-1"
    assert plain.resolve("client-1", round_number=5, candidates=[]) == "client-1"


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="16 bytes"):
        Pseudonyms(b"short", run_id="r")


def test_the_key_file_is_made_once_private_and_kept(tmp_path: Path) -> None:
    first = Pseudonyms.in_folder(tmp_path / "run", run_id="r")
    key_file = tmp_path / "run" / PSEUDONYM_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    again = Pseudonyms.in_folder(tmp_path / "run", run_id="r")
    assert again.of("a", round_number=1) == first.of("a", round_number=1)
    other = Pseudonyms.in_folder(tmp_path / "other", run_id="r")  # a fresh random key
    assert other.of("a", round_number=1) != first.of("a", round_number=1)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o620])
def test_a_key_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    key_file = tmp_path / PSEUDONYM_KEY_FILE
    key_file.write_bytes(KEY)
    key_file.chmod(mode)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_key(key_file)


def test_a_truncated_key_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / PSEUDONYM_KEY_FILE
    key_file.write_bytes(b"1234")
    key_file.chmod(0o600)
    with pytest.raises(ConfigError, match="not a pseudonym key"):
        load_or_create_key(key_file)


def test_pseudonymize_renames_ids_wherever_they_are_and_nothing_else() -> None:
    names = Pseudonyms(KEY, run_id="r")
    one, ten = (names.of(c, round_number=2) for c in ("client-1", "client-10"))
    row = {
        "phase": "fit",
        "secure_culprits": ["client-10"],
        "failures": {"RuntimeError: client-1 ran out of memory.": 2, "the device dropped": 1},
        "abort_reason": "client-1 dealt a bad share to client-10",
        "fallback": {"note": None, "dropped": 3},
        "notes": ("client-1.", "a client-12 is not in the round"),
    }
    got = pseudonymize(row, names=names, clients={"client-1", "client-10"}, round_number=2)
    assert got == {
        "phase": "fit",
        "secure_culprits": [ten],
        "failures": {f"RuntimeError: {one} ran out of memory.": 2, "the device dropped": 1},
        "abort_reason": f"{one} dealt a bad share to {ten}",
        "fallback": {"note": None, "dropped": 3},
        "notes": (f"{one}.", "a client-12 is not in the round"),
    }
    assert pseudonymize(row, names=names, clients=(), round_number=2) == row


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(CLIENTS),
            st.sampled_from([".", "-", "_", " ", ": ", "client-1.", "client-12", "x"]),
            st.text(alphabet="abc-_. 0123456789", max_size=6),
        ),
        max_size=8,
    ),
    st.sets(st.sampled_from(CLIENTS), max_size=6),
)
def test_a_text_that_names_no_member_is_kept_and_every_member_is_renamed(
    parts: list[str], members: set[str]
) -> None:
    """The fast path for texts without a member agrees with renaming every token."""
    names = Pseudonyms(KEY, run_id="run")
    text = "".join(parts)
    renamed = pseudonymize(text, names=names, clients=members, round_number=3)
    expected = re.sub(
        r"[A-Za-z0-9][A-Za-z0-9._-]*",
        lambda match: _renamed(match.group(0), members, names),
        text,
        flags=re.ASCII,
    )
    assert renamed == expected


def _renamed(token: str, members: set[str], names: Pseudonyms) -> str:
    if token in members:
        return names.of(token, round_number=3)
    bare = token.rstrip("._-")
    if bare in members:
        return names.of(bare, round_number=3) + token[len(bare) :]
    return token
