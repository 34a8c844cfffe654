"""The client runtime end to end over the in-process transport: real clients, real driver."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from dataclasses import replace
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.apps.builtin import DataScenario
from shoal.client import runtime as runtime_module
from shoal.client.api import Client, FitConfig, FitResult
from shoal.client.app import ClientApp, ClientContext
from shoal.client.link import (
    CheckIn,
    Enroll,
    Enrollment,
    FetchModel,
    ReportFailure,
    Request,
    SubmitEvaluation,
    SubmitSecure,
    SubmitUpdate,
)
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.coordinator import CommitVersion, Coordinator, Phase, RoundSettings
from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.coordinator.inprocess import InProcessLink
from shoal.coordinator.schedule import schedule
from shoal.coordinator.secure import SecureSettings
from shoal.core import ConfigError, DeviceState, Parameters, TransportError
from shoal.secure.client import SecAggClient
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    Advertisement,
    ClientMessage,
    ConsistencyRequest,
    MaskedInputRequest,
    PeerKeys,
    PublicKeys,
    SessionConfig,
    ShareKeysRequest,
    SurvivorsSigned,
    UnmaskRequest,
)
from shoal.secure.quantization import Quantization
from shoal.tasks import Offer, RetryLater, SecureOffer, TaskOffer
from shoal.transport.signing import generate_client_key
from support.driving import closing
from support.jobs import bare_config
from support.virtual_time import run_in_virtual_time

CLIENTS = 8
T = TypeVar("T")


class Exploding(Client):
    """A client whose model fails on every fit."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        raise MemoryError("device out of memory")

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        return self.inner.evaluate(parameters, config)


async def federate(
    tmp_path: Path, *, rounds: int, failure_rate: float, exploding: int = 0, secure: bool = False
) -> tuple[list[CommitVersion], float]:
    scenario = DataScenario(
        bare_config([f"data.num_clients={CLIENTS}", "round.clients_per_round=4"])
    )
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=4, quorum=0.5, deadline_s=5.0, epochs=2, learning_rate=0.2
        ),
        strategy=make_strategy("fedavg"),
        parameters=scenario.initial_parameters(),
        seed=0,
        secure=SecureSettings(run_id="run", quantization=Quantization()) if secure else None,
    )
    commits: list[CommitVersion] = []
    models = {coordinator.parameters.sha256(): coordinator.parameters}

    async def persist(commit: CommitVersion) -> None:
        commits.append(commit)
        models[commit.parameters.sha256()] = commit.parameters

    link_ids: dict[str, bytes] = {}  # enrolled ids and their public keys
    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=0.02),
        plays=schedule(rounds=rounds),
        candidates=lambda: sorted(link_ids),
        on_closed=closing(persist),
        identities=lambda ids: {i: link_ids[i] for i in ids},
    )
    kind = NoPlaintextLink if secure else InProcessLink
    link = kind(driver, models.__getitem__, failure_rate=failure_rate, rng=random.Random(1))
    runtimes = []
    for index, client_id in enumerate(scenario.client_ids):
        enrollment = load_or_create_enrollment(tmp_path / client_id, generate_client_key)
        link_ids[enrollment.client_id] = enrollment.public_key
        client = scenario.build_client(client_id)
        if index < exploding:
            client = Exploding(client)
        runtimes.append(
            ClientRuntime(client, link, enrollment, backoff=Backoff(0.001, 0.01), seed=index)
        )
    tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
    await asyncio.wait_for(driver.run(), timeout=60)
    for runtime in runtimes:
        runtime.stop()
    await asyncio.gather(*tasks)
    _, accuracy = scenario.evaluate_centrally(coordinator.parameters)
    return commits, accuracy


def test_clients_train_the_global_model(tmp_path: Path) -> None:
    commits, accuracy = asyncio.run(federate(tmp_path, rounds=4, failure_rate=0.0))
    assert [commit.round for commit in commits] == [1, 2, 3, 4]
    assert accuracy > 0.35  # from 10% (the zero model); live arrival order varies the path


def test_network_errors_are_retried_not_fatal(tmp_path: Path) -> None:
    commits, _ = asyncio.run(federate(tmp_path, rounds=3, failure_rate=0.3))
    assert [commit.round for commit in commits] == [1, 2, 3]


def test_a_failing_model_is_reported_and_the_rounds_go_on(tmp_path: Path) -> None:
    commits, _ = asyncio.run(federate(tmp_path, rounds=3, failure_rate=0.0, exploding=3))
    assert [commit.round for commit in commits] == [1, 2, 3]


class NoPlaintextLink(InProcessLink):
    """The in-process link of a secure round: a plaintext update must never reach it."""

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        if isinstance(request, SubmitUpdate):
            raise AssertionError("a plaintext update left the client in a secure round")
        return await super().handle(enrollment, request)


def test_clients_train_under_secure_aggregation(tmp_path: Path) -> None:
    commits, accuracy = asyncio.run(federate(tmp_path, rounds=2, failure_rate=0.2, secure=True))
    assert [commit.round for commit in commits] == [1, 2]
    assert all(commit.summary.secure is not None for commit in commits)
    assert accuracy > 0.2


