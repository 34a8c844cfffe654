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

The run's lifecycle (first commit or resume, the schedule, the privacy
check before each fit round, barred clients, the eligibility policy of
each round, the row stored with each version, the summary) is the run
layer's (:class:`Run`), as in a simulation: the selector draws only clients
that pass ``[selection]``, the versioning matrix of the job's architecture
and the ``[[versions.require]]`` entries in force, and check-ins and
updates are weighed against the same policy. Under DP every fit round is
offered the registry's whole eligible population, which the run layer
accounts for and the engine samples from (``data.num_clients`` plays no
part over the network). The state folder holds ``config.json``,
``metrics.jsonl`` and ``summary.json`` with the same keys, and
``[tracking]`` logs to MLflow. The model is named by ``run.name``.

With ``coordinator.metrics_port`` set, Prometheus' ``/metrics`` is served on
``metrics_host`` (127.0.0.1 unless ``metrics_allow_remote``) from the
coordinator's own registry (:class:`~shoal.telemetry.prometheus.CoordinatorMetrics`):
each stored row's figures, the RPCs by method and verdict with their
latencies, the refusals by reason, the clients seen lately and eligible (as
of the last closed round), and the rounds by outcome.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shoal.client.app import ClientContext
from shoal.config import Config, CoordinatorSection
from shoal.coordinator.app import resolve_apps
from shoal.coordinator.candidates import SEEN_WITHIN, Candidates, Fleet
from shoal.coordinator.driver import Decrypt, DriverSettings, RoundDriver
from shoal.coordinator.events import (
    CommitVersion,
    RequestDecryption,
    RoundSummary,
)
from shoal.coordinator.guesses import trusted_networks
from shoal.coordinator.homomorphic import CKKS
from shoal.coordinator.nonces import NonceJournal
from shoal.coordinator.records import RunRecords
from shoal.coordinator.run import Run, RunParts
from shoal.coordinator.secure import enrolled_identities
from shoal.coordinator.service import (
    CoordinatorService,
    ServiceSettings,
    add_coordinator_service,
)
from shoal.coordinator.setup import (
    attestation_from_config,
    connect_key_holder,
    listed_tokens_from_config,
    policy_from_config,
    round_settings_from_config,
    run_privacy,
    secure_settings_from_config,
    strategy_for,
)
from shoal.coordinator.telemetry import RegistryClasses
from shoal.core.errors import ConfigError
from shoal.core.folders import writable_folder
from shoal.features import FeatureModule
from shoal.privacy.run import RunPrivacy
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    Database,
    HeartbeatBuffer,
    ModelRegistry,
    Selector,
    blob_location,
    registry_location,
)
from shoal.secure.keyholder import read_silo_keys
from shoal.tasks import RunFinished
from shoal.telemetry.prometheus import CoordinatorMetrics, MetricsServer, serve_metrics
from shoal.telemetry.refusals import RefusalLog
from shoal.transport.certs import (
    CA_CERTIFICATE,
    SERVER_CERTIFICATE,
    SERVER_KEY,
    CertificateFiles,
    load_server_credentials,
)
from shoal.transport.chunks import MAX_REQUEST_BYTES
from shoal.transport.keyholder_service import KeyHolderClient
from shoal.transport.listen import (
    EXCLUSIVE_PORT,
    MAX_STREAMS_PER_CONNECTION,
    SILENT_CONNECTIONS_CLOSED,
    bind_server,
)

log = logging.getLogger("shoal.coordinator")

SERVICE_NAME = "shoal.v1.Coordinator"


@dataclass
class CoordinatorParts:
    """Everything a running coordinator holds, built from a config."""

    database: Database
    models: ModelRegistry
    clients: ClientRegistry
    driver: RoundDriver
    service: CoordinatorService
    run: Run
    records: RunRecords
    privacy: RunPrivacy | None = None
    key_holder: KeyHolderClient | None = None  # a homomorphic job's connection to its key holder
    metrics: CoordinatorMetrics = field(default_factory=CoordinatorMetrics)  # for /metrics
    nonces: NonceJournal | None = None  # the replay guard's nonces, kept across a restart
    summary: dict[str, Any] | None = None  # the run's, once it finished (summary.json)

    @property
    def stop_reason(self) -> str | None:
        """Why training stopped before its last round (the privacy budget), if it did."""
        return self.run.stop_reason

    def close(self) -> None:
        """Release the registry database, the policy's and the blob store's threads, the run
        folder's logs and the key holder's channel."""
        if self.nonces is not None:
            self.nonces.close()
        self.run.parts.release()
        self.records.close()  # the state folder's logs and registries, then its hold
        if self.key_holder is not None:
            self.key_holder.close()


RoundCallback = Callable[[dict[str, Any]], None]


