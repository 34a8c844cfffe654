"""The live driver: rounds over the asyncio clock with clients that pull work and push results."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.coordinator import CommitVersion, Coordinator, Phase, RejectReason, RoundSettings
from shoal.coordinator.driver import SECURE_STAGE_RETRY_S, DriverSettings, RoundDriver
from shoal.coordinator.schedule import schedule
from shoal.coordinator.secure import SecureSettings
from shoal.coordinator.state import RoundState
from shoal.core import ConfigError, Parameters
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.messages import AdvertiseKeysRequest, ShareKeysRequest
from shoal.secure.quantization import Quantization
from shoal.tasks import RetryLater, RunFinished, SecureOffer, TaskOffer
from support.driving import closing

SIZE = 3


def make_driver(
    *,
    clients: int,
    rounds: int,
    deadline_s: float = 5.0,
    evaluate_every: int = 0,
    before_round: Callable[[int], str | None] | None = None,
) -> tuple[RoundDriver, list[CommitVersion], list[str]]:
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=4, quorum=0.5, deadline_s=deadline_s, evaluation_clients=2
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=1,
    )
    persisted: list[CommitVersion] = []
    seen: list[str] = []

    async def persist(commit: CommitVersion) -> None:
        await asyncio.sleep(0)
        persisted.append(commit)

    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=0.05),
        plays=schedule(
            rounds=rounds,
            evaluate_every=evaluate_every,
            stops_before=None if before_round is None else lambda r: before_round(r) is not None,
        ),
        candidates=lambda: sorted(set(seen)),
        on_closed=closing(persist),
    )
    return driver, persisted, seen


async def client(
    driver: RoundDriver, seen: list[str], client_id: str, *, value: float, stall: bool = False
) -> int:
    """A well-behaved client: checks in, trains (adds ``value``), submits; returns tasks done."""
    done = 0
    while True:
        seen.append(client_id)
        answer = driver.check_in(client_id)
        if isinstance(answer, RunFinished):
            return done
        if isinstance(answer, RetryLater):
            await asyncio.sleep(0.01)
            continue
        assert isinstance(answer, TaskOffer) and answer.deadline_in_s > 0
        if stall:
            await asyncio.sleep(10)  # never answers in time
            continue
        if answer.phase is Phase.FIT:
            rejection = driver.submit_update(
                client_id, answer.round, np.full(SIZE, value, np.float32), 10, {"loss": 1.0}
            )
        else:
            rejection = driver.submit_evaluation(client_id, answer.round, 0.5, 5, {"accuracy": 1.0})
        assert rejection is None
        done += 1


async def run_federation(
    driver: RoundDriver, seen: list[str], clients: list[tuple[str, float, bool]]
) -> None:
    tasks = [
        asyncio.create_task(client(driver, seen, name, value=value, stall=stall))
        for name, value, stall in clients
    ]
    await asyncio.wait_for(driver.run(), timeout=30)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_rounds_complete_and_every_commit_is_persisted_in_order() -> None:
    driver, persisted, seen = make_driver(clients=6, rounds=3, evaluate_every=2)
    federation = [(f"c{index}", 1.0, False) for index in range(6)]
    asyncio.run(run_federation(driver, seen, federation))
    assert [commit.round for commit in persisted] == [1, 2, 3]
    np.testing.assert_allclose(driver.coordinator.parameters.vector, 3.0)
    assert driver.coordinator.state.value == "finished"


def test_stalled_clients_are_cut_off_by_the_deadline() -> None:
    driver, persisted, seen = make_driver(clients=6, rounds=2, deadline_s=0.3)
    federation = [(f"c{index}", 2.0, index >= 3) for index in range(6)]  # half never answer
    asyncio.run(run_federation(driver, seen, federation))
    assert [commit.round for commit in persisted] == [1, 2]
    assert all(commit.summary.reported <= 3 for commit in persisted)


def test_late_and_unknown_submissions_are_rejected() -> None:
    async def scenario() -> None:
        driver, _, seen = make_driver(clients=4, rounds=1)
        seen.extend(["a", "b", "c", "d"])
        runner = asyncio.create_task(driver.run())
        await asyncio.sleep(0.01)
        stranger = driver.submit_update("zz", 1, np.zeros(SIZE, np.float32), 1, {})
        assert stranger is not None and stranger.reason is RejectReason.NOT_SELECTED
        for name in "abcd":
            answer = driver.check_in(name)
            if isinstance(answer, TaskOffer):
                driver.submit_update(name, 1, np.ones(SIZE, np.float32), 1, {})
        await asyncio.wait_for(runner, timeout=5)
        late = driver.submit_update("a", 1, np.ones(SIZE, np.float32), 1, {})
        assert late is not None and late.reason is RejectReason.LATE

    asyncio.run(scenario())


def test_a_failure_counts_only_in_its_own_round() -> None:
    async def scenario() -> None:
        driver, persisted, seen = make_driver(clients=4, rounds=1)
        seen.extend(["a", "b", "c", "d"])
        runner = asyncio.create_task(driver.run())
        await asyncio.sleep(0.01)
        offered = [name for name in "abcd" if isinstance(driver.check_in(name), TaskOffer)]
        failing, *others = offered
        refused = driver.report_failure(failing, 7, "a crash in some other round")
        assert refused is not None and refused.reason is RejectReason.WRONG_ROUND
        refused = driver.report_failure("zz", 1, "not even selected")
        assert refused is not None and refused.reason is RejectReason.NOT_SELECTED
        assert isinstance(driver.check_in(failing), TaskOffer)  # its task stands
        for name in others:
            driver.submit_update(name, 1, np.ones(SIZE, np.float32), 1, {})
        assert driver.report_failure(failing, 1, "out of memory") is None
        assert isinstance(driver.check_in(failing), RetryLater)
        await asyncio.wait_for(runner, timeout=5)
        late = driver.report_failure(failing, 1, "after the end")
        assert late is not None and late.reason is RejectReason.LATE
        (commit,) = persisted
        assert (commit.summary.failed, commit.summary.outstanding) == (1, 0)
        assert commit.summary.rejected == {"not_selected": 1, "wrong_round": 1}

    asyncio.run(scenario())


def test_a_late_result_keeps_the_offer_of_the_round_now_open() -> None:
    """Before the fix, a result of a closed round withdrew its sender's task of the next one."""

    async def scenario() -> None:
        driver, persisted, seen = make_driver(clients=4, rounds=2, deadline_s=0.2)
        seen.extend(["a", "b", "c", "d"])
        runner = asyncio.create_task(driver.run())
        await asyncio.sleep(0.01)
        assert isinstance(driver.check_in("d"), TaskOffer)  # d takes round 1's task, and stalls
        for name in "abc":
            assert isinstance(driver.check_in(name), TaskOffer)
            driver.submit_update(name, 1, np.ones(SIZE, np.float32), 1, {})
        while not isinstance(offer := driver.check_in("d"), TaskOffer) or offer.round != 2:
            await asyncio.sleep(0.01)  # round 1 closes at its deadline, round 2 offers d a task
        late = driver.submit_update("d", 1, np.ones(SIZE, np.float32), 1, {})
        assert late is not None and late.reason is RejectReason.LATE
        answer = driver.check_in("d")
        assert isinstance(answer, TaskOffer) and answer.round == 2  # its task of round 2 stands
        for name in "abcd":
            assert driver.submit_update(name, 2, np.ones(SIZE, np.float32), 1, {}) is None
        await asyncio.wait_for(runner, timeout=5)
        assert [commit.summary.reported for commit in persisted] == [3, 4]

    asyncio.run(scenario())