class Untouchable(Client):
    """A client the runtime must never train or evaluate."""

    def get_parameters(self) -> Parameters:
        raise AssertionError("not expected")

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        raise AssertionError("not expected")

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        raise AssertionError("not expected")


class ScriptedLink:
    """Offers a scripted list of tasks, then stops the runtime; records what the runtime sends."""

    def __init__(self, offers: list[Offer]) -> None:
        self.offers = offers
        self.runtime: ClientRuntime | None = None
        self.failures: list[tuple[int, str]] = []
        self.secure_sent: list[ClientMessage] = []
        self.fetched = 0

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        answer: object = None
        match request:
            case CheckIn() if self.offers:
                answer = self.offers.pop(0)
            case CheckIn():
                assert self.runtime is not None
                self.runtime.stop()
                answer = RetryLater(1.0, "the script is over")
            case FetchModel():
                self.fetched += 1
                answer = Parameters.from_arrays([np.zeros(3, np.float32)])
            case SubmitUpdate():
                raise AssertionError("a plaintext update left the client in a secure round")
            case SubmitEvaluation():
                raise AssertionError("not expected")
            case SubmitSecure():
                self.secure_sent.append(request.message)  # type: ignore[arg-type]
            case ReportFailure():
                self.failures.append((request.offer.round, request.reason))
        return cast(T, answer)


def test_stale_or_tampered_secure_requests_are_reported_and_the_runtime_goes_on(
    tmp_path: Path,
) -> None:
    session = SessionConfig("run", 4, 3, 3, 2, Quantization(clip=1.0).fitted(3))
    signed = Advertisement(PublicKeys(cipher=b"c" * 32, mask=b"m" * 32), bytes(32), bytes(64))
    keys = PeerKeys(bytes(32), signed)
    masked = MaskedInputRequest(3, {}, {})
    link = ScriptedLink(
        [
            SecureOffer(3, ShareKeysRequest(3, {2: keys}), 1.0),  # no session of round 3 here
            TaskOffer(3, Phase.FIT, FitConfig(round=3), "a" * 64, 1.0, masked),
            SecureOffer(4, AdvertiseKeysRequest(4, session, 1, frozenset({2, 3})), 1.0),
            SecureOffer(4, ShareKeysRequest(4, {2: keys, 9: keys}), 1.0),  # 9 is no neighbour
            SecureOffer(4, UnmaskRequest(4, {}), 1.0),  # out of order
        ]
    )
    enrollment = load_or_create_enrollment(tmp_path, generate_client_key)
    link.runtime = ClientRuntime(Untouchable(), link, enrollment, seed=0)  # type: ignore[arg-type]
    asyncio.run(link.runtime.run())
    assert [type(message).__name__ for message in link.secure_sent] == ["KeysAdvertised"]
    assert [round_number for round_number, _ in link.failures] == [3, 3, 4, 4]
    assert "not in that round's secure session" in link.failures[1][1]
    assert "not my neighbours" in link.failures[2][1]
    assert link.fetched == 0  # a masked-input task it cannot answer is not even trained
    assert link.runtime.tasks_done == 0


def test_enrollment_survives_a_restart(tmp_path: Path) -> None:
    first = load_or_create_enrollment(tmp_path, generate_client_key)
    again = load_or_create_enrollment(tmp_path, generate_client_key)
    assert first == again
    assert (tmp_path / "enrollment.json").stat().st_mode & 0o777 == 0o600
    assert np.frombuffer(first.public_key, np.uint8).size == 32


# --- a coordinator that goes away and comes back, in virtual time ---------------------------


RECONNECT_WITHIN_S = 5.0
"""How soon after the coordinator is back every client has checked in again (virtual time)."""


class Outage:
    """A coordinator that is unreachable from ``down_at`` to ``up_at`` (on the loop's clock)."""

    def __init__(self, *, down_at: float, up_at: float) -> None:
        self.down_at, self.up_at = down_at, up_at
        self.back: dict[str, float] = {}  # each client's first check-in once the coordinator is up

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        now = asyncio.get_running_loop().time()
        if self.down_at <= now < self.up_at:
            raise TransportError("UNAVAILABLE: connection refused")
        if isinstance(request, CheckIn) and now >= self.up_at:
            self.back.setdefault(enrollment.client_id, now)
        return cast(T, RetryLater(2.0, "no task for this client now"))


def test_after_a_long_outage_clients_are_back_within_seconds_of_the_restart(
    tmp_path: Path,
) -> None:
    # a coordinator killed for ten minutes: with a 30 s backoff cap a client could wait
    # tens of seconds after it came back, and with it the first round
    async def outage() -> dict[str, float]:
        start = asyncio.get_running_loop().time()
        link = Outage(down_at=start + 10.0, up_at=start + 610.0)
        enrollment = load_or_create_enrollment(tmp_path, generate_client_key)
        runtimes = [
            ClientRuntime(Untouchable(), link, replace(enrollment, client_id=f"c{seed}"), seed=seed)  # type: ignore[arg-type]
            for seed in range(40)
        ]
        tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
        while len(link.back) < len(runtimes):
            await asyncio.sleep(1.0)
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        return {client: at - link.up_at for client, at in link.back.items()}

    lags = run_in_virtual_time(outage())
    assert max(lags.values()) <= RECONNECT_WITHIN_S
    assert len(set(lags.values())) > len(lags) // 2  # jittered: the fleet does not return as one


