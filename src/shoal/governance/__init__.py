"""Governance and trust: what the platform accepts, from whom, and the proof of it.

The Rego policy that every update passes (:mod:`.policy`) and the coordinator's
signature on every model version (:mod:`.model_signing`).
"""

from shoal.governance.model_signing import (
    MODEL_SIGNING_CONTEXT,
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    ModelSigner,
    PinnedKey,
    generate_signing_key,
    key_id_of,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_pem,
    version_message,
    write_public_key,
    write_signing_key,
)
from shoal.governance.policy import (
    DEFAULT_POLICY,
    ENTRYPOINT,
    POLICY_ERROR,
    Decision,
    PolicyBounds,
    PolicyEngine,
    Reason,
    UpdateFacts,
)

__all__ = [
    "DEFAULT_POLICY",
    "ENTRYPOINT",
    "MODEL_SIGNING_CONTEXT",
    "POLICY_ERROR",
    "PUBLIC_KEY_FILE",
    "SIGNING_KEY_FILE",
    "Decision",
    "ModelSigner",
    "PinnedKey",
    "PolicyBounds",
    "PolicyEngine",
    "Reason",
    "UpdateFacts",
    "generate_signing_key",
    "key_id_of",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "public_pem",
    "version_message",
    "write_public_key",
    "write_signing_key",
]
