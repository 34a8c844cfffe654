"""``shoal coordinator serve``: the registries, the engine, the driver and gRPC, put together.

Durability: every committed model goes to the model registry (blob, then
row, then HEAD) with the server optimizer's state before any client is
offered work on it. A coordinator killed at any moment restarts from HEAD:
it replays the round in progress, never a committed one, and clients, who
keep retrying, reconnect by themselves.

With ``[secure_aggregation] protocol = "secagg+"`` every fit round runs
SecAgg+ over the network; a setting that cannot work (a strategy that needs
each update, quantization that could overflow) is refused before anything
is opened. With ``protocol = "ckks"`` the silos send CKKS ciphertexts; the
coordinator adds them and asks the key holder at ``key_holder`` (``shoal
keyholder serve``, never this process) for the sum, having fetched only the
public context from it; with ``silo_keys`` it also checks every receipt on
arrival.

With ``[privacy]`` on, the run's :class:`RunPrivacy` lives beside the
engine: before each fit round the driver asks it whether the budget allows
the round (a refusal stops training and locks the run in the registry's
ledger, so a restarted coordinator stops again at once); clients past their
own budget are never candidates; and each fit round is accounted exactly
once, a committed one before its model is kept, so that the version's
metrics carry the epsilon it cost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shoal.apps.loading import load_app
from shoal.config import Config
from shoal.coordinator.driver import Decrypt, DriverSettings, RoundDriver
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import CommitVersion, RequestDecryption, RoundSummary
from shoal.coordinator.homomorphic import CKKS
from shoal.coordinator.rounds import RoundSettings
from shoal.coordinator.secure import SecureSettings
from shoal.coordinator.selection import cohort_size
from shoal.coordinator.service import CoordinatorService, ServiceSettings
from shoal.coordinator.setup import (
    connect_key_holder,
    round_settings_from_config,
    secure_settings_from_config,
    strategy_from_config,
)
from shoal.core.errors import ConfigError
from shoal.core.parameters import Parameters
from shoal.core.transforms import state_from_bytes, state_to_bytes
from shoal.privacy.coordinator import check_private_strategy
from shoal.privacy.run import RunPrivacy
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    Database,
    ModelRegistry,
    SelectionCriteria,
    Selector,
    blob_location,
    registry_location,
)
from shoal.secure.keyholder import read_silo_keys
from shoal.tasks import Phase
from shoal.transport._generated import coordinator_pb2_grpc as pb_grpc
from shoal.transport.certs import (
    CA_CERTIFICATE,
    SERVER_CERTIFICATE,
    SERVER_KEY,
    CertificateFiles,
    load_server_credentials,
)
from shoal.transport.keyholder_service import KeyHolderClient

log = logging.getLogger("shoal.coordinator")

SERVICE_NAME = "shoal.v1.Coordinator"
SEEN_WITHIN = timedelta(minutes=2)


@dataclass
class CoordinatorParts:
    """Everything a running coordinator holds, built from a config."""

    database: Database
    models: ModelRegistry
    clients: ClientRegistry
    driver: RoundDriver
    service: CoordinatorService
    privacy: RunPrivacy | None = None
    key_holder: KeyHolderClient | None = None  # a homomorphic job's connection to its key holder

    def close(self) -> None:
        """Release the registry database and the key holder's channel."""
        self.database.close()
        if self.key_holder is not None:
            self.key_holder.close()


