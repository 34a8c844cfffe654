"""Homomorphic rounds in the engine: ciphertexts summed, a separate key holder decrypts."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.coordinator import (
    ClientFailed,
    CommitVersion,
    Coordinator,
    DeadlineReached,
    DropFallback,
    Phase,
    RejectReason,
    RejectSubmission,
    RoundClosed,
    RoundSettings,
    RoundSummary,
    SecureMessageReceived,
    SendFitTask,
    StartRound,
)
from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.coordinator.events import AggregateDecrypted, RequestDecryption
from shoal.coordinator.schedule import schedule
from shoal.coordinator.secure import SecureSettings
from shoal.coordinator.state import RoundState
from shoal.core import Parameters, SecurityError
from shoal.secure.ckks import EncryptedVector, decrypt_vector, sum_encrypted
from shoal.secure.homomorphic import EncryptedUpdate, EncryptionRequest, seal_contribution
from shoal.secure.keyholder import KeyHolder
from shoal.secure.quantization import Quantization
from shoal.tasks import TaskOffer
from shoal.transport.signing import generate_client_key
from support.driving import closing

SIZE = 20
SILOS = [f"bank-{i}" for i in range(5)]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyHolder, dict[str, bytes]]:
    keys = {silo: generate_client_key() for silo in SILOS}
    holder = KeyHolder.init(
        tmp_path_factory.mktemp("kh") / "holder",
        min_contributors=3,
        silos={silo: public for silo, (_, public) in keys.items()},
        decryption_noise_std=0.0,
    )
    return holder, {silo: private for silo, (private, _) in keys.items()}


def make(holder: KeyHolder, *, quorum: float = 0.6) -> Coordinator:
    secure = SecureSettings(
        run_id="banks",
        quantization=Quantization(),
        protocol="ckks",
        public_context=holder.public_context(),
        silo_keys=holder.silos,
        min_contributors=3,
    )
    return Coordinator(
        settings=RoundSettings(
            clients_per_round=5, over_selection=1.0, quorum=quorum, deadline_s=60.0
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=1,
        secure=secure,
    )


def updates() -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(4)
    return {
        s: (rng.uniform(-1, 1, SIZE).astype(np.float32), int(rng.integers(100, 900))) for s in SILOS
    }


def contribution(
    holder: KeyHolder,
    signing: dict[str, bytes],
    silo: str,
    request: EncryptionRequest,
    update: np.ndarray,
    examples: int,
    *,
    uniform_weight: bool = False,
) -> EncryptedUpdate:
    return seal_contribution(
        holder.public_context(),
        signing[silo],
        update,
        silo_id=silo,
        request=request,
        num_examples=examples,
        loss=0.3,
        uniform_weight=uniform_weight,
    )


def test_the_coordinator_adds_ciphertexts_and_the_key_holder_decrypts_the_sum(
    consortium: tuple[KeyHolder, dict[str, bytes]],
) -> None:
    holder, signing = consortium
    coordinator = make(holder)
    actions = coordinator.handle(StartRound(1, Phase.FIT, 0.0, tuple(SILOS)))
    tasks = [a for a in actions if isinstance(a, SendFitTask)]
    assert len(tasks) == 5 and all(isinstance(t.secure, EncryptionRequest) for t in tasks)
    data = updates()
    request = tasks[0].secure
    assert isinstance(request, EncryptionRequest)
    decryption = None
    for silo in SILOS:
        out = coordinator.handle(
            SecureMessageReceived(
                silo, 1, 1.0, contribution(holder, signing, silo, request, *data[silo])
            )
        )
        assert not any(isinstance(a, RejectSubmission) for a in out)
        decryption = next((a for a in out if isinstance(a, RequestDecryption)), decryption)
    assert decryption is not None and len(decryption.receipts) == 5
    # the coordinator holds only the public context: it cannot read the sum it made
    with pytest.raises(SecurityError):
        decrypt_vector(holder.public_context(), decryption.aggregate)
    total = holder.decrypt_aggregate(
        run_id="banks", round=1, aggregate=decryption.aggregate, receipts=decryption.receipts
    )
    closed = coordinator.handle(AggregateDecrypted(1, 2.0, total))
    summary = next(a for a in closed if isinstance(a, RoundClosed)).summary
    assert summary.committed and summary.secure is not None
    assert summary.secure.protocol == "ckks"
    weights = np.array([n for _, n in data.values()], float)
    expected = (weights[:, None] * np.stack([u for u, _ in data.values()])).sum(0) / weights.sum()
    assert np.max(np.abs(coordinator.parameters.vector - expected)) < 1e-5
    assert summary.num_examples == int(weights.sum())
    assert summary.loss == pytest.approx(0.3, abs=1e-6)


def test_tampered_and_foreign_contributions_are_rejected(
    consortium: tuple[KeyHolder, dict[str, bytes]],
) -> None:
    holder, signing = consortium
    coordinator = make(holder)
    actions = coordinator.handle(StartRound(2, Phase.FIT, 0.0, tuple(SILOS)))
    request = next(a.secure for a in actions if isinstance(a, SendFitTask))
    assert isinstance(request, EncryptionRequest)
    update, examples = updates()["bank-0"]
    genuine = contribution(holder, signing, "bank-0", request, update, examples)
    chunk = bytearray(genuine.ciphertext.chunks[0])
    chunk[-10] ^= 1
    altered = EncryptedVector(
        genuine.ciphertext.length, (bytes(chunk), *genuine.ciphertext.chunks[1:])
    )
    tampered = EncryptedUpdate(2, altered, genuine.receipt)
    out = coordinator.handle(SecureMessageReceived("bank-0", 2, 1.0, tampered))
    assert isinstance(out[0], RejectSubmission)
    assert out[0].reason is RejectReason.INVALID_UPDATE and "does not match" in out[0].detail
    as_other = coordinator.handle(SecureMessageReceived("bank-1", 2, 1.0, genuine))
    assert isinstance(as_other[0], RejectSubmission) and "signed as" in as_other[0].detail
    old = EncryptedUpdate(1, genuine.ciphertext, genuine.receipt)
    stale = coordinator.handle(SecureMessageReceived("bank-0", 2, 1.0, old))
    assert isinstance(stale[0], RejectSubmission) and stale[0].reason is RejectReason.LATE
    assert coordinator.handle(SecureMessageReceived("bank-0", 2, 1.0, genuine)) == []


def test_too_few_contributions_abort_and_keep_the_model(
    consortium: tuple[KeyHolder, dict[str, bytes]],
) -> None:
    holder, signing = consortium
    coordinator = make(holder, quorum=0.2)
    actions = coordinator.handle(StartRound(3, Phase.FIT, 0.0, tuple(SILOS)))
    request = next(a.secure for a in actions if isinstance(a, SendFitTask))
    assert isinstance(request, EncryptionRequest)
    for silo in SILOS[:2]:
        coordinator.handle(
            SecureMessageReceived(
                silo, 3, 1.0, contribution(holder, signing, silo, request, *updates()[silo])
            )
        )
    closed = coordinator.handle(DeadlineReached(3, 60.0))
    summary = next(a for a in closed if isinstance(a, RoundClosed)).summary
    assert not summary.committed
    assert summary.abort_reason is not None and "needs 3" in summary.abort_reason
    assert np.array_equal(coordinator.parameters.vector, np.zeros(SIZE, np.float32))


def test_a_ckks_round_that_lost_most_silos_aborts_at_once(
    consortium: tuple[KeyHolder, dict[str, bytes]],
) -> None:
    """The consortium is fixed when the round starts: no replacement, and no waiting in vain."""
    holder, _ = consortium
    coordinator = make(holder)  # reselect, the default: the quorum of 3 is out of reach
    coordinator.handle(StartRound(4, Phase.FIT, 0.0, tuple(SILOS)))
    assert coordinator.handle(ClientFailed("bank-0", 4, 1.0, "outage")) == []
    assert coordinator.handle(ClientFailed("bank-1", 4, 1.0, "outage")) == []
    actions = coordinator.handle(ClientFailed("bank-2", 4, 2.0, "outage"))
    assert not any(isinstance(a, SendFitTask) for a in actions)
    summary = next(a for a in actions if isinstance(a, RoundClosed)).summary
    assert not summary.committed and summary.closed_at == 2.0
    assert summary.fallback is not None
    assert (summary.fallback.kind, summary.fallback.configured) == ("abort", "reselect")
    assert np.array_equal(coordinator.parameters.vector, np.zeros(SIZE, np.float32))


def test_a_ckks_round_that_can_still_finish_goes_on_without_replacements(
    consortium: tuple[KeyHolder, dict[str, bytes]],
) -> None:
    holder, signing = consortium
    coordinator = make(holder)
    coordinator.settings = replace(coordinator.settings, fallback=DropFallback(at=0.2))
    actions = coordinator.handle(StartRound(5, Phase.FIT, 0.0, tuple(SILOS)))
    request = next(a.secure for a in actions if isinstance(a, SendFitTask))
    assert isinstance(request, EncryptionRequest)
    for silo in SILOS[:2]:
        assert coordinator.handle(ClientFailed(silo, 5, 1.0, "outage")) == []  # 2 of 5 > 20%
    decryption = None
    for silo in SILOS[2:]:
        sealed = contribution(holder, signing, silo, request, *updates()[silo])
        out = coordinator.handle(SecureMessageReceived(silo, 5, 2.0, sealed))
        decryption = next((a for a in out if isinstance(a, RequestDecryption)), decryption)
    assert decryption is not None and len(decryption.receipts) == 3
    total = holder.decrypt_aggregate(
        run_id="banks", round=5, aggregate=decryption.aggregate, receipts=decryption.receipts
    )
    closed = coordinator.handle(AggregateDecrypted(5, 3.0, total))
    summary = next(a for a in closed if isinstance(a, RoundClosed)).summary
    assert summary.committed and summary.fallback is not None
    assert (summary.fallback.kind, summary.fallback.dropped) == ("none", 2)


def test_a_key_holder_refusal_aborts_the_round(
    consortium: tuple[KeyHolder, dict[str, bytes]],
) -> None:
    holder, signing = consortium
    coordinator = make(holder)
    actions = coordinator.handle(StartRound(4, Phase.FIT, 0.0, tuple(SILOS)))
    request = next(a.secure for a in actions if isinstance(a, SendFitTask))
    assert isinstance(request, EncryptionRequest)
    for silo in SILOS:
        coordinator.handle(
            SecureMessageReceived(
                silo, 4, 1.0, contribution(holder, signing, silo, request, *updates()[silo])
            )
        )
    closed = coordinator.handle(AggregateDecrypted(4, 2.0, None, "already decrypted"))
    summary = next(a for a in closed if isinstance(a, RoundClosed)).summary
    assert not summary.committed
    assert summary.abort_reason == (
        "secure aggregation aborted: the key holder refused to decrypt: already decrypted"
    )
    assert coordinator.handle(AggregateDecrypted(4, 3.0, None, "again")) == []


def test_examples_cross_silo_banks_runs(tmp_path: Path) -> None:
    from shoal.config import load_config
    from shoal.simulation.runner import Simulation

    example = Path(__file__).resolve().parents[2] / "examples" / "cross-silo-banks.toml"
    config = load_config(example, ["run.rounds=3", "simulation.workers=0"])
    summary = Simulation(config, tmp_path / "banks").run()
    assert summary["secure_aggregation"] == "ckks"
    assert summary["rounds_completed"] == 3
    assert summary["final_accuracy"] > 0.8
    assert (tmp_path / "banks" / "key-holder" / "secret.context").stat().st_mode & 0o077 == 0


def test_under_user_level_dp_every_silo_weighs_one(
    consortium: tuple[KeyHolder, dict[str, bytes]],
) -> None:
    # DP-FedAvg's noise is calibrated for a sum of clipped updates: a silo's example count
    # must not scale its update inside the ciphertext, or its sensitivity grows with it
    holder, signing = consortium
    request = EncryptionRequest(1, "banks-dp", "0" * 64)
    data = updates()
    sealed = [
        contribution(holder, signing, silo, request, update, examples, uniform_weight=True)
        for silo, (update, examples) in data.items()
    ]
    total = holder.decrypt_aggregate(
        run_id="banks-dp",
        round=1,
        aggregate=sum_encrypted(holder.public_context(), [s.ciphertext for s in sealed]),
        receipts=[s.receipt for s in sealed],
    )
    assert total[-2] == pytest.approx(len(SILOS), abs=1e-4)  # the total weight: one per silo
    expected = np.stack([update for update, _ in data.values()]).sum(0)
    assert np.max(np.abs(total[:SIZE] - expected)) < 1e-4


def test_a_key_holder_that_fails_in_any_way_aborts_the_round_and_the_run_goes_on(
    consortium: tuple[KeyHolder, dict[str, bytes]],
) -> None:
    holder, signing = consortium
    asked: list[int] = []
    closed: list[RoundSummary] = []

    async def decrypt(action: RequestDecryption) -> np.ndarray:
        asked.append(action.round)
        raise RuntimeError("the key holder's reply could not be read")

    async def persist(commit: CommitVersion) -> None:
        raise AssertionError(f"round {commit.round} committed without a decrypted sum")

    async def silo(driver: RoundDriver, name: str) -> None:
        while driver.coordinator.state is not RoundState.FINISHED:
            offer = driver.check_in(name)
            if isinstance(offer, TaskOffer) and isinstance(offer.secure, EncryptionRequest):
                update, examples = updates()[name]
                sealed = contribution(holder, signing, name, offer.secure, update, examples)
                assert driver.submit_secure(name, offer.round, sealed) is None
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        driver = RoundDriver(
            make(holder),
            DriverSettings(retry_after_s=0.01),
            plays=schedule(rounds=2),
            candidates=lambda: SILOS,
            on_closed=closing(persist, closed.append),
            decrypt=decrypt,
        )
        silos = [asyncio.create_task(silo(driver, name)) for name in SILOS]
        await asyncio.wait_for(driver.run(), timeout=30)
        await asyncio.gather(*silos)

    asyncio.run(scenario())
    assert asked == [1, 2]
    assert [(summary.round, summary.committed) for summary in closed] == [(1, False), (2, False)]
    assert all("could not be read" in (summary.abort_reason or "") for summary in closed)
