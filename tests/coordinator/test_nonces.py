"""The replay guard's journal: what a restart gets back, and what a damaged file costs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from shoal.coordinator.nonces import JOURNAL_FILE, NonceJournal
from shoal.transport.signing import ReplayGuard, create_request_auth, generate_client_key

NOW = 1_800_000_000.0
KEY, PUBLIC = generate_client_key()


def accept(guard: ReplayGuard, *, timestamp: float = NOW, client_id: str = "c1") -> bytes:
    auth = create_request_auth(
        KEY, client_id=client_id, run_id="r", round=1, payload_sha256="00" * 32, timestamp=timestamp
    )
    guard.check(auth, key=PUBLIC, now=NOW)
    return auth.nonce


def reopened(folder: Path, *, now: float = NOW) -> ReplayGuard:
    guard = ReplayGuard()
    NonceJournal.open(folder, guard, now=now).close()
    return guard


def test_a_restart_gets_back_the_unexpired_nonces(tmp_path: Path) -> None:
    guard = ReplayGuard()
    journal = NonceJournal.open(tmp_path, guard, now=NOW)
    old = accept(guard, timestamp=NOW - 250)
    young = accept(guard, client_id="c2")
    journal.close()
    later = reopened(tmp_path, now=NOW + 100)  # the old one's window has passed
    assert {(entry.client_id, entry.nonce) for entry in later.remembered()} == {("c2", young)}
    assert old not in (tmp_path / JOURNAL_FILE).read_bytes()  # rewritten without it


def test_a_torn_last_record_keeps_the_ones_before_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard = ReplayGuard()
    journal = NonceJournal.open(tmp_path, guard, now=NOW)
    kept = [accept(guard) for _ in range(3)]
    journal.close()
    path = tmp_path / JOURNAL_FILE
    path.write_bytes(path.read_bytes()[:-5])  # the crash came in the middle of a write
    with caplog.at_level(logging.WARNING, "shoal.coordinator"):
        again = reopened(tmp_path)
    assert {entry.nonce for entry in again.remembered()} == set(kept[:2])
    assert "torn record" in caplog.text


def test_a_file_that_is_not_a_journal_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(b"\x00garbage" * 10)
    with caplog.at_level(logging.WARNING, "shoal.coordinator"):
        guard = reopened(tmp_path)
    assert len(guard) == 0
    assert "is not a nonce journal" in caplog.text
    accept(ReplayGuard())  # and the file was replaced by an empty journal
    assert reopened(tmp_path).remembered() == []


def test_the_file_is_rewritten_before_it_grows_past_twice_the_live_nonces(tmp_path: Path) -> None:
    guard = ReplayGuard(window_s=10, max_per_client=10**6)
    journal = NonceJournal.open(tmp_path, guard, now=NOW)
    sizes = []
    for second in range(40):  # 100 requests a second; the guard holds about 1,000
        for _ in range(100):
            auth = create_request_auth(
                KEY,
                client_id="c1",
                run_id="r",
                round=1,
                payload_sha256="00" * 32,
                timestamp=NOW + second,
            )
            guard.check(auth, key=PUBLIC, now=NOW + second)
        sizes.append((tmp_path / JOURNAL_FILE).stat().st_size)
    journal.close()
    record = sizes[0] / 100  # about: the first second's records, and the file's header
    assert max(sizes) < record * (2 * 1100 + 1024 + 100)
    assert len(reopened(tmp_path, now=NOW + 39)) == len(guard)


def test_a_journal_that_fails_is_one_warning_not_one_per_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard = ReplayGuard()
    journal = NonceJournal.open(tmp_path, guard, now=NOW)
    assert journal._descriptor is not None
    os.close(journal._descriptor)  # as a disk that went away
    with caplog.at_level(logging.WARNING, "shoal.coordinator"):
        for _ in range(5):
            accept(guard)  # each request still passes the guard in memory
    assert len(guard) == 5
    assert len(caplog.records) == 1 and "in memory only" in caplog.records[0].getMessage()
