"""Secure rounds in the engine: SecAgg+ end to end, refusals, fencing, aborts, no plaintext held."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.config import parse_config
from shoal.coordinator import (
    ClientFailed,
    Coordinator,
    DeadlineReached,
    Phase,
    RejectReason,
    RejectSubmission,
    RoundClosed,
    RoundSettings,
    ScheduleDeadline,
    SecureMessageReceived,
    SendFitTask,
    SendSecureRequest,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.secure import SecureSettings
from shoal.coordinator.setup import secure_settings_from_config
from shoal.core import ConfigError, Parameters
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.loopback import altered_reveal
from shoal.secure.messages import MaskedInput, Stage
from shoal.secure.quantization import Quantization
from shoal.secure.server import SecAggServer

SIZE = 50
CANDIDATES = tuple(f"c{index:02d}" for index in range(12))
SETTINGS = SecureSettings(run_id="run", quantization=Quantization(clip=1.0))
IDENTITIES = {client: IdentityKey.generate() for client in CANDIDATES}
PUBLIC = {client: key.public for client, key in IDENTITIES.items()}


def make(strategy: str = "fedavg", quorum: float = 0.6) -> Coordinator:
    return Coordinator(
        settings=RoundSettings(
            clients_per_round=8, over_selection=1.25, quorum=quorum, deadline_s=100.0
        ),
        strategy=make_strategy(strategy),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=3,
        secure=SETTINGS,
    )


def updates_for(clients: list[str]) -> dict[str, Contribution]:
    rng = np.random.default_rng(0)
    return {
        c: Contribution(rng.uniform(-0.5, 0.5, SIZE).astype(np.float32), int(rng.integers(5, 50)))
        for c in clients
    }


class Network:
    """Delivers the engine's requests to real SecAgg+ clients, in order, at time ``now``."""

    def __init__(self, coordinator: Coordinator, round_number: int = 1) -> None:
        self.coordinator = coordinator
        self.round = round_number
        self.now = 0.0
        self.clients: dict[str, SecAggClient] = {}
        self.contributions: dict[str, Contribution] = {}
        self.seen: list[object] = []  # every event the coordinator received
        self.silent: dict[str, Stage] = {}
        self.accepted: list[str] = []  # whose masked inputs the coordinator took
        start = StartRound(round_number, Phase.FIT, 0.0, CANDIDATES, identities=PUBLIC)
        self.actions = self._send(start)
        cohort = sorted({a.client_id for a in self.actions if isinstance(a, SendSecureRequest)})
        self.contributions = updates_for(cohort)
        self.clients = {c: SecAggClient(round=round_number, identity=IDENTITIES[c]) for c in cohort}

    def _send(self, event: object) -> list[object]:
        self.seen.append(event)
        actions = list(self.coordinator.handle(event))  # type: ignore[arg-type]
        refused = any(isinstance(a, RejectSubmission) for a in actions)
        masked = isinstance(event, SecureMessageReceived) and isinstance(event.message, MaskedInput)
        if masked and not refused:
            self.accepted.append(event.client_id)  # type: ignore[union-attr]
        return actions

    def run(self) -> RoundClosed:
        while True:
            closed = next((a for a in self.actions if isinstance(a, RoundClosed)), None)
            if closed is not None:
                return closed
            self.now += 1.0
            replies: list[object] = []
            for action in self.actions:
                request = (
                    action.request
                    if isinstance(action, SendSecureRequest)
                    else (action.secure if isinstance(action, SendFitTask) else None)
                )
                if request is None:
                    continue
                client = action.client_id  # type: ignore[attr-defined]
                if client in self.silent and request.stage >= self.silent[client]:
                    continue
                reply = self.clients[client].handle(request, self.contributions[client])
                replies.append(SecureMessageReceived(client, self.round, self.now, reply))
            deadline = next(a for a in self.actions if isinstance(a, ScheduleDeadline))
            self.actions = []
            for reply in replies:
                self.actions += self._send(reply)
            if not any(
                isinstance(a, SendSecureRequest | SendFitTask | RoundClosed) for a in self.actions
            ):
                self.now = deadline.at
                self.actions = self._send(DeadlineReached(self.round, deadline.at, deadline.stage))


