"""User-level DP over real gRPC on 127.0.0.1: the budget stops training, clients clip, SecAgg+."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.cli.network import privacy_line
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import Config, parse_config
from shoal.coordinator.server import CoordinatorParts, build, serve
from shoal.core import ConfigError
from shoal.core.device import DeviceState
from shoal.privacy.accounting import PrivacyAccountant
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    ModelRegistry,
    blob_location,
    registry_location,
)
from shoal.registry.privacy import PrivacyLedger
from shoal.secure.client import Contribution
from shoal.tasks import TRAIN_TIME_METRIC
from shoal.transport.signing import generate_client_key
from support.jobs import digits_client, network_job
from support.links import RecordingLink, Upload

pytestmark = pytest.mark.timeout(120)

TOKEN = "private-token"
RUN = "run-private"
CLIENTS = 6
PER_ROUND = 4
CLIP_NORM = 0.05  # well below a digits update: every client has to clip
NOISE_MULTIPLIER = 2.0
DELTA = 1e-5
BUDGET = 3.3  # between the epsilon of two rounds (2.91) and of three (3.77)
ROUNDS = 5


def job_sections(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    base = network_job(
        tmp_path,
        run_id=RUN,
        token=TOKEN,
        clients=CLIENTS,
        per_round=PER_ROUND,
        run={"rounds": ROUNDS, "seed": 3},
        round={"quorum": 0.75, "deadline_s": 20},
    )
    for name, section in sections.items():
        base[name] = base.get(name, {}) | section
    return base


def job_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    return parse_config(job_sections(tmp_path, **sections))


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """The job as a TOML file (JSON's strings, numbers, booleans and lists are TOML's)."""
    lines = []
    for name, section in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in section.items())
    return "\n".join(lines) + "\n"


async def serve_with_clients(
    tmp_path: Path,
    config: Config,
    *,
    clients: int,
    uploads: list[Upload],
    rounds: list[dict[str, Any]],
) -> tuple[CoordinatorParts, int]:
    """Serve ``config`` in this process to ``clients`` digits clients until the job ends.

    Returns the parts and the first round the coordinator was to play.
    """
    runtimes: list[ClientRuntime] = []
    links: list[RecordingLink] = []
    tasks: list[asyncio.Task[None]] = []
    first: list[int] = []

    def on_ready(port: int, first_round: int) -> None:
        first.append(first_round)
        for index in range(clients):
            link = RecordingLink(f"127.0.0.1:{port}", uploads, enrollment_token=TOKEN)
            enrollment = load_or_create_enrollment(tmp_path / f"c{index}", generate_client_key)
            client = digits_client(index, CLIENTS)
            runtime = ClientRuntime(
                client, link, enrollment, backoff=Backoff(0.01, 0.1), seed=index
            )
            links.append(link)
            runtimes.append(runtime)
            tasks.append(asyncio.create_task(runtime.run()))

    try:
        parts = await asyncio.wait_for(
            serve(config, insecure=True, on_round=rounds.append, on_ready=on_ready), timeout=90
        )
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        for link in links:
            await link.close()
    return parts, first[0]


def enroll_ahead(tmp_path: Path, config: Config, clients: int) -> None:
    """Enroll the clients' identities before the coordinator starts: every round sees them all."""
    database = registry_location(Path(config.coordinator.state_dir), None).open()
    try:
        registry = ClientRegistry(database)
        for index in range(clients):
            enrollment = load_or_create_enrollment(tmp_path / f"c{index}", generate_client_key)
            registry.enroll(enrollment.client_id, DeviceState(), public_key=enrollment.public_key)
    finally:
        database.close()


