"""A dishonest client alters one limb of one share it reveals: the sum is exact or names it."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.secure import loopback
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.messages import ServerRequest, UnmaskShares
from shoal.secure.quantization import Quantization
from shoal.secure.server import Aborted, SumReady

QUANTIZATION = Quantization(clip=2.0, bits=20, max_weight=1_000)
CHEAT = "client-003"


class LimbAdder(SecAggClient):
    """Honest in every stage but the last: it adds 1 to one limb of the first share it reveals."""

    def handle(self, request: ServerRequest, contribution: Contribution | None = None):  # type: ignore[no-untyped-def]
        reply = super().handle(request, contribution)
        if not isinstance(reply, UnmaskShares):
            return reply
        seeds = dict(reply.seed_shares)
        owner = min(seeds)
        limbs = bytearray(seeds[owner])
        limbs[0] = (limbs[0] + 1) % 256
        seeds[owner] = bytes(limbs)
        return UnmaskShares(reply.round, seeds, reply.key_shares)


def _contributions(count: int, seed: int = 0) -> dict[str, Contribution]:
    rng = np.random.default_rng(seed)
    return {
        f"client-{i:03d}": Contribution(
            update=rng.uniform(-1, 1, 32).astype(np.float32),
            num_examples=int(rng.integers(1, 500)),
        )
        for i in range(count)
    }


@pytest.mark.parametrize("degree", [4, 9])
def test_a_tampered_revealed_share_never_corrupts_the_sum(
    monkeypatch: pytest.MonkeyPatch, degree: int
) -> None:
    contributions = _contributions(10)

    clients = iter(sorted(contributions))

    def client_for(*, round: int, **kwargs: object) -> SecAggClient:
        name = next(clients)
        cls = LimbAdder if name == CHEAT else SecAggClient
        return cls(round=round, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loopback, "SecAggClient", client_for)
    outcome = loopback.run_loopback_round(contributions, degree=degree, quantization=QUANTIZATION)
    result = outcome.result
    if isinstance(result, Aborted):
        assert CHEAT in result.culprits
        return
    assert isinstance(result, SumReady)
    expected = sum(
        QUANTIZATION.weight(c.num_examples) * c.update.astype(np.float64)
        for c in contributions.values()
    )
    error = float(np.max(np.abs(result.result.decoded.weighted_sum - expected)))
    assert error < 1e-3, f"the round finished with an error of {error}"
    assert CHEAT in result.result.culprits
