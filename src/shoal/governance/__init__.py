"""Governance and trust: what the platform accepts, from whom, and the proof of it."""

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

__all__ = [
    "MODEL_SIGNING_CONTEXT",
    "PUBLIC_KEY_FILE",
    "SIGNING_KEY_FILE",
    "ModelSigner",
    "PinnedKey",
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