def test_a_reason_before_a_fit_round_stops_training_and_finishes_the_run() -> None:
    asked: list[int] = []
    reason = "round 3 would spend too much"

    def before_round(round_number: int) -> str | None:
        asked.append(round_number)
        return reason if round_number >= 3 else None

    driver, persisted, seen = make_driver(
        clients=6, rounds=5, evaluate_every=2, before_round=before_round
    )
    federation = [(f"c{index}", 1.0, False) for index in range(6)]
    asyncio.run(run_federation(driver, seen, federation))
    assert asked == [1, 2, 3]  # once per fit round, never for an evaluation
    assert [commit.round for commit in persisted] == [1, 2]
    assert driver.coordinator.state is RoundState.FINISHED
    assert isinstance(driver.check_in("c0"), RunFinished)


def test_a_refused_first_round_finishes_at_once_without_waiting_for_clients() -> None:
    driver, persisted, _ = make_driver(clients=0, rounds=3, before_round=lambda _: "locked")
    asyncio.run(asyncio.wait_for(driver.run(), timeout=5))  # no client ever checks in
    assert persisted == []
    assert driver.finished is not None
    assert driver.coordinator.state is RoundState.FINISHED


def test_without_a_reason_every_round_is_played() -> None:
    driver, persisted, seen = make_driver(clients=4, rounds=2, before_round=lambda _: None)
    asyncio.run(run_federation(driver, seen, [(f"c{index}", 1.0, False) for index in range(4)]))
    assert [commit.round for commit in persisted] == [1, 2]


