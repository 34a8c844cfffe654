"""The eligibility policy and the versioning matrix on a live coordinator, over gRPC with TLS.

Phones report their state through their app's ``device_state`` provider; the
coordinator selects only the eligible, tells the others why, counts them in
each round's row, and refuses the update of a client whose software a new
requirement (``shoal versions require`` while it runs, or a job's
``[[versions.require]]`` from a later round) no longer accepts.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from typer.testing import CliRunner

import shoal as shoal_package
from shoal.cli import app as cli
from shoal.client.app import ClientApp, ClientContext, device_state_of
from shoal.client.link import Enrollment, Request, SubmitUpdate
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import Config, parse_config
from shoal.coordinator.server import CoordinatorParts, serve
from shoal.core import RegistryError
from shoal.registry import ClientRegistry, open_database, registry_location
from shoal.transport.certs import init_certificates, load_channel_credentials
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.signing import generate_client_key
from support.jobs import digits_client, network_job

pytestmark = pytest.mark.timeout(150)

T = TypeVar("T")
TOKEN = "phone-token"
RUN = "run-eligibility"
Facts = Mapping[str, Any]


@dataclass
class Ledger:
    """What happened to every update the phones sent: (client, round, refusal or None)."""

    uploads: list[tuple[str, int, str | None]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def accepted(self, client: str) -> list[int]:
        return [r for c, r, refusal in self.uploads if c == client and refusal is None]

    def refused(self, client: str) -> list[str]:
        return [refusal for c, _, refusal in self.uploads if c == client and refusal is not None]

    def fit_rows(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["phase"] == "fit"]


class WatchedLink(GrpcLink):
    """A TLS gRPC link that notes the coordinator's verdict on each update."""

    def __init__(self, target: str, credentials: Any, ledger: Ledger) -> None:
        super().__init__(
            target, credentials=credentials, enrollment_token=TOKEN, rejected_retry_s=0.1
        )
        self.ledger = ledger

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        answer = await super().handle(enrollment, request)
        if isinstance(request, SubmitUpdate):
            detail = None if answer is None else getattr(answer, "detail", str(answer))
            self.ledger.uploads.append((enrollment.client_id, request.offer.round, detail))
        return answer


def phone_job(tmp_path: Path, phones: int, **sections: dict[str, Any]) -> Config:
    init_certificates(tmp_path / "certs")
    base = network_job(
        tmp_path,
        run_id=RUN,
        token=TOKEN,
        clients=phones,
        per_round=phones,
        round={"quorum": 0.6, "deadline_s": 30},
    )
    base["coordinator"]["certificates"] = str(tmp_path / "certs")
    for name, section in sections.items():
        base[name] = base.get(name, {}) | section
    return parse_config(base)


def enroll_ahead(tmp_path: Path, config: Config, facts: list[Facts]) -> None:
    """Every phone enrolled with its state before the coordinator starts: round 1 sees them all."""
    database = registry_location(Path(config.coordinator.state_dir), None).open(must_exist=False)
    try:
        registry = ClientRegistry(database)
        for index, phone in enumerate(facts):
            enrollment = load_or_create_enrollment(tmp_path / f"p{index}", generate_client_key)
            registry.enroll(
                enrollment.client_id, device_state_of(phone), public_key=enrollment.public_key
            )
    finally:
        database.close()


