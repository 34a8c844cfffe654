"""Shoal's registries: enrolled clients and their selection, model versions, and blobs.

Everything lives in one SQLAlchemy database (SQLite by default, PostgreSQL
by URL, see :func:`open_database`) plus a content-addressed blob store
(:class:`BlobStore`, a local folder or any fsspec URL); a coordinator finds
both from its state folder (:func:`registry_location`, :func:`blob_location`).
The database also holds the enrollment tokens (:class:`EnrollmentTokens`),
each run's differential-privacy budget ledger (:class:`PrivacyLedger`), the
policy's decisions on updates (:class:`PolicyDecisionLog`), the
attestation allow-list of client builds (:class:`AllowedBuilds`) and the
tamper-evident audit log (:class:`AuditLog`, :func:`verify_audit_log`).
"""

from shoal.core.device import DeviceState
from shoal.registry.attestations import AllowedBuild, AllowedBuilds, BuildState
from shoal.registry.audit import (
    AuditEntry,
    AuditEvent,
    AuditLog,
    HeadSignature,
    HeadSigner,
    SignedHead,
    head_message,
)
from shoal.registry.audit_verify import (
    AuditProblem,
    AuditReport,
    HeadVerifier,
    holds_signed_head,
    verify_audit_log,
)
from shoal.registry.blobs import BlobStore
from shoal.registry.clients import (
    ClientRecord,
    ClientRegistry,
    Heartbeat,
)
from shoal.registry.database import Database, open_database
from shoal.registry.decisions import DecisionRecord, PolicyDecisionLog
from shoal.registry.heartbeats import HeartbeatBuffer
from shoal.registry.location import RegistryLocation, blob_location, registry_location
from shoal.registry.migrations import MIGRATIONS, SCHEMA_VERSION, Migration, apply_migrations
from shoal.registry.models import (
    ModelRecord,
    ModelRegistry,
    VersionSignature,
    VersionSigner,
)
from shoal.registry.participation import Participation, ParticipationLog
from shoal.registry.privacy import PrivacyBudget, PrivacyLedger, PrivacyRound
from shoal.registry.schema import ClientStatus, ModelStatus, TokenOrigin
from shoal.registry.selector import TRANSIENT_CRITERIA, SelectionCriteria, Selector
from shoal.registry.tokens import (
    EnrollmentToken,
    EnrollmentTokens,
    ListedToken,
    TokenState,
    token_id_of,
)
from shoal.registry.versioning import (
    Component,
    Eligibility,
    Requirement,
    VersionMatrix,
    version_key,
)

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TRANSIENT_CRITERIA",
    "AllowedBuild",
    "AllowedBuilds",
    "AuditEntry",
    "AuditEvent",
    "AuditLog",
    "AuditProblem",
    "AuditReport",
    "BlobStore",
    "BuildState",
    "ClientRecord",
    "ClientRegistry",
    "ClientStatus",
    "Component",
    "Database",
    "DecisionRecord",
    "DeviceState",
    "Eligibility",
    "EnrollmentToken",
    "EnrollmentTokens",
    "HeadSignature",
    "HeadSigner",
    "HeadVerifier",
    "Heartbeat",
    "HeartbeatBuffer",
    "ListedToken",
    "Migration",
    "ModelRecord",
    "ModelRegistry",
    "ModelStatus",
    "Participation",
    "ParticipationLog",
    "PolicyDecisionLog",
    "PrivacyBudget",
    "PrivacyLedger",
    "PrivacyRound",
    "RegistryLocation",
    "Requirement",
    "SelectionCriteria",
    "Selector",
    "SignedHead",
    "TokenOrigin",
    "TokenState",
    "VersionMatrix",
    "VersionSignature",
    "VersionSigner",
    "apply_migrations",
    "blob_location",
    "head_message",
    "holds_signed_head",
    "open_database",
    "registry_location",
    "token_id_of",
    "verify_audit_log",
    "version_key",
]
