"""A dishonest client over real gRPC: huge, NaN and over-weighted updates, failures of other rounds.

The coordinator is the one ``shoal coordinator serve`` runs (in this
process, on 127.0.0.1); the clients are real client runtimes over gRPC. One
of them is modified: it signs and sends what its link is told to send. Before
the fix, an update of 1e30 values and one claiming ``2**63 - 1`` examples
were accepted, and the first ruined the model for good; a failure report
for another round was answered "accepted". Now the policy (the bundled
default, on by default) denies them when the round aggregates, with its
reason, and the decision log keeps why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from shoal.client.link import Enrollment, ReportFailure, Request, SubmitUpdate
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import Config, parse_config
from shoal.coordinator.server import CoordinatorParts, serve
from shoal.core import all_finite
from shoal.registry import PolicyDecisionLog
from shoal.transport import serde
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.messages import FailureReport
from shoal.transport.signing import generate_client_key
from support.jobs import digits_client, network_job

T = TypeVar("T")
TOKEN = "let-me-in"
CLIENTS = 3
Tamper = Callable[[int, SubmitUpdate], SubmitUpdate]


class DishonestLink(GrpcLink):
    """A gRPC link that sends, in each round's place of the update, what ``tamper`` makes of it.

    ``failures_for`` adds, before each upload, a failure report for each round
    it gives (relative to the round of the task); their verdicts are kept.
    """

    def __init__(self, target: str, tamper: Tamper, *, failures_for: tuple[int, ...] = ()) -> None:
        super().__init__(target, credentials=None, enrollment_token=TOKEN)
        self.tamper = tamper
        self.failures_for = failures_for
        self.refusals: list[str] = []

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        if isinstance(request, SubmitUpdate):
            for offset in self.failures_for:
                offer = replace(request.offer, round=request.offer.round + offset)
                await self._report_and_keep(enrollment, ReportFailure(offer, "made up"))
            request = self.tamper(request.offer.round, request)  # type: ignore[assignment]
        return await super().handle(enrollment, request)

    async def _report_and_keep(self, enrollment: Enrollment, report: ReportFailure) -> None:
        message = serde.encode_failure_report(
            FailureReport.summarizing(report.offer.round, self.run_id, report.reason)
        )
        self._sign(message, enrollment, round_number=report.offer.round)
        verdict = serde.decode_report_failure_response(await self._stub.ReportFailure(message))
        self.refusals.append("accepted" if verdict.accepted else str(verdict.code.value))  # type: ignore[union-attr]


def tampered(
    request: SubmitUpdate, *, values: float | None = None, examples: int | None = None
) -> SubmitUpdate:
    update = request.update
    if values is not None:
        vector = update.vector.copy()
        vector[: max(1, vector.size // 2)] = values  # half the values: a subtle-looking update
        update = update.with_vector(vector)
    return replace(
        request, update=update, num_examples=request.num_examples if examples is None else examples
    )


def job(tmp_path: Path, rounds: int, *, quorum: float = 0.6) -> Config:
    """The federation's job; at the default quorum the two honest clients are a quorum."""
    return parse_config(
        network_job(
            tmp_path,
            run_id="bounds",
            token=TOKEN,
            clients=CLIENTS,
            per_round=CLIENTS,
            run={"name": "bounds", "rounds": rounds},
            round={"quorum": quorum, "deadline_s": 30.0},
        )
    )


async def federation(
    tmp_path: Path, config: Config, dishonest: Callable[[str], DishonestLink]
) -> tuple[CoordinatorParts, list[dict[str, Any]], list[str], DishonestLink]:
    rows: list[dict[str, Any]] = []
    said: list[str] = []  # what the dishonest client's runtime was told
    runtimes, links, tasks = [], [], []
    held: list[DishonestLink] = []

    def on_ready(port: int, first_round: int) -> None:
        target = f"127.0.0.1:{port}"
        for index in range(CLIENTS):
            link = (
                dishonest(target)
                if index == 0
                else GrpcLink(target, credentials=None, enrollment_token=TOKEN)
            )
            if isinstance(link, DishonestLink):
                held.append(link)
            enrollment = load_or_create_enrollment(tmp_path / f"c{index}", generate_client_key)
            runtime = ClientRuntime(
                digits_client(index, CLIENTS),
                link,
                enrollment,
                backoff=Backoff(0.01, 0.1),
                seed=index,
                on_event=said.append if index == 0 else None,
            )
            links.append(link)
            runtimes.append(runtime)
            tasks.append(asyncio.create_task(runtime.run()))

    try:
        parts = await asyncio.wait_for(
            serve(config, insecure=True, on_round=rows.append, on_ready=on_ready), 120
        )
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        for link in links:
            await link.close()
    return parts, rows, said, held[0]


