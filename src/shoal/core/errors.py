"""Shoal's exception hierarchy: every error the platform raises on purpose.

    ShoalError
    ├── ConfigError            a configuration key or value is not allowed
    ├── ModelError             a parameter vector or layout is inconsistent
    │   └── IntegrityError     a blob's sha256 does not match its content
    ├── StrategyError          an aggregator or optimizer cannot run as configured
    ├── ProtocolError          an event is illegal in the current state
    │   └── IllegalTransition  the round state machine refused an event
    ├── ClientError            a client failed while fitting or evaluating
    ├── DataError              a dataset or partition request cannot be met
    │   └── FeatureError       a feature module failed on records
    ├── RunError               a run folder is missing, corrupt or incompatible
    ├── RegistryError          the client or model registry refused or failed a request
    │   └── NotFoundError      no such client or model version
    ├── TransportError         a peer could not be reached or broke the protocol, or an
    │                          address could not be listened on
    ├── SecurityError          a signature, certificate or credential is not acceptable
    └── MissingExtraError      an optional dependency is not installed

Foreign errors (numpy, safetensors, pydantic, torch, sqlalchemy, grpc,
cryptography) are translated into this
hierarchy at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base class of every error Shoal raises on purpose."""


class ConfigError(ShoalError):
    """A configuration key or value is not allowed."""


class ModelError(ShoalError):
    """A parameter vector, layout or tensor is inconsistent."""


class IntegrityError(ModelError):
    """Content does not match the sha256 that was recorded for it."""


class StrategyError(ShoalError):
    """An aggregator, server optimizer or preset cannot run as configured."""


class ProtocolError(ShoalError):
    """An event is not acceptable in the protocol's current state."""


class IllegalTransition(ProtocolError):
    """The round state machine refused an event in its current state."""


class ClientError(ShoalError):
    """A client raised while fitting or evaluating."""


class DataError(ShoalError):
    """A dataset or partitioning request cannot be satisfied."""


class FeatureError(DataError):
    """A feature module could not compute the features of records (a trap, its own failure
    code, an output that is not finite). Its text may carry what the module computed from the
    records: a client keeps it in its own log."""


class RunError(ShoalError):
    """A run folder is missing, corrupt, or incompatible with the request."""


class RegistryError(ShoalError):
    """The client or model registry refused or failed a request."""


class NotFoundError(RegistryError):
    """No client or model version has the requested id."""


class TransportError(ShoalError):
    """A network peer could not be reached or broke the protocol, or an address could not be
    listened on."""


class BusyError(TransportError):
    """The peer answered, but refuses calls for now (gRPC's ``RESOURCE_EXHAUSTED``: too many
    calls at once, or too many bad enrollment tokens from this address): retried like an
    unreachable peer, and said so."""


class SecurityError(ShoalError):
    """A signature, certificate, credential or nonce is not acceptable."""


class MissingExtraError(ShoalError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, *, extra: str, package: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the '{package}' package: install it with pip install 'shoal[{extra}]'"
        )
        self.extra = extra
        self.package = package