def test_the_backoff_is_capped_and_jittered() -> None:
    backoff, rng = Backoff(), random.Random(0)
    assert backoff.cap_s <= RECONNECT_WITHIN_S
    delays = [backoff.delay(attempt, rng) for attempt in (*range(64), 10**6)]  # days of outage
    assert all(0.0 <= delay <= backoff.cap_s for delay in delays)
    assert backoff.delay(0, rng) <= backoff.base_s  # a first retry comes soon
    for base_s, cap_s in ((0.0, 1.0), (2.0, 1.0), (0.1, float("inf"))):
        with pytest.raises(ConfigError, match="backoff"):
            Backoff(base_s, cap_s)


def test_a_client_takes_part_in_a_round_once_even_if_the_round_is_played_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator that replays round 4 (a restart, or a malicious one) cannot have this
    client sign a second survivor set for it: two sets per round defeat the check."""

    class Signing(SecAggClient):
        def handle(self, request, contribution=None):  # type: ignore[no-untyped-def]
            if isinstance(request, ConsistencyRequest):
                return SurvivorsSigned(request.round, bytes(64))
            return super().handle(request, contribution)

    monkeypatch.setattr(runtime_module, "SecAggClient", Signing)
    session = SessionConfig("run", 4, 3, 3, 2, Quantization(clip=1.0).fitted(3))
    advertise = AdvertiseKeysRequest(4, session, 1, frozenset({2, 3}))
    link = ScriptedLink(
        [
            SecureOffer(4, advertise, 1.0),
            SecureOffer(4, ConsistencyRequest(4, frozenset({1, 2, 3})), 1.0),
            SecureOffer(4, advertise, 1.0),  # round 4 again: refused
            SecureOffer(
                5,
                dataclasses.replace(
                    advertise, round=5, session=dataclasses.replace(session, round=5)
                ),
                1.0,
            ),
        ]
    )
    enrollment = load_or_create_enrollment(tmp_path, generate_client_key)
    link.runtime = ClientRuntime(Untouchable(), link, enrollment, seed=0)  # type: ignore[arg-type]
    asyncio.run(link.runtime.run())
    sent = [type(message).__name__ for message in link.secure_sent]
    assert sent == ["KeysAdvertised", "SurvivorsSigned", "KeysAdvertised"]
    assert [round_number for round_number, _ in link.failures] == [4]
    assert "already signed the survivor set of round 4" in link.failures[0][1]


class StateLink:
    """Records the device state of every enrollment and check-in; stops after ``checks``."""

    def __init__(self, checks: int) -> None:
        self.checks = checks
        self.sent: list[tuple[str, DeviceState]] = []
        self.runtime: ClientRuntime | None = None

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        assert isinstance(request, Enroll | CheckIn)
        self.sent.append((type(request).__name__, request.state))
        if isinstance(request, CheckIn) and len(self.sent) > self.checks:
            assert self.runtime is not None
            self.runtime.stop()
        return cast(T, None if isinstance(request, Enroll) else RetryLater(0.0, "not eligible now"))


def test_the_apps_device_state_is_asked_fresh_at_enrollment_and_every_check_in(
    tmp_path: Path,
) -> None:
    readings: list[dict[str, object] | Exception] = [
        {"charging": True, "app_version": "2.5.0", "ram_gb": 3.0},
        {"charging": False, "app_version": "2.5.0", "idle": True},
        RuntimeError("the battery service is down"),
        {"wifi": True},
    ]

    def device_state(context: ClientContext) -> dict[str, object]:
        reading = readings.pop(0)
        if isinstance(reading, Exception):
            raise reading
        return reading

    app = ClientApp(lambda context: Untouchable(), device_state=device_state)
    context = ClientContext(client_id="phone")
    link = StateLink(checks=3)
    events: list[str] = []
    enrollment = load_or_create_enrollment(tmp_path, generate_client_key)
    link.runtime = ClientRuntime(
        Untouchable(),
        link,  # type: ignore[arg-type]
        enrollment,
        device_state=lambda: app.report_device_state(context),
        seed=0,
        on_event=events.append,
    )
    asyncio.run(link.runtime.run())
    kinds = [kind for kind, _ in link.sent]
    states = [state for _, state in link.sent]
    assert kinds == ["Enroll", "CheckIn", "CheckIn", "CheckIn"]
    assert (states[0].charging, states[0].wifi, states[0].ram_gb) == (True, None, 3.0)
    assert (states[1].charging, states[1].idle, states[1].ram_gb) == (False, True, None)
    # the provider failed: what the device runs is still known, its facts of the moment are not
    assert states[2] == DeviceState(app_version="2.5.0")
    assert (states[3].wifi, states[3].app_version) == (True, DeviceState().app_version)
    assert events.count("not eligible now") == 1  # said once, not at every check-in
