"""From a run's config to the coordinator's parts: one place for simulator and server alike."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from shoal.aggregation.strategy import Strategy, clustered_strategy, make_strategy
from shoal.config import Config, CoordinatorSection, SecureAggregationSection
from shoal.coordinator.app import ServerApp
from shoal.coordinator.fallback import DropFallback, FallbackKind
from shoal.coordinator.rounds import RoundSettings
from shoal.coordinator.secure import SecureSettings, check_secure_strategy
from shoal.coordinator.selection import cohort_size, private_cohort
from shoal.core.errors import ConfigError, StrategyError
from shoal.core.limits import is_loopback
from shoal.governance.attestation import AttestationGate, verifiers_for
from shoal.governance.manifest import load_release_public_key
from shoal.governance.policy import PolicyEngine
from shoal.privacy.run import RunPrivacy
from shoal.registry import AllowedBuilds, Database, ListedToken
from shoal.secure.quantization import Quantization
from shoal.tasks import Phase
from shoal.transport.certs import CertificateFiles
from shoal.transport.keyholder_service import KeyHolderClient


def strategy_from_config(config: Config) -> Strategy:
    """The ``[strategy]`` preset with its overrides; a bad combination is a ConfigError."""
    try:
        return make_strategy(config.strategy.name, **config.strategy.model_dump(exclude={"name"}))
    except StrategyError as exc:
        raise ConfigError(f"strategy: {exc}") from None


def strategy_for(config: Config, app: ServerApp) -> Strategy:
    """The server app's strategy (a preset name or composed parts), else ``[strategy]``;
    under ``[clustering] clusters`` above 1, run per cluster (clustered FL), except under
    ``start = "flagged"``: the run's engine goes per cluster when its model splits."""
    chosen = app.strategy
    if chosen is None:
        strategy = strategy_from_config(config)
    elif isinstance(chosen, Strategy):
        strategy = chosen
    else:
        overrides = config.strategy.model_dump(exclude={"name"})
        try:
            strategy = make_strategy(chosen, **overrides)
        except StrategyError as exc:
            raise ConfigError(f"the server app's strategy: {exc}") from None
    if config.clustering.start == "flagged":
        return strategy
    try:
        return clustered_strategy(strategy, clusters=config.clustering.clusters)
    except StrategyError as exc:
        raise ConfigError(f"clustering.clusters: {exc}") from None


log = logging.getLogger("shoal.coordinator")


WEAK_TOKEN_CHARS = 16
"""A listed enrollment token shorter than this is warned about: each guess is one enrollment
request, throttled only per address (``coordinator.enrollment_guesses``: a guesser with many
addresses guesses that much faster), and ``shoal clients enroll`` issues 128-bit random
tokens."""


def listed_tokens_from_config(section: CoordinatorSection) -> list[ListedToken]:
    """``enrollment_tokens``, each with the registry's default uses and lifetime where unset;
    one shorter than :data:`WEAK_TOKEN_CHARS` is warned about."""
    listed = []
    for index, entry in enumerate(section.enrollment_tokens):
        if len(entry.token) < WEAK_TOKEN_CHARS:
            log.warning(
                "coordinator.enrollment_tokens[%d] has %d characters: a short secret can be "
                "guessed online, one enrollment request a guess; use %d or more random "
                "characters, or tokens from `shoal clients enroll`",
                index,
                len(entry.token),
                WEAK_TOKEN_CHARS,
            )
        limits: dict[str, Any] = {}
        if entry.max_uses is not None:
            limits["max_uses"] = entry.max_uses
        if entry.ttl_days is not None:
            limits["ttl"] = timedelta(days=entry.ttl_days)
        listed.append(ListedToken(token=entry.token, expires_at=entry.expires, **limits))
    return listed


def attestation_from_config(
    section: CoordinatorSection, database: Database
) -> AttestationGate | None:
    """The job's attestation check (None when ``coordinator.attestation`` is off).

    Release keys and plugged-in verifiers are loaded now: a missing key file
    or a verifier that does not import is a ConfigError before anything serves.
    """
    if not section.attestation:
        return None
    keys = [load_release_public_key(Path(path)) for path in section.release_keys]
    verifiers = verifiers_for(
        section.attestation, release_keys=keys, plugins=section.attestation_verifiers
    )
    return AttestationGate(verifiers, AllowedBuilds(database))


def round_settings_from_config(config: Config, *, population: int | None = None) -> RoundSettings:
    """The ``[round]``, ``[client]`` and ``[evaluation]`` settings of the engine.

    ``population`` caps the evaluation cohort when the whole population is
    known (a simulation); a live coordinator takes the configured size.
    """
    evaluation_clients = config.evaluation.clients
    if population is not None:
        evaluation_clients = min(evaluation_clients, population)
    return RoundSettings(
        clients_per_round=config.round.clients_per_round,
        over_selection=config.round.over_selection,
        quorum=config.round.quorum,
        deadline_s=config.round.deadline_s,
        evaluation_clients=evaluation_clients,
        epochs=config.client.epochs,
        batch_size=config.client.batch_size,
        learning_rate=config.client.learning_rate,
        max_examples_per_client=config.policy.max_examples,
        fallback=drop_fallback_from_config(config),
        compression=config.compression.codec(),
    )


