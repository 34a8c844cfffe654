"""SecAgg+ end to end: masks cancel exactly, dropouts at every stage are recovered, aborts."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.loopback import reconstruction_threshold, run_loopback_round
from shoal.secure.messages import ServerRequest, Stage
from shoal.secure.quantization import Quantization, modular_sum
from shoal.secure.server import (
    Aborted,
    MessageReceived,
    SecAggServer,
    ServerEvent,
    StageDeadlines,
    SumReady,
)

QUANTIZATION = Quantization(clip=2.0, bits=20, max_weight=1_000)
DEADLINES = StageDeadlines(advertise_keys=5, share_keys=5, masked_input=60, unmask=5)
PROTOCOL_STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK]


def _contributions(count: int, length: int = 64, seed: int = 0) -> dict[str, Contribution]:
    rng = np.random.default_rng(seed)
    return {
        f"client-{i:03d}": Contribution(
            update=rng.uniform(-1, 1, length).astype(np.float32),
            num_examples=int(rng.integers(1, 500)),
            loss=float(rng.uniform(0, 2)),
        )
        for i in range(count)
    }


def _finished(outcome: SumReady | Aborted) -> SumReady:
    assert isinstance(outcome, SumReady), outcome
    return outcome


def _plaintext_sum(contributions: dict[str, Contribution], clients: tuple[str, ...]) -> np.ndarray:
    return sum(
        QUANTIZATION.weight(contributions[c].num_examples)
        * np.clip(contributions[c].update, -2, 2).astype(np.float64)
        for c in clients
    )


def test_the_server_takes_each_masked_input_before_the_next_client_masks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as on a network, and so that one masked vector is held at a time, not one per client
    events: list[str] = []
    client_handle, server_handle = SecAggClient.handle, SecAggServer.handle

    def client(self: SecAggClient, request: ServerRequest, *args: object) -> object:
        reply = client_handle(self, request, *args)  # type: ignore[arg-type]
        events.append(f"client {request.stage.label}")
        return reply

    def server(self: SecAggServer, event: ServerEvent) -> object:
        if isinstance(event, MessageReceived):
            events.append(f"server {event.message.stage.label}")
        return server_handle(self, event)

    monkeypatch.setattr(SecAggClient, "handle", client)
    monkeypatch.setattr(SecAggServer, "handle", server)
    _finished(run_loopback_round(_contributions(6), degree=5, quantization=QUANTIZATION).result)
    masking = [e for e in events if e.endswith(Stage.MASKED_INPUT.label)]
    assert masking == ["client masked_input", "server masked_input"] * 6


@pytest.mark.parametrize("degree", [3, 11])
def test_masks_cancel_exactly(degree: int) -> None:
    contributions = _contributions(12)
    outcome = run_loopback_round(contributions, degree=degree, quantization=QUANTIZATION, seed=7)
    result = _finished(outcome.result).result
    # the clients' rounding is reproducible from their generators: the unmasked sum is exact
    quantized = [
        QUANTIZATION.encode(
            contributions[client].update,
            num_examples=contributions[client].num_examples,
            loss=contributions[client].loss,
            rng=np.random.default_rng([7, index]),
        )
        for index, client in enumerate(sorted(contributions))
    ]
    expected = QUANTIZATION.decode(modular_sum(quantized), count=12)
    assert np.array_equal(result.decoded.weighted_sum, expected.weighted_sum)
    assert result.decoded.num_examples == sum(c.num_examples for c in contributions.values())
    assert result.contributors == tuple(sorted(contributions))
    assert result.recovered == ()


@pytest.mark.parametrize("stage", PROTOCOL_STAGES)
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("degree", [10, 19])
def test_sum_survives_dropouts_at_each_stage(stage: Stage, fraction: float, degree: int) -> None:
    contributions = _contributions(20)
    clients = sorted(contributions)
    rng = np.random.default_rng(int(fraction * 100) + stage.value)
    gone = rng.choice(clients, size=int(fraction * 20), replace=False)
    outcome = run_loopback_round(
        contributions,
        degree=degree,
        quantization=QUANTIZATION,
        dropouts=dict.fromkeys(gone, stage),
        deadlines=DEADLINES,
    )
    result = _finished(outcome.result).result
    dropped_before_input = stage <= Stage.MASKED_INPUT
    expected_contributors = sorted(set(clients) - set(gone)) if dropped_before_input else clients
    if degree < 19 and stage is Stage.ADVERTISE_KEYS:
        # on a sparse graph, clients left with too few live neighbours are pruned as well
        assert set(result.contributors) <= set(expected_contributors)
        assert len(result.contributors) >= 10
    else:
        assert list(result.contributors) == expected_contributors
    expected = _plaintext_sum(contributions, result.contributors)
    bound = QUANTIZATION.error_bound(len(result.contributors))
    assert np.max(np.abs(result.decoded.weighted_sum - expected)) <= bound
    if stage is Stage.MASKED_INPUT:
        assert sorted(result.recovered) == sorted(gone)  # their pairwise masks were rebuilt
    if stage is Stage.UNMASK:  # it closes once every secret has enough shares, absent or not
        assert result.dropped[stage.label] <= len(gone)
        return
    assert result.dropped[stage.label] == len(clients) - len(result.contributors)
    if len(gone):  # the stalled clients never answered: the stage closed at its deadline
        assert outcome.closed_at[stage.label] >= DEADLINES.of(stage)
    else:
        assert outcome.closed_at[stage.label] < DEADLINES.of(stage)


def test_mean_update_is_the_weighted_mean() -> None:
    contributions = _contributions(8)
    result = _finished(run_loopback_round(contributions, degree=7).result).result
    weights = np.array([min(c.num_examples, 10_000) for c in contributions.values()], float)
    updates = np.stack([c.update for c in contributions.values()]).astype(np.float64)
    expected = (weights[:, None] * updates).sum(0) / weights.sum()
    # the bound holds for the weighted sum; the mean divides it by the total weight
    bound = Quantization().error_bound(8) / result.decoded.total_weight
    assert np.max(np.abs(result.decoded.mean() - expected)) <= bound


def test_round_aborts_below_the_threshold() -> None:
    contributions = _contributions(10)
    gone = dict.fromkeys(sorted(contributions)[:6], Stage.MASKED_INPUT)
    outcome = run_loopback_round(contributions, degree=9, dropouts=gone, deadlines=DEADLINES)
    assert isinstance(outcome.result, Aborted)
    assert "4 clients left after masked_input" in outcome.result.reason
    assert outcome.result.dropped["masked_input"] == 6


def test_round_aborts_when_too_few_unmask_shares_arrive() -> None:
    contributions = _contributions(10)
    gone = dict.fromkeys(sorted(contributions)[:6], Stage.UNMASK)
    outcome = run_loopback_round(contributions, degree=9, dropouts=gone, deadlines=DEADLINES)
    assert isinstance(outcome.result, Aborted)
    assert "too few unmask shares" in outcome.result.reason


def test_minimum_survivors_above_the_threshold_aborts_too() -> None:
    contributions = _contributions(10)
    gone = dict.fromkeys(sorted(contributions)[:2], Stage.ADVERTISE_KEYS)
    outcome = run_loopback_round(contributions, degree=9, dropouts=gone, min_survivors=9)
    assert isinstance(outcome.result, Aborted)
    assert "8 clients left after advertise_keys, fewer than the 9 needed" in outcome.result.reason


def test_a_tampered_share_is_detected_and_its_receiver_drops() -> None:
    contributions = _contributions(10)
    outcome = run_loopback_round(contributions, degree=9, tamper=["client-003"])
    result = _finished(outcome.result).result
    # the receiver of the corrupted share refused it and left; it was recovered as dropped
    assert len(result.contributors) == 9
    assert result.dropped["masked_input"] == 1
    expected = _plaintext_sum(contributions, result.contributors)
    assert np.max(np.abs(result.decoded.weighted_sum - _as_weighted(expected))) < 1e-3


def _as_weighted(values: np.ndarray) -> np.ndarray:
    return values * QUANTIZATION.max_weight / 10_000  # the loopback's default max_weight


def test_single_client_and_empty_update() -> None:
    one = _contributions(1, length=4)
    result = _finished(run_loopback_round(one, degree=1).result).result
    assert result.contributors == ("client-000",)
    empty = _contributions(3, length=0)
    result = _finished(run_loopback_round(empty, degree=2).result).result
    assert result.decoded.weighted_sum.size == 0


@pytest.mark.parametrize(("degree", "nodes", "threshold"), [(7, 20, 5), (19, 20, 11), (1, 1, 1)])
def test_reconstruction_threshold(degree: int, nodes: int, threshold: int) -> None:
    assert reconstruction_threshold(degree=degree, num_nodes=nodes) == threshold


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_clients_that_vanish_before_signing_the_survivor_set_are_still_summed(
    fraction: float,
) -> None:
    """Their masked inputs are in the sum; the others' shares remove all of their masks."""
    contributions = _contributions(20)
    clients = sorted(contributions)
    gone = np.random.default_rng(4).choice(clients, size=int(fraction * 20), replace=False)
    outcome = run_loopback_round(
        contributions,
        degree=19,
        quantization=QUANTIZATION,
        dropouts=dict.fromkeys(gone, Stage.CONSISTENCY),
        deadlines=DEADLINES,
    )
    result = _finished(outcome.result).result
    assert list(result.contributors) == clients
    expected = _plaintext_sum(contributions, result.contributors)
    assert np.max(np.abs(result.decoded.weighted_sum - expected)) <= QUANTIZATION.error_bound(20)
    assert result.dropped["consistency"] == len(gone)
    closed = outcome.closed_at["consistency"]
    assert closed >= DEADLINES.of(Stage.CONSISTENCY) if len(gone) else closed < 1
