"""Federated preprocessing over real gRPC: a served statistics run under SecAgg+ writes the
statistics of every deployed client's records, and a served training run sends their scaler
with every task; a scaler changed on the way is refused by the client, which goes on.

Each client is a :class:`ClientRuntime` over a real channel on 127.0.0.1 running the
example app (``examples/federated-preprocessing``) as ``shoal client run`` builds it: through
the :class:`ClientApp`, whose clients a statistics job counts instead of training.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.client.app import ClientContext, as_client_app, load_attribute
from shoal.client.link import CheckIn, ReportFailure
from shoal.config import Config, load_config, parse_config
from shoal.preprocessing import SCALER_KEY, Scaler, read_statistics
from shoal.tasks import CheckInAnswer, TaskOffer
from shoal.transport.grpc_link import GrpcLink
from support.jobs import network_job, serve_to_digits_clients

pytestmark = pytest.mark.timeout(180)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "federated-preprocessing"
TOKEN = "hospitals"
CLIENTS = 4


@pytest.fixture(autouse=True)
def _own_app_module() -> Iterator[None]:
    sys.modules.pop("app", None)
    yield
    sys.modules.pop("app", None)


def job(tmp_path: Path, name: str, example: str, **sections: dict[str, Any]) -> Config:
    """The example's job ``example`` served to CLIENTS hospitals, each round asking all."""
    own = load_config(EXAMPLE / example).model_dump(
        mode="json", include={"statistics", "client", "secure_aggregation"}
    )
    given: dict[str, dict[str, Any]] = {
        **own,
        "run": {"name": name, "rounds": 1},
        "round": {"quorum": 1.0, "deadline_s": 60},
        "app": {"client": "app:client_fn", "server": "app:server_app"},
    }
    for section, values in sections.items():
        given[section] = given.get(section, {}) | values
    return parse_config(
        network_job(tmp_path, run_id=name, token=TOKEN, clients=CLIENTS, per_round=CLIENTS, **given)
    )


def hospitals(
    config: Config, seen: list[Any] | None = None, copies: dict[int, Config] | None = None
) -> Callable[[int, int], Any]:
    """Hospital ``index``'s client as ``shoal client run`` builds it (through the ClientApp,
    from its own copy of the job: ``copies[index]``, else the coordinator's); ``seen`` gets
    the extras of every task it trains on."""
    app = as_client_app(load_attribute("app:client_fn", search_path=[EXAMPLE]))

    def client_of(index: int, clients: int) -> Any:
        own = (copies or {}).get(index, config)
        client = app(ClientContext(f"hospital-{index}", index, clients, config=own))
        if seen is not None:
            fit = client.fit

            def recorded(parameters: Any, task: Any) -> Any:
                seen.append(dict(task.extras))
                return fit(parameters, task)

            client.fit = recorded
        return client

    return client_of