def build(
    config: Config,
    *,
    on_round: RoundCallback | None = None,
    search_path: Sequence[str | Path] = (),
    client_app: Any = None,
    server_app: Any = None,
    clock: Callable[[], float] = time.time,
    metrics: CoordinatorMetrics | None = None,
) -> CoordinatorParts:
    """Open the registries and the run (HEAD, or the initial model as version 0), wire the driver.

    ``on_round`` gets each closed round's metrics row, as ``shoal simulate`` writes it;
    ``metrics`` (a new registry by default) is fed every row stored and every refusal.
    ``clock`` (seconds since the epoch) times sightings and replay windows; the
    driver's deadlines run on the event loop's clock.
    """
    section = config.coordinator
    if config.privacy.enabled and not config.privacy.secure_noise:
        raise ConfigError(
            "privacy.secure_noise = false (seeded, predictable noise and cohorts) is for "
            "simulations only: a coordinator draws both from the CSPRNG"
        )
    apps = resolve_apps(config, client=client_app, server=server_app, search_path=search_path)
    strategy = strategy_for(config, apps.server)
    settings = round_settings_from_config(config)
    RunParts(settings, strategy).check(  # before anything opens
        private=config.privacy.enabled, secure=config.secure_aggregation.enabled
    )
    policy = policy_from_config(config)  # a policy file that does not compile: refused here
    state_dir = writable_folder(section.state_dir, what="coordinator.state_dir")
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
    try:
        records = RunRecords.open(  # the state folder is this process's until parts.close()
            state_dir,
            config,
            what="coordinator.state_dir",
            registries=lambda: _registries(state_dir, section),
            model=config.run.name,
            run_id=section.run_id,
        )
    except BaseException:
        if key_holder is not None:
            key_holder.close()
        raise
    database, models, clients = records.database, records.models, records.clients
    metrics = CoordinatorMetrics() if metrics is None else metrics
    records.watch(metrics.observe_row)  # from the first row stored, a resume's recovered ones too
    try:
        attestation = attestation_from_config(section, database)  # keys and verifiers load now
        # planned at the first fit round, for the eligible population it finds
        privacy = run_privacy(config, settings, run_id=section.run_id)
        run = Run(
            config,
            app=apps.server,
            store=records,
            parts=RunParts(settings, strategy, secure, policy),  # secure checked with its settings
            architecture=apps.architecture,
            privacy=privacy,
            where=str(state_dir),
            run_id=section.run_id,
            features=apps.features,
            preprocessing=apps.preprocessing,
        )
        run.classify(RegistryClasses(clients))  # the device classes the clients reported
        if attestation is not None:  # a client refused attestation is selected for no round
            run.bar(attestation.refused)
        coordinator = run.open(lambda: apps.client(_first_context(config, apps.features)))
        if run.first_round > 1:
            log.info("resuming run %s at round %d", config.run.name, run.first_round)
        records.start_tracking(config)
    except BaseException:
        records.close()
        if key_holder is not None:
            key_holder.close()
        raise
    selector = Selector(clients)
    heartbeats = HeartbeatBuffer(clients, clock=clock)  # sightings, written by count and time
    candidates = Candidates(
        selector,
        # the run layer's policy of the round: [selection], [versions] and this model's matrix
        lambda: run.selection_criteria(seen_within=SEEN_WITHIN),
        heartbeats,
        wanted=run.candidates_wanted(),  # with a reserve when the job re-selects after drops
        barred=run.barred,  # suspended, past their own budget, or refused attestation
        clock=clock,
        whole_population=privacy is not None,  # what DP samples from and accounts
    )

    started = time.perf_counter()

    def count_fleet() -> None:
        fleet: Fleet = candidates.fleet()
        metrics.observe_fleet(connected=fleet.connected, eligible=fleet.eligible)

    async def on_closed(summary: RoundSummary, commit: CommitVersion | None) -> None:
        elapsed = run.wall_offset + time.perf_counter() - started
        fields = {"virtual_time_s": round(elapsed, 6), "wall_time_s": round(elapsed, 6)}
        row = run.close_round(summary, commit, fields)
        run.record(row)
        count_fleet()
        if on_round is not None:
            on_round(row)

    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=section.retry_after_s),
        plays=run.plays(),
        candidates=candidates,
        on_closed=on_closed,
        round_config=run.round_config,
        admit=run.admit,
        decrypt=None
        if key_holder is None
        else _decryptor(key_holder, run, address=str(config.secure_aggregation.key_holder)),
        identities=enrolled_identities(clients),
    )
    service_settings = ServiceSettings(
        run_id=section.run_id,
        enrollment_tokens=listed_tokens_from_config(section),
        max_update_bytes=int(section.max_update_mb * 2**20),
        upload_idle_s=section.upload_idle_s,
        criteria=run.selection_criteria,  # at a check-in, itself a sighting: no seen_within
        attestation=attestation,
        enrollment_guesses=section.enrollment_guesses,
        enrollment_guess_window_s=section.enrollment_guess_window_s,
        trusted_proxies=trusted_networks(section.trusted_proxies),
    )
    service = CoordinatorService(
        driver,
        clients,
        service_settings,
        selector=selector,
        heartbeats=heartbeats,
        clock=clock,
        versions=records.head,  # each task names the committed version and its signature
        refusal_log=RefusalLog(log, counter=metrics.refused),
        features=apps.features,
    )
    try:  # a request captured before a restart is refused after it too
        nonces = NonceJournal.open(state_dir, service.admission.replay, now=clock())
    except BaseException:
        run.parts.release()
        records.close()
        if key_holder is not None:
            key_holder.close()
        raise
    count_fleet()  # who the registry last saw, before the first round
    return CoordinatorParts(
        database,
        models,
        clients,
        driver,
        service,
        run,
        records,
        privacy,
        key_holder,
        metrics,
        nonces,
    )