def build(
    config: Config, *, on_round: Callable[[RoundSummary], None] | None = None
) -> CoordinatorParts:
    """Open the registries, restore HEAD (or commit the initial model), wire the driver.

    Under DP, ``on_round`` gets each fit round's summary with the privacy
    fields (epsilon, delta, noise_multiplier, clip_norm) in its metrics.
    """
    section = config.coordinator
    if config.privacy.enabled:
        check_private_strategy(strategy_from_config(config))  # refused before opening
    key_holder = _key_holder(config)
    try:
        secure = secure_settings_from_config(
            config,
            run_id=section.run_id,
            public_context=None if key_holder is None else key_holder.public_context(),
            silo_keys=_silo_public_keys(config),
        )
    except BaseException:
        if key_holder is not None:
            key_holder.close()
        raise
    state_dir = Path(section.state_dir)
    database = registry_location(state_dir, section.registry_url).open()
    models = ModelRegistry(database, BlobStore(blob_location(state_dir, section.blob_url)))
    clients = ClientRegistry(database)
    settings = round_settings_from_config(config)
    try:
        privacy = _run_privacy(config, settings, clients)
        if privacy is not None:
            privacy.open(database)  # replays what the run spent before a restart
        coordinator, first_round = _restore(config, models, settings, secure, privacy)
    except BaseException:
        database.close()
        if key_holder is not None:
            key_holder.close()
        raise
    selector = Selector(clients)
    # the versioning matrix of this model decides who may train it
    criteria = SelectionCriteria(
        model=config.model.kind, require_charging=False, require_wifi=False, seen_within=SEEN_WITHIN
    )
    wanted = cohort_size(
        target=config.round.clients_per_round, over_selection=config.round.over_selection
    )
    accounting = _PrivacyAccounting(privacy)

    def candidates() -> list[str]:
        if privacy is None:
            return selector.select(criteria, wanted)
        barred = privacy.barred()  # past their own budget: never selected again
        drawn = selector.select(criteria, wanted + len(barred))
        return [client for client in drawn if client not in barred][:wanted]

    async def persist(commit: CommitVersion) -> None:
        metrics = {**commit.summary.metrics, **accounting.committed(commit.summary)}
        models.commit(
            section.run_id,
            commit.parameters,
            round=commit.round,
            architecture_version=config.model.kind,
            metrics=_finite(metrics),
            state=state_to_bytes(coordinator.optimizer_state),
        )

    def round_closed(summary: RoundSummary) -> None:
        summary = accounting.closed(summary)
        if on_round is not None:
            on_round(summary)

    driver = RoundDriver(
        coordinator,
        DriverSettings(
            rounds=config.run.rounds,
            first_round=first_round,
            evaluate_every=config.evaluation.every,
            retry_after_s=section.retry_after_s,
        ),
        candidates=candidates,
        persist=persist,
        on_round=round_closed,
        before_round=None if privacy is None else privacy.before_round,
        decrypt=None if key_holder is None else _decryptor(key_holder, section.run_id),
    )
    service_settings = ServiceSettings(
        run_id=section.run_id,
        enrollment_tokens=frozenset(section.enrollment_tokens),
        max_update_bytes=int(section.max_update_mb * 2**20),
        criteria=replace(criteria, seen_within=None),  # a check-in is itself a sighting
    )
    service = CoordinatorService(driver, clients, service_settings, selector=selector)
    return CoordinatorParts(database, models, clients, driver, service, privacy, key_holder)


def _key_holder(config: Config) -> KeyHolderClient | None:
    """The key holder of a homomorphic job; a networked one must run apart (its own command)."""
    section = config.secure_aggregation
    if section.protocol != CKKS:
        return None
    if section.key_holder is None:
        raise ConfigError(
            "secure_aggregation.protocol = 'ckks' over the network needs "
            "secure_aggregation.key_holder = HOST:PORT of `shoal keyholder serve`: "
            "the coordinator never holds the secret key"
        )
    return connect_key_holder(section)


def _silo_public_keys(config: Config) -> dict[str, bytes] | None:
    """The silos' receipt keys, to check every encrypted update as it arrives (optional)."""
    path = config.secure_aggregation.silo_keys
    if config.secure_aggregation.protocol != CKKS or path is None:
        return None
    return {silo: keys.public for silo, keys in read_silo_keys(Path(path)).items()}


def _decryptor(key_holder: KeyHolderClient, run_id: str) -> Decrypt:
    """Ask the key holder for a round's sum, off the event loop (it is a blocking call)."""

    async def decrypt(action: RequestDecryption) -> npt.NDArray[np.float64]:
        return await asyncio.to_thread(
            key_holder.decrypt_aggregate,
            run_id=run_id,
            round=action.round,
            aggregate=action.aggregate,
            receipts=action.receipts,
        )

    return decrypt


def _run_privacy(
    config: Config, settings: RoundSettings, clients: ClientRegistry
) -> RunPrivacy | None:
    """The run's DP, sized by the clients enrolled so far or the configured population."""
    if not config.privacy.enabled:
        return None
    return RunPrivacy(
        config,
        population=max(clients.count(), config.data.num_clients),
        clients_per_round=settings.clients_per_round,
        min_clients=settings.quorum_count(Phase.FIT),
        run_id=config.coordinator.run_id,
    )