def expected_stop_round() -> tuple[int, list[float]]:
    """The first round that would pass the budget, and the epsilon after each round before it."""
    accountant = PrivacyAccountant(method="rdp", sampling="fixed", conversion="improved")
    spent: list[float] = []
    for round_number in range(1, 100):
        accountant.compose(
            noise_multiplier=NOISE_MULTIPLIER, sample_size=PER_ROUND, population=CLIENTS
        )
        epsilon = accountant.epsilon(delta=DELTA)
        if epsilon > BUDGET:
            return round_number, spent
        spent.append(epsilon)
    raise AssertionError("the budget is never spent")


def test_the_budget_stops_a_central_dp_job_over_grpc_and_a_restart_stays_stopped(
    tmp_path: Path,
) -> None:
    stop, spent = expected_stop_round()
    assert 1 < stop <= ROUNDS  # the job would go on without the budget
    privacy = {
        "placement": "central",
        "noise_multiplier": NOISE_MULTIPLIER,
        "epsilon": BUDGET,
        "delta": DELTA,
        "clip_norm": CLIP_NORM,
    }
    sections = job_sections(tmp_path, privacy=privacy)
    config = parse_config(sections)
    enroll_ahead(tmp_path, config, CLIENTS)  # the population is all six from round 1 on
    uploads: list[Upload] = []
    rounds: list[dict[str, Any]] = []
    parts, first_round = asyncio.run(
        serve_with_clients(tmp_path, config, clients=CLIENTS, uploads=uploads, rounds=rounds)
    )
    assert first_round == 1
    reason = parts.stop_reason
    assert reason is not None and f"round {stop} would spend" in reason
    fit = [row for row in rounds if row["phase"] == "fit"]
    assert [row["round"] for row in fit] == list(range(1, stop))
    assert all(row["committed"] for row in fit)
    for row, epsilon in zip(fit, spent, strict=True):  # each round accounted once
        assert row["epsilon"] == pytest.approx(epsilon, rel=1e-6)
        assert row["delta"] == DELTA
        assert (row["population"], row["sampling_rate"]) == (CLIENTS, PER_ROUND / CLIENTS)
    line = privacy_line(fit[-1])
    assert line is not None and f"epsilon {spent[-1]:.4f}" in line

    # what left the devices: clipped to the norm, and the clients said they had to clip
    assert len(uploads) >= (stop - 1) * 3
    norms = [float(np.linalg.norm(update)) for _, update, _ in uploads]
    assert max(norms) <= CLIP_NORM * (1 + 1e-5)
    assert all(metrics["dp_unclipped"] == 0.0 for _, _, metrics in uploads)
    # no training loss: what the update says is its clipping, and how long it trained
    assert all(set(metrics) == {"dp_unclipped", TRAIN_TIME_METRIC} for _, _, metrics in uploads)
    assert all(row["loss"] is None for row in fit)

    # the versions and the ledger in the registry
    state_dir = Path(config.coordinator.state_dir)
    database = registry_location(state_dir, None).open()
    try:
        models = ModelRegistry(database, BlobStore(blob_location(state_dir, None)))
        versions = [record for record in models.list(RUN) if record.round > 0]
        assert [record.round for record in versions] == list(range(1, stop))
        for record, epsilon in zip(versions, spent, strict=True):
            assert record.metrics["epsilon"] == pytest.approx(epsilon, rel=1e-6)
            assert record.metrics["delta"] == DELTA
            assert record.metrics["clip_norm"] == pytest.approx(CLIP_NORM)
        ledger = PrivacyLedger(database)
        assert [entry.round for entry in ledger.rounds(RUN)] == list(range(1, stop))
        assert ledger.locked(RUN) == reason
    finally:
        database.close()

    # a restart on the same state stops again at once, without a client or a round
    restarted: list[dict[str, Any]] = []
    parts, first_round = asyncio.run(
        serve_with_clients(tmp_path, config, clients=0, uploads=uploads, rounds=restarted)
    )
    assert first_round == stop
    assert parts.stop_reason == reason
    assert restarted == []
    assert parts.privacy is not None and parts.privacy.locked_reason == reason

    # ... and `shoal coordinator serve` says why
    job = tmp_path / "job.toml"
    job.write_text(toml_text(sections))
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["coordinator", "serve", "--config", str(job), "--insecure"]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "differential privacy: central, budget epsilon 3.3" in output
    assert f"training stopped: {reason}" in output


