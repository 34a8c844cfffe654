"""A dishonest client alters one limb of one share it reveals: the sum is exact or names it.

Before share digests and seed commitments, adding 1 to one limb of one
revealed share made the round finish with a wrong sum (errors of 31.8 to
several thousand) and nobody named.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from shoal.secure import loopback
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import advertisement_message
from shoal.secure.loopback import run_loopback_round
from shoal.secure.messages import AdvertiseKeysRequest, Advertisement, KeysAdvertised, Stage
from shoal.secure.quantization import Quantization
from shoal.secure.server import Aborted, SumReady

QUANTIZATION = Quantization(clip=2.0, bits=20, max_weight=1_000)


def _contributions(count: int, seed: int = 0) -> dict[str, Contribution]:
    rng = np.random.default_rng(seed)
    return {
        f"client-{i:03d}": Contribution(
            update=rng.uniform(-1, 1, 32).astype(np.float32),
            num_examples=int(rng.integers(1, 500)),
        )
        for i in range(count)
    }


def _plaintext(contributions: dict[str, Contribution], clients: tuple[str, ...]) -> np.ndarray:
    return sum(
        QUANTIZATION.weight(contributions[c].num_examples) * contributions[c].update.astype(float)
        for c in clients
    )


@pytest.mark.parametrize("degree", [4, 9])
@pytest.mark.parametrize("dropped", [None, "client-005"])  # a key share is revealed too
def test_a_tampered_revealed_share_never_corrupts_the_sum(degree: int, dropped: str | None) -> None:
    contributions, cheat = _contributions(10), "client-000"  # its reply is taken first
    dropouts = {} if dropped is None else {dropped: Stage.MASKED_INPUT}
    outcome = run_loopback_round(
        contributions,
        degree=degree,
        quantization=QUANTIZATION,
        dropouts=dropouts,
        cheats=[cheat],
    )
    result = outcome.result
    if isinstance(result, Aborted):
        assert cheat in result.culprits
        return
    assert isinstance(result, SumReady)
    total = result.result
    error = np.max(
        np.abs(total.decoded.weighted_sum - _plaintext(contributions, total.contributors))
    )
    assert error < QUANTIZATION.error_bound(len(total.contributors)), f"error {error}"
    assert set(total.culprits) == {cheat}
    assert "differs from the one it was dealt" in total.culprits[cheat]


def test_when_the_altered_share_was_needed_the_round_aborts_naming_the_cheat() -> None:
    """Three clients, threshold 2 of 3, one dropped: its mask key needs both survivors' shares."""
    outcome = run_loopback_round(
        _contributions(3),
        degree=2,
        quantization=QUANTIZATION,
        dropouts={"client-002": Stage.MASKED_INPUT},
        cheats=["client-000"],
    )
    result = outcome.result
    assert isinstance(result, Aborted)
    assert set(result.culprits) == {"client-000"}
    assert "key share of client-002" in result.culprits["client-000"]


class LyingDealer(SecAggClient):
    """Commits to a seed other than the one it shares (and masks with)."""

    def _advertise(self, request: AdvertiseKeysRequest) -> KeysAdvertised:
        honest = super()._advertise(request).advertisement
        commitment = os.urandom(32)
        message = advertisement_message(
            self._context(),
            request.node,
            cipher=honest.keys.cipher,
            mask=honest.keys.mask,
            seed_commitment=commitment,
        )
        advertisement = Advertisement(honest.keys, commitment, self._identity.sign(message))
        return KeysAdvertised(request.round, advertisement)


def test_a_dealer_whose_shares_miss_its_commitment_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    contributions = _contributions(8)
    names = iter(sorted(contributions))

    def client_for(**kwargs: Any) -> SecAggClient:
        return (LyingDealer if next(names) == "client-004" else SecAggClient)(**kwargs)

    monkeypatch.setattr(loopback, "SecAggClient", client_for)
    outcome = loopback.run_loopback_round(contributions, degree=7, quantization=QUANTIZATION)
    result = outcome.result
    assert isinstance(result, Aborted)
    assert result.culprits == {
        "client-004": "dealt shares that do not rebuild the self-mask seed it committed to"
    }