class _PrivacyAccounting:
    """Accounts each fit round once: a committed one when it is persisted, any other on closing.

    The driver persists a committed round before it reports the round
    closed; the fields accounted then are handed on to the closing, so
    the ledger sees every fit round once and the version keeps its epsilon.
    """

    def __init__(self, privacy: RunPrivacy | None) -> None:
        self.privacy = privacy
        self._accounted: dict[int, dict[str, Any]] = {}  # committed, not yet reported closed

    def committed(self, summary: RoundSummary) -> dict[str, Any]:
        """The privacy fields of a committed fit round, accounted in the ledger."""
        if self.privacy is None or summary.phase is not Phase.FIT:
            return {}
        fields = self.privacy.row_fields(summary)
        self._accounted[summary.round] = fields
        return fields

    def closed(self, summary: RoundSummary) -> RoundSummary:
        """The closed round's summary, with the privacy fields of a fit round in its metrics."""
        if self.privacy is None or summary.phase is not Phase.FIT:
            return summary
        fields = self._accounted.pop(summary.round, None)
        if fields is None:  # not committed: nothing spent, the fields say where the run stands
            fields = self.privacy.row_fields(summary)
        return replace(summary, metrics={**summary.metrics, **fields})


def _restore(
    config: Config,
    models: ModelRegistry,
    settings: RoundSettings,
    secure: SecureSettings | None,
    privacy: RunPrivacy | None,
) -> tuple[Coordinator, int]:
    """The engine at HEAD of the run (first start: the app's initial model as version 0)."""
    strategy = strategy_from_config(config)
    dp = None if privacy is None else privacy.coordinator
    run_id = config.coordinator.run_id
    head = models.head(run_id)
    if head is None:
        initial = load_app(config.coordinator.app)({}).get_parameters()
        coordinator = Coordinator(
            settings=settings,
            strategy=strategy,
            parameters=initial,
            seed=config.run.seed,
            secure=secure,
            privacy=dp,
        )
        models.commit(
            run_id,
            initial,
            round=0,
            architecture_version=config.model.kind,
            state=state_to_bytes(coordinator.optimizer_state),
        )
        return coordinator, 1
    parameters: Parameters = models.load(run_id, head.version)
    template = strategy.server_optimizer.init(parameters.vector)
    saved = models.load_state(run_id, head.version)
    state = template if saved is None else state_from_bytes(template, saved)
    log.info("resuming run %s from version %d (round %d)", run_id, head.version, head.round)
    if privacy is not None:
        privacy.resume(head.metrics)
    coordinator = Coordinator(
        settings=settings,
        strategy=strategy,
        parameters=parameters,
        seed=config.run.seed,
        optimizer_state=state,
        secure=secure,
        privacy=dp,
    )
    return coordinator, head.round + 1


def _finite(metrics: Any) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items() if math.isfinite(value)}


def server_credentials(config: Config, *, insecure: bool) -> grpc.ServerCredentials | None:
    """TLS credentials from the certificates folder; None only when ``insecure`` was asked for."""
    folder = config.coordinator.certificates
    if folder is None:
        if not insecure:
            raise ConfigError(
                "coordinator.certificates: the coordinator needs a certificate folder "
                "(make one with `shoal certs init`), or --insecure to serve in plaintext"
            )
        log.warning(
            "serving WITHOUT TLS (--insecure): updates and models cross the network in clear"
        )
        return None
    base = Path(folder)
    server = CertificateFiles(base / SERVER_CERTIFICATE, base / SERVER_KEY)
    client_ca = base / CA_CERTIFICATE if config.coordinator.mutual_tls else None
    return load_server_credentials(server, client_ca=client_ca)


async def serve(
    config: Config,
    *,
    insecure: bool = False,
    on_round: Callable[[RoundSummary], None] | None = None,
    on_ready: Callable[[int, int], None] | None = None,
) -> CoordinatorParts:
    """Serve until the job is done or SIGTERM/SIGINT; returns the parts for inspection.

    ``on_ready(port, first_round)`` is called once the server listens.
    """
    credentials = server_credentials(config, insecure=insecure)
    parts = build(config, on_round=on_round)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 8 * 2**20),
            ("grpc.max_send_message_length", 8 * 2**20),
        ]
    )
    pb_grpc.add_CoordinatorServicer_to_server(parts.service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listen = config.coordinator.listen
    port = (
        server.add_insecure_port(listen)
        if credentials is None
        else server.add_secure_port(listen, credentials)
    )
    if port == 0:
        raise ConfigError(f"coordinator.listen: cannot bind {listen}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if on_ready is not None:
        on_ready(port, parts.driver.settings.first_round)
    job = asyncio.create_task(parts.driver.run())
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.coordinator.grace_s)
        for task in (job, stop):
            task.cancel()
        await asyncio.gather(job, stop, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        parts.service.heartbeats.flush()
        parts.close()
    if job.done() and not job.cancelled() and job.exception() is not None:
        raise job.exception()  # type: ignore[misc]
    return parts