async def serve_phones(
    tmp_path: Path,
    config: Config,
    facts: list[Facts],
    *,
    on_row: Callable[[dict[str, Any]], None] = lambda row: None,
) -> tuple[CoordinatorParts, Ledger, list[str]]:
    """Serve ``config`` over TLS to one phone per entry of ``facts`` until the job ends.

    Each phone's app reports its entry through ``device_state``. Returns the
    parts, what happened to the updates, and the phones' client ids.
    """
    ledger = Ledger()
    runtimes: list[ClientRuntime] = []
    links: list[WatchedLink] = []
    tasks: list[asyncio.Task[None]] = []
    ids: list[str] = []
    credentials = load_channel_credentials(tmp_path / "certs" / "ca.pem")

    def on_round(row: dict[str, Any]) -> None:
        ledger.rows.append(row)
        on_row(row)

    def on_ready(port: int, first_round: int) -> None:
        for index, phone in enumerate(facts):
            enrollment = load_or_create_enrollment(tmp_path / f"p{index}", generate_client_key)
            context = ClientContext(enrollment.client_id, index, len(facts), config=config)
            client = digits_client(index, len(facts))
            app = ClientApp(lambda c, client=client: client, device_state=lambda c, p=phone: p)
            link = WatchedLink(f"127.0.0.1:{port}", credentials, ledger)
            runtime = ClientRuntime(
                client,
                link,
                enrollment,
                device_state=lambda app=app, context=context: app.report_device_state(context),
                backoff=Backoff(0.01, 0.1),
                seed=index,
            )
            ids.append(enrollment.client_id)
            links.append(link)
            runtimes.append(runtime)
            tasks.append(asyncio.create_task(runtime.run()))

    try:
        parts = await asyncio.wait_for(
            serve(config, on_round=on_round, on_ready=on_ready), timeout=120
        )
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        for link in links:
            await link.close()
    return parts, ledger, ids


def registry_of(config: Config) -> tuple[Any, ClientRegistry]:
    database = registry_location(Path(config.coordinator.state_dir), None).open()
    return database, ClientRegistry(database)


GOOD = {"device_class": "phone", "charging": True, "wifi": True, "app_version": "2.5.0"}