# --- secure rounds: stages as offers, a timer per stage, fast retries between stages ---------


def make_secure_driver(
    *, clients_per_round: int, advertise_keys_s: float = 30.0
) -> tuple[RoundDriver, list[CommitVersion], list[str]]:
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=clients_per_round, over_selection=1.0, quorum=0.5, deadline_s=5.0
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=1,
        secure=SecureSettings(
            run_id="run", quantization=Quantization(clip=1.0), advertise_keys_s=advertise_keys_s
        ),
    )
    persisted: list[CommitVersion] = []
    seen: list[str] = []

    async def persist(commit: CommitVersion) -> None:
        persisted.append(commit)

    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=1.0),
        plays=schedule(rounds=1),
        candidates=lambda: sorted(set(seen)) if len(set(seen)) >= 5 else [],
        on_closed=closing(persist),
        identities=lambda clients: {c: IDENTITIES[c].public for c in clients},
    )
    return driver, persisted, seen


IDENTITIES = {f"c{i}": IdentityKey.generate() for i in range(5)}


async def secure_client(
    driver: RoundDriver, seen: list[str], client_id: str, *, silent: bool = False
) -> list[float]:
    """Answers every stage with a real SecAggClient; returns the retry delays of its round."""
    session: SecAggClient | None = None
    delays: list[float] = []
    while driver.coordinator.state is not RoundState.FINISHED:
        seen.append(client_id)
        answer = driver.check_in(client_id)
        if isinstance(answer, RetryLater) or silent:
            if isinstance(answer, RetryLater) and driver.coordinator.state is RoundState.COLLECTING:
                delays.append(answer.seconds)
            await asyncio.sleep(0.01)
            continue
        assert answer.deadline_in_s > 0
        if isinstance(answer, SecureOffer):
            if isinstance(answer.request, AdvertiseKeysRequest):
                session = SecAggClient(round=answer.round, identity=IDENTITIES[client_id])
            assert session is not None
            reply = session.handle(answer.request)
        else:
            assert answer.secure is not None and session is not None  # never a plain fit
            contribution = Contribution(np.full(SIZE, 0.5, np.float32), 10)
            reply = session.handle(answer.secure, contribution)
        assert driver.submit_secure(client_id, answer.round, reply) is None
    return delays