def test_a_secure_round_commits_the_weighted_mean() -> None:
    coordinator = make()
    network = Network(coordinator)
    assert {type(a) for a in network.actions} == {SendSecureRequest, ScheduleDeadline}
    closed = network.run()
    assert closed.summary.committed
    report = closed.summary.secure
    assert report is not None and report.protocol == "secagg+" and not report.aborted
    # the first 8 masked inputs count (the target); the other two are recovered as dropped
    assert closed.summary.reported == 8 and report.recovered == 2
    assert len(network.accepted) == 8
    weights = np.array([network.contributions[c].num_examples for c in network.accepted], float)
    stacked = np.stack([network.contributions[c].update for c in network.accepted])
    expected = (weights[:, None] * stacked).sum(0) / weights.sum()
    assert np.max(np.abs(coordinator.parameters.vector - expected)) < 1e-4
    assert closed.summary.num_examples == int(weights.sum())


def test_the_coordinator_never_holds_a_plaintext_update(monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[np.ndarray] = []
    original: Callable[..., None] = SecAggServer._take_masked_input

    def spy(self: SecAggServer, node: int, message: MaskedInput) -> None:
        held.append(message.vector.copy())
        original(self, node, message)
        assert self._books.total is not None
        held.append(self._books.total.copy())  # the running sum is masked too

    monkeypatch.setattr(SecAggServer, "_take_masked_input", spy)
    network = Network(make())
    network.run()
    assert not any(isinstance(e, UpdateReceived) for e in network.seen)
    quantization = Quantization(clip=1.0).fitted(10)
    plaintexts = [
        quantization.encode(
            c.update, num_examples=c.num_examples, loss=0.0, rng=np.random.default_rng(0)
        )[:SIZE].astype(np.float64)
        for c in network.contributions.values()
    ]
    assert len(held) >= 16
    for vector in held:
        for plain in plaintexts:
            correlation = np.corrcoef(vector[:SIZE].astype(np.float64), plain)[0, 1]
            assert abs(correlation) < 0.6  # masked values are uniform, unrelated to the input
            assert np.max(np.abs(vector[:SIZE].astype(np.float64) - plain)) > 2**20


def test_plaintext_updates_are_refused_in_a_secure_round() -> None:
    coordinator = make()
    network = Network(coordinator)
    client = next(iter(network.clients))
    actions = coordinator.handle(
        UpdateReceived(client, 1, 1.0, np.zeros(SIZE, np.float32), num_examples=5)
    )
    assert isinstance(actions[0], RejectSubmission)
    assert actions[0].reason is RejectReason.INVALID_UPDATE
    assert "aggregates securely" in actions[0].detail


def test_a_stale_or_malformed_protocol_message_is_rejected_and_the_round_goes_on() -> None:
    coordinator = make()
    network = Network(coordinator)
    client = next(iter(network.clients))
    request = next(
        a.request
        for a in network.actions
        if isinstance(a, SendSecureRequest) and a.client_id == client
    )
    reply = network.clients[client].handle(request)
    stale = coordinator.handle(SecureMessageReceived(client, 0, 1.0, reply))
    assert isinstance(stale[0], RejectSubmission) and stale[0].reason is RejectReason.LATE
    first = coordinator.handle(SecureMessageReceived(client, 1, 1.0, reply))
    assert not any(isinstance(a, RejectSubmission) for a in first)
    again = coordinator.handle(SecureMessageReceived(client, 1, 1.0, reply))
    assert isinstance(again[0], RejectSubmission)
    assert again[0].reason is RejectReason.INVALID_UPDATE
    bad = MaskedInput(1, np.zeros(3, np.uint32))
    late_stage = coordinator.handle(SecureMessageReceived(client, 1, 1.0, bad))
    assert isinstance(late_stage[0], RejectSubmission)


def test_below_the_threshold_the_round_aborts_and_the_model_stays() -> None:
    coordinator = make(quorum=0.9)
    network = Network(coordinator)
    for client in sorted(network.clients)[:4]:
        network.silent[client] = Stage.MASKED_INPUT
    before = coordinator.parameters.vector.copy()
    closed = network.run()
    assert not closed.summary.committed
    assert closed.summary.abort_reason is not None
    assert closed.summary.abort_reason.startswith("secure aggregation aborted")
    assert closed.summary.secure is not None and closed.summary.secure.aborted
    assert np.array_equal(coordinator.parameters.vector, before)
    # the coordinator goes on: the next round starts normally
    actions = coordinator.handle(StartRound(2, Phase.FIT, 500.0, CANDIDATES, identities=PUBLIC))
    assert any(isinstance(a, SendSecureRequest) for a in actions)


def test_a_failed_client_is_dropped_from_the_protocol() -> None:
    coordinator = make()
    network = Network(coordinator)
    victim = sorted(network.clients)[0]
    coordinator.handle(ClientFailed(victim, 1, 0.5, "crashed"))
    network.silent[victim] = Stage.ADVERTISE_KEYS
    closed = network.run()
    assert closed.summary.committed
    assert closed.summary.secure is not None
    assert closed.summary.secure.dropped["advertise_keys"] == 1


def test_evaluation_rounds_stay_plain_and_deadlines_without_stage_are_ignored() -> None:
    coordinator = make()
    actions = coordinator.handle(StartRound(1, Phase.EVALUATE, 0.0, CANDIDATES))
    assert not any(isinstance(a, SendSecureRequest) for a in actions)
    coordinator = make()
    Network(coordinator)
    assert coordinator.handle(DeadlineReached(1, 5.0)) == []


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_strategies_that_need_each_update_are_refused(strategy: str) -> None:
    with pytest.raises(ConfigError, match="reveals only the sum"):
        make(strategy)
    config = parse_config(
        {"strategy": {"name": strategy}, "secure_aggregation": {"protocol": "secagg+"}}
    )
    with pytest.raises(ConfigError, match="needs each client's update"):
        secure_settings_from_config(config, run_id="r")


def test_overflowing_quantization_is_refused_at_configuration_time() -> None:
    config = parse_config(
        {
            "data": {"num_clients": 5000},
            "round": {"clients_per_round": 3000},
            "secure_aggregation": {"protocol": "secagg+", "bits": 21},
        }
    )
    with pytest.raises(ConfigError, match=r"overflow.*3900 clients.*at most 20"):
        secure_settings_from_config(config, run_id="r")
    plain = parse_config({"secure_aggregation": {"protocol": "none"}})
    assert secure_settings_from_config(plain, run_id="r") is None


def test_only_candidates_with_an_identity_key_are_selected_for_secagg() -> None:
    coordinator = make()
    keyed = {client: PUBLIC[client] for client in CANDIDATES[:9]}
    actions = coordinator.handle(StartRound(1, Phase.FIT, 0.0, CANDIDATES, identities=keyed))
    selected = {a.client_id for a in actions if isinstance(a, SendSecureRequest)}
    assert len(selected) == 10 - 1 and selected <= set(keyed)  # nine keyed, all of them asked
    coordinator = make()
    actions = coordinator.handle(StartRound(1, Phase.FIT, 0.0, CANDIDATES))
    assert isinstance(actions[0], RoundClosed) and not actions[0].summary.committed


def test_a_culprit_is_reported_with_what_it_did() -> None:
    coordinator = make()
    network = Network(coordinator)
    cheat = sorted(network.clients)[0]
    honest = network.clients[cheat]

    class Cheat(SecAggClient):
        def handle(self, request, contribution=None):  # type: ignore[no-untyped-def]
            return altered_reveal(honest.handle(request, contribution), node=honest.node)

    network.clients[cheat] = Cheat(round=1, identity=IDENTITIES[cheat])
    closed = network.run()
    report = closed.summary.secure
    assert report is not None and set(report.culprits) == {cheat}
    assert "differs from the one it was dealt" in report.culprits[cheat]
    assert closed.summary.committed  # the honest shares were enough: the sum is exact
