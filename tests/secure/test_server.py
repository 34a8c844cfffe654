"""The SecAgg+ server: literal transition table, fencing of stale messages, stage deadlines."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from shoal.core import IllegalTransition, ProtocolError, SecurityError
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.messages import (
    Advertisement,
    ClientMessage,
    ConsistencyRequest,
    KeysAdvertised,
    MaskedInput,
    PublicKeys,
    SessionConfig,
    SharesSent,
    Stage,
    StaleMessage,
    SurvivorsSigned,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import Quantization
from shoal.secure.server import (
    SERVER_TRANSITIONS,
    Aborted,
    ClientDropped,
    MessageReceived,
    ScheduleStageDeadline,
    SecAggServer,
    SendRequest,
    ServerAction,
    StageDeadline,
    StageDeadlines,
    SumReady,
)

IDS = ["a", "b", "c", "d"]
SESSION = SessionConfig(
    "run", 3, num_nodes=4, vector_length=5, threshold=3, quantization=Quantization().fitted(4)
)
DEADLINES = StageDeadlines(
    advertise_keys=10, share_keys=10, masked_input=100, unmask=10, consistency=10
)
IDENTITIES = {client: IdentityKey.generate() for client in "abcdef"}
PUBLIC = {client: key.public for client, key in IDENTITIES.items()}
ADVERTISEMENT = Advertisement(
    PublicKeys(bytes(range(32)), bytes(range(1, 33))), bytes(32), bytes(64)
)


class Harness:
    """A server with four (or ``ids``) real clients, walked stage by stage."""

    def __init__(
        self,
        target: int | None = None,
        session: SessionConfig = SESSION,
        ids: list[str] = IDS,
    ) -> None:
        self.server = SecAggServer(
            session,
            ids,
            degree=len(ids) - 1,
            graph_seed=b"g",
            deadlines=DEADLINES,
            min_survivors=3,
            identities=PUBLIC,
            target=target,
        )
        self.clients = {
            c: SecAggClient(round=3, identity=IDENTITIES[c], rng=np.random.default_rng(i))
            for i, c in enumerate(ids)
        }
        self.pending: list[ServerAction] = self.server.start(0.0)
        self.now = 0.0
        self.replies: dict[str, ClientMessage] = {}

    def answer(self) -> None:
        """Every client answers the requests pending for it (the server is not told yet)."""
        self.replies = {}
        for action in self.pending:
            if isinstance(action, SendRequest):
                contribution = Contribution(np.full(5, 0.25, np.float32), num_examples=10)
                self.replies[action.client_id] = self.clients[action.client_id].handle(
                    action.request, contribution
                )

    def deliver(self, *clients: str) -> list[ServerAction]:
        self.now += 1
        actions: list[ServerAction] = []
        stage = self.server.stage
        for client in clients or list(self.replies):
            if self.server.stage is not stage:
                break  # the stage closed early (enough unmask shares): the rest are not needed
            actions += self.server.handle(MessageReceived(client, self.replies[client], self.now))
        self.pending = actions
        return actions

    def step(self) -> None:
        self.answer()
        self.deliver()


def harness_at(stage: Stage) -> Harness:
    harness = Harness()
    steps = {
        Stage.ADVERTISE_KEYS: 0,
        Stage.SHARE_KEYS: 1,
        Stage.MASKED_INPUT: 2,
        Stage.CONSISTENCY: 3,
        Stage.UNMASK: 4,
        Stage.FINISHED: 5,
    }
    if stage is Stage.ABORTED:
        harness.server.handle(StageDeadline(Stage.ADVERTISE_KEYS, 10.0))
        assert harness.server.stage is Stage.ABORTED
        return harness
    for _ in range(steps[stage]):
        harness.step()
    assert harness.server.stage is stage
    return harness


def _message_of(kind: type[ClientMessage]) -> ClientMessage:
    return {
        KeysAdvertised: KeysAdvertised(3, ADVERTISEMENT),
        SharesSent: SharesSent(3, {}, {}),
        MaskedInput: MaskedInput(3, np.zeros(7, np.uint32)),
        SurvivorsSigned: SurvivorsSigned(3, bytes(64)),
        UnmaskShares: UnmaskShares(3, {}, {}),
    }[kind]


MESSAGE_TYPES = [KeysAdvertised, SharesSent, MaskedInput, SurvivorsSigned, UnmaskShares]


def test_the_happy_path_sums_and_finishes() -> None:
    harness = Harness()
    for _ in range(5):
        harness.step()
    result = next(a for a in harness.pending if isinstance(a, SumReady)).result
    assert result.contributors == tuple(IDS)
    assert result.decoded.mean() == pytest.approx(np.full(5, 0.25), abs=1e-4)
    assert harness.server.stage is Stage.FINISHED


@pytest.mark.parametrize(
    ("stage", "kind"),
    [
        (s, k)
        for s, k in itertools.product(Stage, MESSAGE_TYPES)
        if (s, k) not in SERVER_TRANSITIONS
    ],
)
def test_every_out_of_stage_message_is_refused_and_changes_nothing(
    stage: Stage, kind: type[ClientMessage]
) -> None:
    harness = harness_at(stage)
    message = _message_of(kind)
    expected: type[Exception] = StaleMessage if message.stage < stage else IllegalTransition
    with pytest.raises(expected):
        harness.server.handle(MessageReceived("a", message, 50.0))
    assert harness.server.stage is stage


@pytest.mark.parametrize("stage", [Stage.FINISHED, Stage.ABORTED])
def test_deadlines_and_drops_after_the_end_change_nothing(stage: Stage) -> None:
    harness = harness_at(stage)
    assert harness.server.handle(StageDeadline(Stage.UNMASK, 99.0)) == []
    assert harness.server.handle(ClientDropped("a", 99.0)) == []
    assert harness.server.stage is stage


def test_a_message_of_an_earlier_round_is_stale() -> None:
    harness = harness_at(Stage.ADVERTISE_KEYS)
    old = KeysAdvertised(2, ADVERTISEMENT)
    with pytest.raises(StaleMessage, match="round 2"):
        harness.server.handle(MessageReceived("a", old, 1.0))


def test_late_messages_of_a_closed_stage_are_stale() -> None:
    harness = Harness()
    harness.answer()
    harness.deliver("a", "b", "c")
    late = harness.replies["d"]
    harness.server.handle(StageDeadline(Stage.ADVERTISE_KEYS, 10.0))
    assert harness.server.stage is Stage.SHARE_KEYS
    with pytest.raises(StaleMessage, match="advertise_keys message"):
        harness.server.handle(MessageReceived("d", late, 11.0))


def test_strangers_duplicates_and_the_silent_are_refused() -> None:
    harness = Harness()
    harness.answer()
    harness.deliver("a")
    with pytest.raises(ProtocolError, match="not part of this secure round"):
        harness.server.handle(MessageReceived("zz", harness.replies["a"], 2.0))
    with pytest.raises(ProtocolError, match="not expected"):
        harness.server.handle(MessageReceived("a", harness.replies["a"], 2.0))


def test_a_stage_deadline_of_an_older_stage_is_ignored() -> None:
    harness = harness_at(Stage.SHARE_KEYS)
    assert harness.server.handle(StageDeadline(Stage.ADVERTISE_KEYS, 10.0)) == []
    assert harness.server.stage is Stage.SHARE_KEYS


def test_a_stalled_client_never_holds_a_stage_past_its_deadline() -> None:
    harness = Harness()
    deadline = next(a for a in harness.pending if isinstance(a, ScheduleStageDeadline))
    assert deadline.at == DEADLINES.advertise_keys
    harness.answer()
    assert harness.deliver("a", "b", "c") == []  # d is stalled: the stage waits...
    actions = harness.server.handle(StageDeadline(Stage.ADVERTISE_KEYS, deadline.at))
    assert harness.server.stage is Stage.SHARE_KEYS  # ...until its deadline, and not longer
    assert {a.client_id for a in actions if isinstance(a, SendRequest)} == {"a", "b", "c"}


def test_a_reported_drop_closes_the_stage_without_waiting() -> None:
    harness = Harness()
    harness.answer()
    harness.deliver("a", "b", "c")
    harness.server.handle(ClientDropped("d", 2.0))
    assert harness.server.stage is Stage.SHARE_KEYS


def test_masked_input_closes_at_its_target_and_later_inputs_are_stale() -> None:
    six = list("abcdef")  # threshold 4 of 6 holders: five inputs leave one to spare
    session = dataclasses.replace(SESSION, num_nodes=6, quantization=Quantization().fitted(6))
    harness = Harness(target=5, session=dataclasses.replace(session, threshold=4), ids=six)
    harness.step()
    harness.step()
    harness.answer()
    harness.deliver(*six[:5])
    assert harness.server.stage is Stage.CONSISTENCY
    with pytest.raises(StaleMessage):
        harness.server.handle(MessageReceived("f", harness.replies["f"], 9.0))
    harness.step()
    harness.step()
    result = next(a for a in harness.pending if isinstance(a, SumReady)).result
    assert result.contributors == tuple(six[:5]) and result.recovered == ("f",)


def test_malformed_replies_are_refused() -> None:
    harness = harness_at(Stage.SHARE_KEYS)
    harness.answer()
    with pytest.raises(ProtocolError, match="expected one for each"):
        harness.server.handle(MessageReceived("a", SharesSent(3, {}, {}), 1.0))
    harness = harness_at(Stage.MASKED_INPUT)
    with pytest.raises(ProtocolError, match="masked values"):
        harness.server.handle(MessageReceived("a", MaskedInput(3, np.zeros(3, np.uint32)), 1.0))
    harness = harness_at(Stage.UNMASK)
    with pytest.raises(ProtocolError, match="another unmask request"):
        harness.server.handle(MessageReceived("a", UnmaskShares(3, {}, {}), 1.0))


def test_too_few_advertisers_abort() -> None:
    harness = Harness()
    harness.answer()
    harness.deliver("a", "b")
    actions = harness.server.handle(StageDeadline(Stage.ADVERTISE_KEYS, 10.0))
    assert isinstance(actions[0], Aborted)
    assert "fewer than the 3 needed" in actions[0].reason


def test_session_validation() -> None:
    with pytest.raises(ProtocolError, match="one distinct client per node"):
        SecAggServer(
            SESSION,
            ["a", "a", "b", "c"],
            degree=3,
            graph_seed=b"",
            deadlines=DEADLINES,
            min_survivors=1,
            identities=PUBLIC,
        )
    with pytest.raises(ProtocolError, match="no identity key"):
        SecAggServer(
            SESSION,
            IDS,
            degree=3,
            graph_seed=b"",
            deadlines=DEADLINES,
            min_survivors=1,
            identities={},
        )
    low = dataclasses.replace(SESSION, threshold=2)
    with pytest.raises(ProtocolError, match="below the safe floor 3"):
        SecAggServer(
            low,
            IDS,
            degree=3,
            graph_seed=b"",
            deadlines=DEADLINES,
            min_survivors=1,
            identities=PUBLIC,
        )
    harness = Harness()
    with pytest.raises(IllegalTransition, match="already started"):
        harness.server.start(0.0)


def test_masked_input_waits_past_its_target_while_secrets_lack_spare_holders() -> None:
    harness = Harness(target=3)  # threshold 3: three inputs leave no holder to spare
    harness.step()
    harness.step()
    harness.answer()
    assert harness.deliver("a", "b", "c") == []
    assert harness.server.stage is Stage.MASKED_INPUT
    harness.deliver("d")
    assert harness.server.stage is Stage.CONSISTENCY


def test_keys_not_signed_by_the_enrolled_identity_are_refused() -> None:
    harness = Harness()
    harness.answer()
    stolen = harness.replies["b"]  # b's advertisement, sent as a's
    with pytest.raises(SecurityError, match="no valid signature"):
        harness.server.handle(MessageReceived("a", stolen, 1.0))
    assert harness.server.expected == {1, 2, 3, 4}  # refused: a may still advertise its own
    harness.deliver("a")


def test_the_survivor_set_is_signed_and_each_client_gets_its_neighbours_signatures() -> None:
    """The server forwards what each signed; the clients check (see the client's tests)."""
    harness = harness_at(Stage.CONSISTENCY)
    requests = [a.request for a in harness.pending if isinstance(a, SendRequest)]
    assert requests and all(isinstance(r, ConsistencyRequest) for r in requests)
    assert {r.survivors for r in requests if isinstance(r, ConsistencyRequest)} == {
        frozenset({1, 2, 3, 4})
    }
    harness.answer()
    harness.deliver()
    assert harness.server.stage is Stage.UNMASK
    unmask = {a.client_id: a.request for a in harness.pending if isinstance(a, SendRequest)}
    for client, request in unmask.items():
        assert isinstance(request, UnmaskRequest)
        node = harness.server.nodes[client]
        assert set(request.signatures) == harness.server.graph[node]