def test_distributed_dp_with_secagg_plus_commits_a_round_over_grpc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contributions: list[Contribution] = []

    def recording(*args: Any, **kwargs: Any) -> Contribution:
        contribution = Contribution(*args, **kwargs)
        contributions.append(contribution)
        return contribution

    monkeypatch.setattr("shoal.client.handler.Contribution", recording)
    privacy = {
        "placement": "distributed",
        "noise_multiplier": 1.0,
        "clip_norm": CLIP_NORM,
    }
    secure = {
        "protocol": "secagg+",
        "clip": 1.0,
        "advertise_keys_s": 20,
        "share_keys_s": 20,
        "unmask_s": 20,
    }
    config = job_config(tmp_path, run={"rounds": 1}, privacy=privacy, secure_aggregation=secure)
    uploads: list[Upload] = []
    rounds: list[dict[str, Any]] = []
    parts, _ = asyncio.run(
        serve_with_clients(tmp_path, config, clients=CLIENTS, uploads=uploads, rounds=rounds)
    )
    assert uploads == []  # only masked inputs left the devices
    assert parts.stop_reason is None
    [row] = rounds
    assert row["committed"] and not row["secure_aborted"]
    assert row["secure_aggregation"] == "secagg+"
    assert row["epsilon"] > 0 and row["clip_norm"] == pytest.approx(CLIP_NORM)
    assert len(contributions) >= row["reported"] >= 3
    share = 1.0 * CLIP_NORM / np.sqrt(3)  # z C / sqrt(min_clients): the fewest still add up
    for contribution in contributions:
        assert float(np.linalg.norm(contribution.update)) <= CLIP_NORM * (1 + 1e-5)
        assert contribution.uniform_weight
        assert contribution.noise_std == pytest.approx(share)
        assert contribution.noise is not None


def test_a_strategy_that_dp_cannot_serve_is_refused_before_anything_opens(
    tmp_path: Path,
) -> None:
    config = job_config(
        tmp_path,
        privacy={"placement": "central", "noise_multiplier": 1.0},
        strategy={"name": "fedmedian"},
    )
    with pytest.raises(ConfigError, match="mean of clipped updates"):
        build(config)
    assert not (tmp_path / "state").exists()


def test_adaptive_clipping_resumes_from_the_last_committed_round_after_a_restart(
    tmp_path: Path,
) -> None:
    privacy = {
        "placement": "central",
        "noise_multiplier": NOISE_MULTIPLIER,
        "delta": DELTA,
        "clip_norm": CLIP_NORM,
        "adaptive_clipping": True,
    }
    config = job_config(tmp_path, privacy=privacy, run={"rounds": 2})
    rounds: list[dict[str, Any]] = []
    asyncio.run(serve_with_clients(tmp_path, config, clients=CLIENTS, uploads=[], rounds=rounds))
    fit = [row for row in rounds if row["phase"] == "fit" and row["committed"]]
    assert [row["round"] for row in fit] == [1, 2]

    later = job_config(tmp_path, privacy=privacy, run={"rounds": 4})
    parts = build(later)
    try:
        # the restart resumes from HEAD: round 2's version, or round 1's when the playbook
        # marked round 2 BAD and rolled back (the CSPRNG's noise makes either happen)
        head = parts.records.head()
        assert head is not None
        (left,) = [row["next_clip_norm"] for row in fit if row["model_version"] == head.version]
        # every client clipped, but the count of unclipped updates is noised (from the CSPRNG,
        # as a coordinator must): the norm moved, and the restart must take it as it is
        assert left != pytest.approx(CLIP_NORM)
        assert parts.privacy is not None
        assert parts.privacy.coordinator.clip.clip_norm == pytest.approx(left)
    finally:
        parts.database.close()