def test_a_requirement_added_with_the_cli_while_the_coordinator_runs_bars_old_apps(
    tmp_path: Path,
) -> None:
    phones = [GOOD, GOOD, GOOD | {"app_version": "2.0.0"}]
    config = phone_job(tmp_path, len(phones), run={"rounds": 5})
    enroll_ahead(tmp_path, config, phones)
    model = config.model.kind  # a coordinator names its model by its architecture
    runner = CliRunner()
    required: list[str] = []

    def on_row(row: dict[str, Any]) -> None:
        if row["round"] == 2:  # between rounds 2 and 3, as an operator would, from a shell
            result = runner.invoke(
                cli,
                ["versions", "require", model, "--component", "app", "--minimum", "2.4",
                 "--state-dir", config.coordinator.state_dir],
            )  # fmt: skip
            required.append(result.output)
            assert result.exit_code == 0, result.output

    _, ledger, ids = asyncio.run(serve_phones(tmp_path, config, phones, on_row=on_row))
    old = ids[2]
    assert required
    rows = ledger.fit_rows()
    assert [row["round"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["selected"] for row in rows] == [3, 3, 2, 2, 2]
    assert ledger.accepted(old) == [1, 2]  # it trained until the requirement, never after
    assert all(row["excluded"] == {"versions": 0} for row in rows[:2])
    assert sum(row["excluded"]["versions"] for row in rows[2:]) >= 1
    assert all(row["excluded"]["versions"] <= 1 for row in rows)
    database, registry = registry_of(config)
    try:
        told = registry.get(old).eligibility
    finally:
        database.close()
    assert not told.can_train
    assert told.reason == f"app version 2.0.0 is below the minimum 2.4 for model arch {model}"


def test_a_jobs_version_requirement_applies_from_its_round_on(tmp_path: Path) -> None:
    phones = [GOOD, GOOD, GOOD | {"app_version": "2.0.0"}]
    require = [{"component": "app", "minimum": "2.4", "from_round": 3}]
    config = phone_job(tmp_path, len(phones), run={"rounds": 4}, versions={"require": require})
    enroll_ahead(tmp_path, config, phones)
    _, ledger, ids = asyncio.run(serve_phones(tmp_path, config, phones))
    rows = ledger.fit_rows()
    assert [row["selected"] for row in rows] == [3, 3, 2, 2]
    assert ledger.accepted(ids[2]) == [1, 2]
    assert [ledger.accepted(phone) for phone in ids[:2]] == [[1, 2, 3, 4]] * 2


# --- real `shoal client run` processes -------------------------------------------------------

PHONE_APP = '''
"""The built-in digits app on phones whose state the test sets in a file, read at each check-in."""

import json
from pathlib import Path

from shoal.apps import builtin
from shoal.client.app import ClientApp


def device_state(context):
    return json.loads(Path(context.options["state_file"]).read_text())


app = ClientApp(
    builtin.client_app.client_fn,
    num_examples=builtin.client_app.num_examples,
    device_state=device_state,
)
'''


def set_state(path: Path, facts: Facts) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(facts))
    partial.replace(path)  # a check-in never reads half a file


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_shoal_client_run_processes_only_the_eligible_train_and_rows_count_the_excluded(
    tmp_path: Path,
) -> None:
    init_certificates(tmp_path / "certs")
    (tmp_path / "phone_app.py").write_text(PHONE_APP)
    port = free_port()
    config = tmp_path / "job.toml"
    config.write_text(
        f"""
[run]
name = "{RUN}"
rounds = 2
[app]
client = "phone_app:app"
[data]
num_clients = 5
[round]
clients_per_round = 2
over_selection = 1.0
quorum = 1.0
deadline_s = 60
[client]
epochs = 1
batch_size = 16
[evaluation]
every = 0
[selection]
require_charging = true
require_wifi = true
min_ram_gb = 2
[[versions.require]]
component = "app"
minimum = "2.4"
[coordinator]
listen = "127.0.0.1:{port}"
state_dir = "{tmp_path / "state"}"
certificates = "{tmp_path / "certs"}"
enrollment_tokens = [{{ token = "{TOKEN}", max_uses = 5 }}]
retry_after_s = 0.3
grace_s = 1
linger_s = 1
"""
    )
    waiting = GOOD | {"charging": False, "ram_gb": 4.0}
    phones: list[Facts] = [
        waiting,  # plugged in later: trains
        waiting,  # plugged in later: trains
        waiting,  # never plugged in: retry later, counted under "charging"
        {"charging": True, "app_version": "2.5.0", "ram_gb": 1.0},  # WiFi unknown, too little RAM
        GOOD | {"ram_gb": 4.0, "app_version": "2.3.0"},  # outside the matrix: INCOMPATIBLE
    ]
    files = [tmp_path / f"phone-{index}.json" for index in range(len(phones))]
    for path, facts in zip(files, phones, strict=True):
        set_state(path, facts)
    shoal = [sys.executable, "-m", "shoal"]
    # this checkout's shoal, whatever the folder a process starts in
    source = str(Path(shoal_package.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    logs = [(tmp_path / f"{name}.log").open("wb") for name in ("coordinator", *map(str, files))]
    coordinator = subprocess.Popen(
        [*shoal, "coordinator", "serve", "--config", str(config)],
        stdout=logs[0],
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )
    processes = []
    for index, path in enumerate(files):
        log = logs[index + 1]
        processes.append(
            subprocess.Popen(
                [*shoal, "client", "run", "--coordinator", f"127.0.0.1:{port}",
                 "--config", str(config), "--state-dir", str(tmp_path / f"phone-{index}"),
                 "--token", TOKEN, "--ca", str(tmp_path / "certs" / "ca.pem"),
                 "--partition-index", str(index), "--option", f"state_file={path}"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        )  # fmt: skip
    try:
        # round 1 waits: nobody is eligible until every phone has checked in and been told why
        wait_until(lambda: len(told(tmp_path)) == len(phones), coordinator, tmp_path)
        for path in files[:2]:
            set_state(path, waiting | {"charging": True})
        assert coordinator.wait(timeout=200) == 0, read_log(tmp_path)
    finally:
        for process in [*processes, coordinator]:
            if process.poll() is None:
                process.terminate()
        for process in [*processes, coordinator]:
            process.wait(timeout=30)
        for log in logs:
            log.close()
    text = (tmp_path / "state" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    fits = [row for row in rows if row["phase"] == "fit"]
    assert [(row["round"], row["selected"], row["reported"]) for row in fits] == [
        (1, 2, 2),
        (2, 2, 2),
    ]
    # each criterion counted the distinct phones it turned away; phone 3 failed two
    assert fits[0]["excluded"] == {"charging": 3, "wifi": 1, "ram": 1, "versions": 1}
    assert all(count <= 1 for count in list(fits[1]["excluded"].values())[1:])
    said = [Path(f"{path}.log").read_text() for path in files]
    for index in (0, 1):
        assert "round 1 fit" in said[index] and "round 2 fit" in said[index], said[index]
    for index in (2, 3, 4):
        assert " fit: " not in said[index], said[index]
    assert "not eligible now: not charging" in said[2]
    assert "not eligible now: WiFi is unknown; 1 GB of RAM is below the minimum 2" in said[3]
    assert "incompatible: app version 2.3.0 is below the minimum 2.4" in said[4]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def told(tmp_path: Path) -> dict[str, str]:
    """The clients the coordinator has told why they may not train, with the reason."""
    folder = tmp_path / "state" / "registry"
    if not (folder / "registry.db").exists():
        return {}
    try:
        with open_database(None, folder=folder) as database:
            records = ClientRegistry(database).list()
    except RegistryError:  # the coordinator is still creating it
        return {}
    return {r.client_id: r.eligibility.reason or "" for r in records if not r.eligibility.can_train}


def read_log(tmp_path: Path) -> str:
    return (tmp_path / "coordinator.log").read_text(errors="replace")[-6000:]


def wait_until(
    condition: Callable[[], bool], coordinator: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    deadline = time.monotonic() + 150
    while not condition():
        if time.monotonic() > deadline or coordinator.poll() is not None:
            raise AssertionError(f"the phones were not all told why\n{read_log(tmp_path)}")
        time.sleep(0.2)


def test_a_deployed_coordinators_rows_hold_the_fleet_telemetry_by_device_class(
    tmp_path: Path,
) -> None:
    phones = [GOOD, GOOD, GOOD | {"device_class": "tablet"}, GOOD | {"device_class": "tablet"}]
    config = phone_job(
        tmp_path, len(phones), run={"rounds": 1}, evaluation={"every": 1, "clients": 4}
    )
    enroll_ahead(tmp_path, config, phones)
    _, ledger, _ = asyncio.run(serve_phones(tmp_path, config, phones))
    fit = ledger.fit_rows()[0]
    evaluation = next(row for row in ledger.rows if row["phase"] == "evaluate")
    for row in (fit, evaluation):
        assert row["drop_rate"] == (row["selected"] - row["reported"]) / row["selected"]
        assert 0 < row["rtt_p50_s"] <= row["rtt_p90_s"] <= row["rtt_p99_s"]
        # the clients measured their own training: a part of each round trip
        assert 0 < row["train_p50_s"] <= row["rtt_p99_s"]
        assert 0 < row["straggler_index"] < 1
        assert set(row["fairness"]) == {"phone", "tablet"}
        assert row["fairness"]["tablet"]["population_share"] == 0.5
        shares = [entry["participation_share"] for entry in row["fairness"].values()]
        assert sum(shares) == pytest.approx(1.0)
        assert row["bytes_down_per_client"] == row["bytes_down"] / row["selected"]
        assert "shoal_train_s" not in row  # reserved: the clients' timing, not a metric
    assert all(entry["accuracy"] is not None for entry in evaluation["fairness"].values())
    assert evaluation["fairness_gap"] is not None
    summary = json.loads((Path(config.coordinator.state_dir) / "summary.json").read_text())
    assert summary["straggler_index"] is not None and summary["drop_rate"] is not None