class TamperingLink(GrpcLink):
    """A real link whose tasks arrive with another scaler (a hostile coordinator or peer);
    it keeps the failures its client reports."""

    def __init__(self, *args: Any, scaler: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scaler = scaler
        self.failures: list[str] = []

    async def _check_in(self, enrollment: Any, request: CheckIn) -> CheckInAnswer:
        answer = await super()._check_in(enrollment, request)
        if isinstance(answer, TaskOffer) and SCALER_KEY in answer.config.extras:
            extras = {**answer.config.extras, SCALER_KEY: self.scaler}
            answer = dataclasses.replace(
                answer, config=dataclasses.replace(answer.config, extras=extras)
            )
        return answer

    async def _report_failure(self, enrollment: Any, request: ReportFailure) -> None:
        self.failures.append(request.reason)
        await super()._report_failure(enrollment, request)


def serve(
    tmp_path: Path,
    config: Config,
    *,
    seen: list[Any] | None = None,
    link_of: Callable[[int, str], GrpcLink] | None = None,
    copies: dict[int, Config] | None = None,
    pin_key: bool = True,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    asyncio.run(
        serve_to_digits_clients(
            tmp_path,
            config,
            clients=CLIENTS,
            token=TOKEN,
            on_round=rows.append,
            client_of=hospitals(config, seen, copies),
            search_path=[EXAMPLE],
            link_of=link_of,
            pin_key=pin_key,
            timeout_s=120,
        )
    )
    return rows


def test_a_served_statistics_run_under_secagg_counts_every_deployed_clients_records(
    tmp_path: Path,
) -> None:
    config = job(tmp_path, "hospital-statistics", "statistics.toml")
    assert config.secure_aggregation.protocol == "secagg+"
    rows = serve(tmp_path, config)
    assert rows[-1]["committed"] and rows[-1]["reported"] == CLIENTS
    state = tmp_path / "state"
    statistics, _ = read_statistics(state)
    features = [hospitals(config)(index, CLIENTS).client.local_features() for index in range(4)]
    bounds = config.statistics.bounds()
    pooled = np.clip(np.concatenate(features).astype(np.float64), bounds.low, bounds.high)
    assert (np.abs(statistics.mean - pooled.mean(axis=0)) <= 2e-5 * bounds.width).all()
    assert (np.abs(statistics.variance - pooled.var(axis=0)) <= 2e-5 * bounds.width**2).all()
    summary = json.loads((state / "summary.json").read_text())
    assert summary["statistics"]["examples"] == len(pooled)
    assert summary["architecture"] == "feature-statistics"


def test_a_hospital_whose_copy_of_the_job_has_other_bounds_counts_on_the_runs(
    tmp_path: Path,
) -> None:
    """Hospital 0's job file halves every upper bound (a stale or edited copy): it clips and
    scales with the bounds its tasks carry, and the statistics are every hospital's."""
    config = job(tmp_path, "hospital-statistics", "statistics.toml")
    high = config.statistics.high
    assert isinstance(high, list)
    stale = config.model_copy(
        update={
            "statistics": config.statistics.model_copy(
                update={"high": [value / 2 for value in high]}
            )
        }
    )
    rows = serve(tmp_path, config, copies={0: stale})
    assert rows[-1]["committed"] and rows[-1]["reported"] == CLIENTS
    statistics, _ = read_statistics(tmp_path / "state")
    features = [hospitals(config)(index, CLIENTS).client.local_features() for index in range(4)]
    bounds = config.statistics.bounds()
    pooled = np.clip(np.concatenate(features).astype(np.float64), bounds.low, bounds.high)
    assert (np.abs(statistics.mean - pooled.mean(axis=0)) <= 2e-5 * bounds.width).all()
    assert (np.abs(statistics.variance - pooled.var(axis=0)) <= 2e-5 * bounds.width**2).all()


@pytest.fixture
def statistics_file(tmp_path: Path) -> Path:
    """Pass 1 served to the hospitals, its statistics.json moved where pass 2 names it."""
    serve(tmp_path / "pass-1", job(tmp_path / "pass-1", "hospital-statistics", "statistics.toml"))
    return tmp_path / "pass-1" / "state" / "statistics.json"


@pytest.mark.parametrize("protocol", ["none", "secagg+"])
def test_a_served_training_run_sends_its_scaler_with_every_task(
    tmp_path: Path, statistics_file: Path, protocol: str
) -> None:
    statistics, sha256 = read_statistics(statistics_file)
    config = job(
        tmp_path,
        "hospital-model",
        "train.toml",
        preprocessing={"statistics": str(statistics_file)},
        run={"rounds": 4},
        secure_aggregation={"protocol": protocol},
    )
    seen: list[Any] = []
    rows = serve(tmp_path, config, seen=seen)
    assert len(seen) == 4 * CLIENTS
    assert {extras[SCALER_KEY] for extras in seen} == {statistics.scaler().text()}
    assert all(row["committed"] for row in rows)
    assert rows[-1]["test_accuracy"] >= 0.9  # the central evaluation standardizes too
    stored = json.loads((tmp_path / "state" / "config.json").read_text())
    assert stored["preprocessing"]["sha256"] == sha256


def other_scaler(statistics_file: Path) -> str:
    """A well-formed scaler, not the run's: every scale ten times the statistics' own."""
    scaler = read_statistics(statistics_file)[0].scaler()
    return Scaler(scaler.mean, scaler.scale * 10).text()


@pytest.mark.parametrize(
    ("pinned", "forged", "reason"),
    [
        (True, "other", "is not the one signed with version"),
        (True, '{"mean":[0],"scale":[0]}', "is not the one signed with version"),
        (False, '{"mean":[0],"scale":[0]}', "the task's scaler cannot be used: a scaler's scale"),
    ],
    ids=["pinned-valid-other", "pinned-malformed", "unpinned-malformed"],
)
def test_a_scaler_changed_on_the_way_is_refused_and_the_client_goes_on(
    tmp_path: Path, statistics_file: Path, pinned: bool, forged: str, reason: str
) -> None:
    """One hospital's tasks arrive with another scaler than the run's: a client that pins the
    coordinator's key refuses any scaler but the one signed with the task's model version
    (another valid one would train it on another scale, silently); one that pins none still
    refuses a scaler it cannot use. Each refusal is one line reported at once; the hospital
    trains on none of them and stays up until the run ends."""
    scaler = other_scaler(statistics_file) if forged == "other" else forged
    config = job(
        tmp_path,
        "hospital-model",
        "train.toml",
        preprocessing={"statistics": str(statistics_file)},
        run={"rounds": 2},
        round={"quorum": 0.75, "deadline_s": 60},
    )
    made: list[TamperingLink] = []

    def link_of(index: int, address: str) -> GrpcLink:
        if index != 0:
            return GrpcLink(address, credentials=None, enrollment_token=TOKEN)
        link = TamperingLink(address, credentials=None, enrollment_token=TOKEN, scaler=scaler)
        made.append(link)
        return link

    rows = serve(tmp_path, config, link_of=link_of, pin_key=pinned)
    assert all(row["committed"] and row["reported"] == CLIENTS - 1 for row in rows)
    (tampered,) = made
    assert tampered.failures and all(reason in failure for failure in tampered.failures)