def _registries(
    state_dir: Path, section: CoordinatorSection
) -> tuple[ModelRegistry, ClientRegistry]:
    """The model and client registries of a coordinator (``registry_url``, ``blob_url``)."""
    database = registry_location(state_dir, section.registry_url).open()
    models = ModelRegistry(database, BlobStore(blob_location(state_dir, section.blob_url)))
    return models, ClientRegistry(database)


def _first_context(config: Config, features: FeatureModule | None) -> ClientContext:
    """Where the coordinator's own client of the app stands (for the initial model)."""
    return ClientContext(
        client_id="coordinator",
        partition_index=0,
        num_partitions=config.data.num_clients,
        options=config.app.options,
        seed=config.run.seed,
        config=config,
        features=features,
    )


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


def _decryptor(key_holder: KeyHolderClient, run: Run, *, address: str) -> Decrypt:
    """Ask the key holder for a round's sum, off the event loop (it is a blocking call); the
    answer, or the refusal, is audited with the key holder's address."""

    def decrypt_and_audit(action: RequestDecryption) -> npt.NDArray[np.float64]:
        try:
            total = key_holder.decrypt_aggregate(
                run_id=run.run_id,
                round=action.round,
                aggregate=action.aggregate,
                receipts=action.receipts,
            )
        except Exception as exc:
            run.record_decryption(action.round, key_holder=address, error=str(exc))
            raise
        run.record_decryption(action.round, key_holder=address, error=None)
        return total

    async def decrypt(action: RequestDecryption) -> npt.NDArray[np.float64]:
        return await asyncio.to_thread(decrypt_and_audit, action)

    return decrypt


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


def _metrics_endpoint(config: Config, metrics: CoordinatorMetrics) -> MetricsServer | None:
    """Serve ``/metrics`` where ``[coordinator]`` says (``metrics_port = 0``: nowhere)."""
    section = config.coordinator
    if section.metrics_port == 0:
        return None
    endpoint = serve_metrics(metrics.registry, host=section.metrics_host, port=section.metrics_port)
    log.info(
        "serving Prometheus metrics on http://%s:%d/metrics", section.metrics_host, endpoint.port
    )
    return endpoint


async def serve(
    config: Config,
    *,
    insecure: bool = False,
    on_round: RoundCallback | None = None,
    on_ready: Callable[[int, int], None] | None = None,
    search_path: Sequence[str | Path] = (),
) -> CoordinatorParts:
    """Serve until the job is done or SIGTERM/SIGINT; returns the parts for inspection.

    ``on_ready(port, first_round)`` is called once the server listens.
    """
    credentials = server_credentials(config, insecure=insecure)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", 8 * 2**20),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            SILENT_CONNECTIONS_CLOSED,
            EXCLUSIVE_PORT,
        ],
        # each call may hold a message of up to MAX_REQUEST_BYTES before it is authenticated:
        # this bounds what strangers' calls hold together (more are told RESOURCE_EXHAUSTED)
        maximum_concurrent_rpcs=config.coordinator.max_concurrent_rpcs,
    )
    # the addresses first: one that cannot be bound is refused before the run is opened
    listen = config.coordinator.listen
    port = bind_server(server, listen, credentials, option="coordinator.listen")
    metrics = CoordinatorMetrics()
    endpoint: MetricsServer | None = None
    try:
        endpoint = _metrics_endpoint(config, metrics)
        parts = build(config, on_round=on_round, search_path=search_path, metrics=metrics)
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        await server.stop(None)
        raise
    add_coordinator_service(parts.service, server, observe=metrics.observe_rpc)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if on_ready is not None:
        on_ready(port, parts.run.first_round)
    job = asyncio.create_task(parts.driver.run())
    stop = asyncio.create_task(stopping.wait())
    finished = False
    try:
        await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
        if job.done() and not job.cancelled() and job.exception() is None:
            parts.summary = parts.run.finish()
            finished = True
            reason = parts.stop_reason
            ending = "the run is complete" if reason is None else f"training stopped: {reason}"
            parts.driver.finished = RunFinished(ending)
            # clients checking in now learn that the run is over, and leave
            await asyncio.wait({stop}, timeout=config.coordinator.linger_s)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.coordinator.grace_s)
        for task in (job, stop):
            task.cancel()
        await asyncio.gather(job, stop, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        parts.service.heartbeats.flush()
        try:
            parts.records.end_tracking(finished=finished)  # may fail: the parts close anyway
        finally:
            parts.close()
            if endpoint is not None:
                endpoint.close()
    if job.done() and not job.cancelled() and job.exception() is not None:
        raise job.exception()  # type: ignore[misc]
    return parts