def test_a_secure_round_runs_stage_by_stage_with_fast_retries_between_stages() -> None:
    async def scenario() -> tuple[list[list[float]], list[CommitVersion]]:
        driver, persisted, seen = make_secure_driver(clients_per_round=4)
        tasks = [asyncio.create_task(secure_client(driver, seen, f"c{i}")) for i in range(5)]
        await asyncio.wait_for(driver.run(), timeout=30)
        return list(await asyncio.gather(*tasks)), persisted

    delays, persisted = asyncio.run(scenario())
    assert [commit.round for commit in persisted] == [1]
    np.testing.assert_allclose(persisted[0].parameters.vector, 0.5, atol=1e-4)
    in_cohort = [d for d in delays if d and set(d) == {SECURE_STAGE_RETRY_S}]
    outside = [d for d in delays if d and set(d) == {1.0}]
    assert len(in_cohort) == 4 and len(outside) == 1  # one of five is not selected


def test_a_stage_closes_at_its_own_deadline_without_a_silent_client() -> None:
    async def scenario() -> tuple[list[float], list[CommitVersion]]:
        driver, persisted, seen = make_secure_driver(clients_per_round=5, advertise_keys_s=0.2)
        tasks = [
            asyncio.create_task(secure_client(driver, seen, f"c{i}", silent=i == 0))
            for i in range(5)
        ]
        await asyncio.wait_for(driver.run(), timeout=30)
        delays = await asyncio.gather(*tasks)
        return delays[0], persisted

    silent_delays, persisted = asyncio.run(scenario())
    report = persisted[0].summary.secure
    assert report is not None and report.dropped["advertise_keys"] == 1
    assert persisted[0].summary.reported == 4
    # once its stage closed, the silent client's offer expired and it is not hurried back
    assert silent_delays and set(silent_delays) == {1.0}


def test_a_reply_withdraws_its_offer_first_and_a_repeated_one_keeps_the_next() -> None:
    async def scenario() -> None:
        driver, _, seen = make_secure_driver(clients_per_round=5)
        names = [f"c{i}" for i in range(5)]
        seen.extend(names)
        runner = asyncio.create_task(driver.run())
        while not isinstance(driver.check_in("c0"), SecureOffer):
            await asyncio.sleep(0.01)
        sessions = {name: SecAggClient(round=1, identity=IDENTITIES[name]) for name in names}
        replies = {}
        for name in names:
            offer = driver.check_in(name)
            assert isinstance(offer, SecureOffer)
            replies[name] = sessions[name].handle(offer.request)
        for name in names[:-1]:
            assert driver.submit_secure(name, 1, replies[name]) is None
            retry = driver.check_in(name)
            assert isinstance(retry, RetryLater) and retry.seconds == SECURE_STAGE_RETRY_S
        last = names[-1]
        assert driver.submit_secure(last, 1, replies[last]) is None  # closes the stage
        following = driver.check_in(last)
        assert isinstance(following, SecureOffer)
        assert isinstance(following.request, ShareKeysRequest)
        again = driver.submit_secure(last, 1, replies[last])  # a retried upload
        assert again is not None and again.reason is RejectReason.LATE
        kept = driver.check_in(last)
        assert isinstance(kept, SecureOffer) and kept.request == following.request
        stale = driver.submit_secure(last, 0, replies[last])
        assert stale is not None and stale.reason is RejectReason.LATE
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(scenario())


def test_the_driver_refuses_a_homomorphic_job_without_a_key_holder() -> None:
    coordinator = Coordinator(
        settings=RoundSettings(clients_per_round=2),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=1,
        secure=SecureSettings(run_id="r", quantization=Quantization(), protocol="ckks"),
    )

    async def persist(commit: CommitVersion) -> None:
        del commit

    with pytest.raises(ConfigError, match="key holder"):
        RoundDriver(
            coordinator,
            DriverSettings(),
            plays=schedule(rounds=1),
            candidates=list,
            on_closed=closing(persist),
        )


def test_the_driver_refuses_a_secagg_job_without_the_clients_identity_keys() -> None:
    coordinator = Coordinator(
        settings=RoundSettings(clients_per_round=2),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=1,
        secure=SecureSettings(run_id="r", quantization=Quantization()),
    )
    with pytest.raises(ConfigError, match="identity keys"):
        RoundDriver(coordinator, DriverSettings(), plays=schedule(rounds=1), candidates=list)