def drop_fallback_from_config(config: Config) -> DropFallback:
    """``[round] drop_fallback`` and its parameters."""
    section = config.round
    return DropFallback(
        kind=FallbackKind(section.drop_fallback),
        at=section.drop_fallback_at,
        extend_s=section.drop_extend_s,
        reselect_min_left=section.drop_reselect_min_left,
    )


def policy_from_config(config: Config) -> PolicyEngine | None:
    """The job's compiled ``[policy]`` (None when disabled); a bad file is a ConfigError. A
    statistics run's has no bound relative to the round's median: a client whose records
    differ from the others' is what statistics count, never an outlier to refuse."""
    section = config.policy
    if config.statistics.enabled:
        section = section.model_copy(update={"max_relative_l2_norm": 1e300})  # (none)
    return PolicyEngine.from_config(section)


def run_privacy(config: Config, settings: RoundSettings, *, run_id: str) -> RunPrivacy | None:
    """The run's DP (None when ``[privacy]`` is off); planned at its first fit round."""
    if not config.privacy.enabled:
        return None
    return RunPrivacy(
        config,
        cohort=private_cohort(
            sampling=config.privacy.sampling,
            clients_per_round=settings.clients_per_round,
            over_selection=settings.over_selection,
        ),
        clients_per_round=settings.clients_per_round,
        min_clients=settings.quorum_count(Phase.FIT),
        run_id=run_id,
    )


def secure_settings_from_config(
    config: Config,
    *,
    run_id: str,
    public_context: bytes | None = None,
    silo_keys: Mapping[str, bytes] | None = None,
) -> SecureSettings | None:
    """The ``[secure_aggregation]`` settings, checked against the strategy and the cohort size.

    Refused here, before any round runs: a strategy that needs each client's
    update, quantization bits whose sum over the largest cohort could
    overflow the 32-bit modulus, and a graph degree whose rounds would abort
    too often at the expected dropout.
    """
    section = config.secure_aggregation
    if not section.enabled:
        return None
    check_secure_strategy(strategy_from_config(config))
    settings = SecureSettings(
        run_id=run_id,
        quantization=Quantization(
            clip=section.clip,
            bits=section.bits if section.bits is not None else 20,
            max_weight=section.max_weight,
        ),
        fit_bits=section.bits is None,
        headroom_bits=2 if config.privacy.placement == "distributed" else 0,
        degree=section.degree,
        threshold_fraction=section.reconstruction_threshold,
        advertise_keys_s=section.advertise_keys_s,
        share_keys_s=section.share_keys_s,
        unmask_s=section.unmask_s,
        protocol=section.protocol,
        public_context=public_context,
        silo_keys=silo_keys,
        min_contributors=section.min_contributors,
    )
    if section.protocol == "ckks":
        if public_context is None:
            raise ConfigError("secure_aggregation.protocol = 'ckks' needs a key holder")
        return settings
    largest = cohort_size(
        target=config.round.clients_per_round, over_selection=config.round.over_selection
    )
    settings.quantization_for(largest)
    settings.check_dropout(largest, dropout=expected_dropout(config))
    return settings


def expected_dropout(config: Config) -> float:
    """The dropout a secure round must survive: as configured, else the devices' mean."""
    section = config.secure_aggregation
    if section.expected_dropout is not None:
        return section.expected_dropout
    classes = config.devices.classes
    total = sum(device.share for device in classes)
    return sum(device.share * device.dropout for device in classes) / total


def connect_key_holder(section: SecureAggregationSection) -> KeyHolderClient:
    """A connection to ``secure_aggregation.key_holder`` (a ``shoal keyholder serve``).

    A key holder on another machine must be reached over TLS with its CA
    pinned (``key_holder_ca``); only a loopback one may go in plaintext. One
    that requires mutual TLS (``shoal keyholder serve --mutual-tls``) gets
    the coordinator's certificate (``key_holder_certificate`` and
    ``key_holder_key``, issued by that CA).
    """
    address = section.key_holder
    if address is None:
        raise ConfigError("secure_aggregation.key_holder: no key holder address is set")
    host = address.rpartition(":")[0] or address
    if section.key_holder_ca is None and not is_loopback(host):
        raise ConfigError(
            f"secure_aggregation.key_holder = {address!r} is not on this machine: "
            "set secure_aggregation.key_holder_ca to pin its certificate"
        )
    client_certificate = (
        None
        if section.key_holder_certificate is None or section.key_holder_key is None
        else CertificateFiles(Path(section.key_holder_certificate), Path(section.key_holder_key))
    )
    client = KeyHolderClient(
        address,
        ca=section.key_holder_ca,
        client_certificate=client_certificate,
        insecure=section.key_holder_ca is None,
    )
    try:
        client.wait_ready(timeout_s=10.0)
    except BaseException:
        client.close()
        raise
    return client
