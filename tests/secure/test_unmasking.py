"""The server's share ledger: altered shares name their holder, bad dealing names the dealer."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.core import SecurityError
from shoal.secure.consistency import share_digest
from shoal.secure.crypto import SessionContext
from shoal.secure.shamir import bytes_to_field, share
from shoal.secure.unmasking import DealerCheated, ShareLedger

CONTEXT = SessionContext("run", 1)
SECRET = bytes(range(32))


def _dealt(owner: int, holders: list[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The seed halves each holder reveals, and the digests the dealer published for them."""
    rows = share(bytes_to_field(SECRET), threshold=3, xs=holders)
    halves = {h: row.astype("<u4").tobytes() for h, row in zip(holders, rows, strict=True)}
    digests = {
        h: share_digest(CONTEXT, dealer=owner, holder=h, key_half=b"", seed_half=half)
        for h, half in halves.items()
    }
    return halves, digests


def _take(ledger: ShareLedger, owner: int, halves: dict[int, bytes], digests: dict[int, bytes]):  # type: ignore[no-untyped-def]
    for holder, half in halves.items():
        ledger.take(
            CONTEXT,
            holder,
            seed_shares={owner: half},
            key_shares={},
            digests={owner: digests.get(holder, bytes(64))},
        )


def test_honest_shares_rebuild_the_committed_secret() -> None:
    ledger = ShareLedger()
    halves, digests = _dealt(1, [1, 2, 3, 4])
    _take(ledger, 1, halves, digests)
    secret = ledger.rebuild(1, seeds=True, threshold=3, matches=lambda s: s == SECRET)
    assert secret == SECRET and ledger.culprits == {}


def test_an_altered_share_is_set_aside_and_its_holder_named() -> None:
    ledger = ShareLedger(names={3: "site-3"})
    halves, digests = _dealt(1, [1, 2, 3, 4])
    limbs = np.frombuffer(halves[2], dtype="<u4").copy()
    limbs[0] += 1
    ledger.take(
        CONTEXT, 2, seed_shares={1: limbs.tobytes()}, key_shares={}, digests={1: digests[2]}
    )
    assert ledger.count(seeds=True, owner=1) == 0
    assert "seed share of node 1" in ledger.culprits[2]
    _take(ledger, 1, {h: halves[h] for h in (1, 3, 4)}, digests)
    assert ledger.rebuild(1, seeds=True, threshold=3, matches=lambda s: s == SECRET) == SECRET


def test_the_owners_own_share_is_used_last_and_bad_dealing_names_the_dealer() -> None:
    ledger = ShareLedger()
    halves, digests = _dealt(1, [1, 2, 3, 4])
    own = np.frombuffer(halves[1], dtype="<u4").copy()
    own[0] += 1  # no digest covers it: unused while three others suffice
    _take(ledger, 1, {**halves, 1: own.tobytes()}, digests)
    assert ledger.rebuild(1, seeds=True, threshold=3, matches=lambda s: s == SECRET) == SECRET
    with pytest.raises(DealerCheated) as cheated:
        ledger.rebuild(1, seeds=True, threshold=3, matches=lambda s: False)
    assert cheated.value.node == 1 and "committed to" in cheated.value.reason
    with pytest.raises(SecurityError, match="3 needed"):
        ShareLedger().rebuild(1, seeds=True, threshold=3, matches=lambda s: True)