ATTACKS = {
    1: {"values": 1e30},  # finite in float32, and enough to ruin the model for good
    2: {"values": float("nan")},
    3: {"examples": 2**63 - 1},  # to outweigh every honest client
    4: {"values": -3e6},  # over the default bound of 1e6
}


def test_out_of_bound_updates_are_denied_and_the_model_stays_whole(tmp_path: Path) -> None:
    config = job(tmp_path, rounds=5)

    def attack(round_number: int, request: SubmitUpdate) -> SubmitUpdate:
        return tampered(request, **ATTACKS.get(round_number, {}))

    parts, rows, said, _ = asyncio.run(
        federation(tmp_path, config, lambda target: DishonestLink(target, attack))
    )
    assert [(row["round"], row["committed"]) for row in rows] == [(r, True) for r in range(1, 6)]
    for row in rows[:4]:  # each attack: refused, counted as the attacker's failure, round goes on
        assert (row["reported"], row["dropped"]) == (2, 1), row
        assert sum(row["failures"].values()) == 1
    # NaN is malformed: refused on arrival, and the client is told; the rest is the policy's,
    # which decides on the round's updates together when it aggregates
    assert [row["rejected"] for row in rows[:4]] == [{}, {"invalid_update": 1}, {}, {}]
    too_large = {"l2_norm_above_bound": 1, "relative_l2_norm_above_bound": 1}  # both rules
    assert [row["policy_denied"] for row in rows[:4]] == [
        too_large,
        {},
        {"examples_above_cap": 1},
        too_large,
    ]
    assert [row["policy_decisions"] for row in rows] == [3, 2, 3, 3, 3]
    told = [line for line in said if "rejected our result" in line]
    assert told == [
        "round 2 rejected our result: invalid_update: invalid_update: "
        "update holds NaN or infinite values"
    ]
    denials = PolicyDecisionLog(parts.database).decisions("bounds", denied_only=True)
    assert [(d.round, d.reasons[0][0]) for d in denials] == [
        (1, "l2_norm_above_bound"),
        (3, "examples_above_cap"),
        (4, "l2_norm_above_bound"),
    ]
    assert {d.facts["signature"] for d in denials} == {"verified"}  # the service checked them
    assert denials[1].reasons[0][1] == f"{2**63 - 1} examples above the cap 10000000"
    assert (
        denials[0].reasons[0][1].startswith("l2 norm 1.8")
        and "above the bound 100" in (denials[0].reasons[0][1])
    )
    assert (rows[4]["reported"], rows[4]["dropped"]) == (3, 0)  # an honest round: all three count
    model = parts.driver.coordinator.parameters.vector
    assert all_finite(model) and float(np.abs(model).max()) < 100.0
    assert rows[-1]["test_accuracy"] > 0.5  # and it still learns


def test_failure_reports_for_other_rounds_are_refused_and_the_round_goes_on(tmp_path: Path) -> None:
    # every client a round's member: at a quorum of two, a round started before the third
    # client's first check-in (a loaded machine's enrollment) would ask two
    config = job(tmp_path, rounds=2, quorum=1.0)
    honest: Tamper = lambda round_number, request: request  # noqa: E731
    link_of = lambda target: DishonestLink(target, honest, failures_for=(-1, 5))  # noqa: E731
    _, rows, _, link = asyncio.run(federation(tmp_path, config, link_of))
    # round 1: "round 0" is long gone (late), round 6 is not yet (wrong round); the same in round 2
    assert link.refusals == ["late", "wrong_round", "late", "wrong_round"]
    for row in rows:  # the client's task stood: its update counted, no failure was booked
        assert row["committed"] and (row["reported"], row["dropped"]) == (3, 0), row
        assert row["rejected"] == {"late": 1, "wrong_round": 1} and row["failures"] == {}
