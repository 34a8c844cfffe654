"""DP over real gRPC on 127.0.0.1 against a coordinator that lies or knows too little.

- A coordinator that asks a deployed client for seeded noise (``dp_secure_noise
  = false`` in the fit task, and the task's seed it chose itself) would know
  the noise and subtract it: the client decides its noise source alone.
- A coordinator started before its clients enroll must account for the
  population that is there (3 clients), not for ``data.num_clients`` (100),
  which would claim an amplification by sampling that does not exist.
- A population it cannot establish (a registry it cannot read) makes the
  round wait, with the reason in the log; nothing is guessed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.client.api import Client, FitConfig, FitResult
from shoal.client.handler import run_fit
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import Config, parse_config
from shoal.coordinator import Coordinator, RoundSettings
from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.coordinator.schedule import schedule
from shoal.coordinator.selection import client_seed
from shoal.coordinator.server import CoordinatorParts, build, serve
from shoal.core import ClientError, ConfigError, Parameters, RegistryError
from shoal.privacy.accounting import PrivacyAccountant
from shoal.privacy.client import PrivacyFloor
from shoal.privacy.coordinator import (
    CLIP_NORM,
    DISTRIBUTED_NOISE_STD,
    LOCAL_NOISE_STD,
    DpCoordinator,
    DpSettings,
)
from shoal.privacy.noise import NoiseSource
from shoal.tasks import RetryLater, RunFinished, TaskOffer
from shoal.transport.signing import generate_client_key
from support.driving import closing
from support.jobs import digits_client, network_job
from support.links import RecordingLink, Upload

pytestmark = pytest.mark.timeout(120)

TOKEN = "dp-token"
RUN = "run-dp-attack"
CLIP_NORM_VALUE = 0.05
NOISE_MULTIPLIER = 1.0


def job(tmp_path: Path, *, clients: int, per_round: int, **sections: dict[str, Any]) -> Config:
    base = network_job(
        tmp_path,
        run_id=RUN,
        token=TOKEN,
        clients=clients,
        per_round=per_round,
        run={"rounds": 2, "seed": 5},
        round={"quorum": 1.0, "deadline_s": 20},
    )
    for name, section in sections.items():
        base[name] = base.get(name, {}) | section
    return parse_config(base)


async def serve_to(
    tmp_path: Path,
    config: Config,
    *,
    clients: int,
    uploads: list[Upload],
    rows: list[dict],
    floor: PrivacyFloor | None = None,
) -> CoordinatorParts:
    """Serve ``config``; ``clients`` digits clients start (and enroll) only once it listens.

    ``floor`` is the clients' own DP requirement (``shoal client run`` takes it from its job).
    """
    runtimes: list[ClientRuntime] = []
    links: list[RecordingLink] = []
    tasks: list[asyncio.Task[None]] = []

    def on_ready(port: int, first_round: int) -> None:
        for index in range(clients):
            link = RecordingLink(f"127.0.0.1:{port}", uploads, enrollment_token=TOKEN)
            enrollment = load_or_create_enrollment(tmp_path / f"c{index}", generate_client_key)
            runtime = ClientRuntime(
                digits_client(index, clients),
                link,
                enrollment,
                backoff=Backoff(0.01, 0.1),
                privacy_floor=floor,
            )
            links.append(link)
            runtimes.append(runtime)
            tasks.append(asyncio.create_task(runtime.run()))

    try:
        return await asyncio.wait_for(
            serve(config, insecure=True, on_round=rows.append, on_ready=on_ready), timeout=90
        )
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        for link in links:
            await link.close()


def test_a_coordinator_cannot_make_a_deployed_client_use_noise_it_can_predict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = DpCoordinator.fit_extras

    def malicious(self: DpCoordinator) -> dict[str, Any]:  # asks for noise from its own seed
        return honest(self) | {"dp_secure_noise": False, "secure_noise": False}

    monkeypatch.setattr(DpCoordinator, "fit_extras", malicious)
    privacy = {
        "placement": "local",
        "noise_multiplier": NOISE_MULTIPLIER,
        "delta": 1e-5,
        "clip_norm": CLIP_NORM_VALUE,
    }
    config = job(tmp_path, clients=3, per_round=3, privacy=privacy)
    uploads: list[Upload] = []
    rows: list[dict[str, Any]] = []
    asyncio.run(serve_to(tmp_path, config, clients=3, uploads=uploads, rows=rows))
    assert [row["round"] for row in rows if row["committed"]] == [1, 2]
    assert uploads
    std = NOISE_MULTIPLIER * CLIP_NORM_VALUE
    for client_id, update, _ in uploads:
        # the attack: rebuild the noise the task's seed would give, and take it away again
        residuals = []
        for round_number in (1, 2):
            seed = client_seed(seed=config.run.seed, round_number=round_number, client_id=client_id)
            guess = NoiseSource(np.random.default_rng([seed, 0xD1FF])).normal(update.size, std=std)
            residuals.append(float(np.linalg.norm(update - guess.astype(np.float32))))
        # seeded noise would leave the clipped update (norm <= C); the client's own leaves noise
        assert min(residuals) > 10 * CLIP_NORM_VALUE


@pytest.mark.parametrize(
    ("placement", "lie"),
    [
        ("local", {LOCAL_NOISE_STD: 0.0}),  # no noise at all
        ("local", {CLIP_NORM: None}),  # no clipping: the raw update
        ("distributed", {DISTRIBUTED_NOISE_STD: 1e-9}),  # a share that adds up to nothing
    ],
)
def test_a_coordinator_cannot_turn_a_deployed_clients_noise_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, placement: str, lie: dict[str, Any]
) -> None:
    honest = DpCoordinator.fit_extras

    def malicious(self: DpCoordinator) -> dict[str, Any]:
        extras = honest(self) | lie
        return {key: value for key, value in extras.items() if value is not None}

    monkeypatch.setattr(DpCoordinator, "fit_extras", malicious)
    privacy = {"placement": placement, "noise_multiplier": 1.0, "delta": 1e-5, "clip_norm": 0.5}
    extra = {"secure_aggregation": {"protocol": "secagg+"}} if placement == "distributed" else {}
    config = job(tmp_path, clients=3, per_round=3, privacy=privacy, **extra)
    uploads: list[Upload] = []
    rows: list[dict[str, Any]] = []
    floor = PrivacyFloor.of(config)
    asyncio.run(serve_to(tmp_path, config, clients=3, uploads=uploads, rows=rows, floor=floor))
    assert uploads == []  # every client refused before training: nothing left a device
    assert rows and not any(row["committed"] for row in rows)
    reasons = [reason for row in rows for reason in row["failures"]]
    assert reasons and all("refused" in reason for reason in reasons), reasons


def test_the_floor_passes_every_task_an_honest_coordinator_sends() -> None:
    for placement, quorum in (("local", 1.0), ("distributed", 0.5)):
        settings = DpSettings(
            placement=placement,  # type: ignore[arg-type]
            noise_multiplier=0.1,
            clip_norm=2.0,
            clients_per_round=10,
            min_clients=int(quorum * 10),
        )
        extras = DpCoordinator(settings, NoiseSource.secure()).fit_extras()
        PrivacyFloor(placement, min_noise_multiplier=0.1, clients_per_round=10).check(extras)
        with pytest.raises(ClientError, match=r"below this client's floor of 0\.2"):
            PrivacyFloor(placement, min_noise_multiplier=0.2, clients_per_round=10).check(extras)


class Still(Client):
    """A client whose training leaves the model where it was."""

    def get_parameters(self) -> Parameters:
        return Parameters.from_arrays([np.zeros(4, np.float32)])

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        return FitResult([np.zeros(4, np.float32)], 1, {})

    def evaluate(self, parameters: Parameters, config: Any) -> Any:
        raise AssertionError("not evaluated here")


def test_no_key_in_a_task_changes_the_clients_noise_source() -> None:
    model = Still().get_parameters()
    extras = {CLIP_NORM: 1.0, LOCAL_NOISE_STD: 1.0, "dp_secure_noise": False, "secure_noise": False}
    task = FitConfig(round=1, seed=3, extras=extras)
    first, again = run_fit(Still(), model, task), run_fit(Still(), model, task)
    assert first.noise is not None and first.noise.is_secure
    assert not np.array_equal(first.update, again.update)  # same task, same seed: fresh noise


def test_a_coordinator_refuses_seeded_noise_and_cohorts(tmp_path: Path) -> None:
    privacy = {"placement": "central", "noise_multiplier": 1.0, "secure_noise": False}
    config = job(tmp_path, clients=3, per_round=3, privacy=privacy)
    with pytest.raises(ConfigError, match="for simulations only"):
        build(config)
    assert not (tmp_path / "state").exists()


def expected_epsilons(sampling: str, *, population: int, cohort: int, rounds: int) -> list[float]:
    accountant = PrivacyAccountant(method="rdp", sampling=sampling, conversion="improved")  # type: ignore[arg-type]
    spent = []
    for _ in range(rounds):
        if sampling == "poisson":
            accountant.compose(noise_multiplier=NOISE_MULTIPLIER, sampling_rate=cohort / population)
        else:
            accountant.compose(
                noise_multiplier=NOISE_MULTIPLIER, sample_size=cohort, population=population
            )
        spent.append(accountant.epsilon(delta=1 / population))
    return spent


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_clients_enrolled_after_the_start_are_the_population_accounted_not_num_clients(
    tmp_path: Path, sampling: str, caplog: pytest.LogCaptureFixture
) -> None:
    privacy = {
        "placement": "central",
        "noise_multiplier": NOISE_MULTIPLIER,
        "clip_norm": CLIP_NORM_VALUE,
        "sampling": sampling,
    }  # delta unset: 1 / population
    config = job(tmp_path, clients=100, per_round=3, privacy=privacy)  # data.num_clients = 100
    rows: list[dict[str, Any]] = []
    with caplog.at_level(logging.INFO, logger="shoal.coordinator"):
        parts = asyncio.run(serve_to(tmp_path, config, clients=3, uploads=[], rows=rows))
    fit = [row for row in rows if row["phase"] == "fit"]
    assert [row["round"] for row in fit if row["committed"]] == [1, 2]
    expected = expected_epsilons(sampling, population=3, cohort=3, rounds=2)
    for row, epsilon in zip(fit, expected, strict=True):
        assert row["epsilon"] == pytest.approx(epsilon, rel=1e-6)
        assert row["delta"] == pytest.approx(1 / 3)
        assert (row["population"], row["sampling_rate"]) == (3, 1.0)  # no amplification
    summary = json.loads((Path(config.coordinator.state_dir) / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(expected[-1], rel=1e-6)
    assert (summary["delta"], summary["population"]) == (pytest.approx(1 / 3), 3)
    assert parts.stop_reason is None
    assert "round 1 waits:" in caplog.text
    assert "to establish the population privacy is accounted for" in caplog.text


def test_a_registry_that_cannot_be_read_makes_the_round_wait_not_guess(
    caplog: pytest.LogCaptureFixture,
) -> None:
    coordinator = Coordinator(
        settings=RoundSettings(clients_per_round=2, over_selection=1.0, quorum=1.0, deadline_s=30),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(3, np.float32)]),
        seed=1,
    )
    failures = [RegistryError("database is locked"), RegistryError("database is locked")]

    def candidates() -> list[str]:
        if failures:
            raise failures.pop()
        return ["a", "b"]

    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=0.01),
        plays=schedule(rounds=1),
        candidates=candidates,
        on_closed=closing(),
    )

    async def clients() -> None:
        job = asyncio.create_task(driver.run())
        answered: set[str] = set()
        while not job.done():
            for client in ("a", "b"):
                answer = driver.check_in(client)
                if isinstance(answer, TaskOffer) and client not in answered:
                    update = np.ones(3, np.float32)
                    assert driver.submit_update(client, answer.round, update, 1, {}) is None
                    answered.add(client)
                assert isinstance(answer, TaskOffer | RetryLater | RunFinished)
            await asyncio.sleep(0.005)
        await job

    with caplog.at_level(logging.INFO, logger="shoal.coordinator"):
        asyncio.run(asyncio.wait_for(clients(), timeout=20))
    assert failures == []
    assert caplog.text.count("the registry cannot list the eligible clients") == 1
    np.testing.assert_allclose(coordinator.parameters.vector, 1.0)
