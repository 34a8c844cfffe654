"""Signed global models: the coordinator signs every committed version, clients verify it.

A version's signature is Ed25519 over one canonical message
(:func:`version_message`): a context string, then the run id and the model
name (each prefixed by its length), the version and the round (8-byte
big-endian integers) and the 32 raw bytes of the parameters' sha256. No two
versions share an encoding, and a signature over a Shoal model is never
valid for anything else (a request signature has its own context).

The coordinator's key lives in a PEM file created with mode 0600
(:func:`load_or_create_signing_key`); its public half is what clients pin
(:func:`load_public_key`). A key is named by its key id, the first 16 hex
digits of the sha256 of the raw public key.

>>> key = generate_signing_key()
>>> signer = ModelSigner(key, run_id="run-1")
>>> signed = signer(name="global", version=3, round=2, sha256="ab" * 32)
>>> pinned = PinnedKey.of(key.public_key())
>>> pinned.verify(signed, name="global", version=3, round=2, sha256="ab" * 32)
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ConfigError, SecurityError
from shoal.registry import HeadSignature, SignedHead, VersionSignature, head_message

MODEL_SIGNING_CONTEXT = b"shoal.v1/model-version\x00"
"""Domain separation: a model signature is valid for a model version and nothing else."""

SIGNING_KEY_FILE = "model-signing.key"
PUBLIC_KEY_FILE = "model-signing.pub"
KEY_ID_HEX = 16
FEATURES_MARKER = b"\x01"  # a version message's feature module follows
PREPROCESSING_MARKER = b"\x02"  # a version message's scaler follows (after any module)
_SIGNATURE_BYTES = 64


def version_message(
    *,
    run_id: str,
    name: str,
    version: int,
    round: int,
    sha256: str,
    features: str | None = None,
    preprocessing: str | None = None,
) -> bytes:
    """The exact bytes a version signature covers (see the module docstring); a version
    trained with a feature module goes on with a marker byte and the module's sha256, and
    one whose tasks carried a scaler (``[preprocessing]``) with another marker and the
    scaler's sha256 (a version with neither ends at the weights' sha256, as before them)."""
    check_sha256_hex(sha256, "model sha256")
    tail = b""
    if features is not None:
        check_sha256_hex(features, "feature module sha256")
        tail = FEATURES_MARKER + bytes.fromhex(features)
    if preprocessing is not None:
        check_sha256_hex(preprocessing, "scaler sha256")
        tail += PREPROCESSING_MARKER + bytes.fromhex(preprocessing)
    return b"".join(
        (
            MODEL_SIGNING_CONTEXT,
            _length_prefixed(run_id.encode()),
            _length_prefixed(name.encode()),
            struct.pack(">q", version),
            struct.pack(">q", round),
            bytes.fromhex(sha256),
            tail,
        )
    )


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The short name of a public key: 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:KEY_ID_HEX]


def generate_signing_key() -> Ed25519PrivateKey:
    """A new Ed25519 signing key from the operating system's CSPRNG."""
    return Ed25519PrivateKey.generate()


@dataclass(frozen=True, slots=True)
class ModelSigner:
    """Signs the versions one run commits (the model registry calls it once per version)."""

    private_key: Ed25519PrivateKey = field(repr=False)
    run_id: str
    # derived once: the public key is a scalar multiplication (25 µs), and every version and
    # every audit head names it
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_id_of(self.private_key.public_key()))

    def __call__(
        self,
        *,
        name: str,
        version: int,
        round: int,
        sha256: str,
        features: str | None = None,
        preprocessing: str | None = None,
    ) -> VersionSignature:
        message = version_message(
            run_id=self.run_id,
            name=name,
            version=version,
            round=round,
            sha256=sha256,
            features=features,
            preprocessing=preprocessing,
        )
        return VersionSignature(self.run_id, self.key_id, self.private_key.sign(message))

    def audit_head(self, *, seq: int, hash: str) -> HeadSignature:
        """Sign the audit log's head (:func:`shoal.registry.head_message`) with the same key."""
        return HeadSignature(self.key_id, self.private_key.sign(head_message(seq=seq, hash=hash)))


@dataclass(frozen=True, slots=True)
class PinnedKey:
    """The coordinator's public key as a client or an auditor pins it."""

    public_key: Ed25519PublicKey
    key_id: str

    @classmethod
    def of(cls, public_key: Ed25519PublicKey) -> PinnedKey:
        return cls(public_key, key_id_of(public_key))

    def verify(
        self,
        signed: VersionSignature | None,
        *,
        name: str,
        version: int,
        round: int,
        sha256: str,
        features: str | None = None,
        preprocessing: str | None = None,
    ) -> None:
        """Raise ``SecurityError`` with the reason unless ``signed`` is this key's over the facts.

        ``signed.run_id`` is the run the verifier expects (a client: the run
        of its task); a signature made for any other run, name, version,
        round, weights, feature module (``features``, its sha256; None: a
        version trained without one) or scaler (``preprocessing``, its sha256;
        None: none) does not verify.
        """
        if signed is None or not signed.signature:
            raise SecurityError(f"version {version} of {name!r} is not signed")
        if signed.key_id != self.key_id:
            claimed = repr(signed.key_id) if signed.key_id else "(none)"  # the sender's text
            raise SecurityError(
                f"version {version} of {name!r} is signed by key {claimed}, "
                f"not by the pinned key {self.key_id}"
            )
        if len(signed.signature) != _SIGNATURE_BYTES:
            raise SecurityError(
                f"version {version} of {name!r}: an Ed25519 signature has 64 bytes, "
                f"got {len(signed.signature)}"
            )
        message = version_message(
            run_id=signed.run_id,
            name=name,
            version=version,
            round=round,
            sha256=sha256,
            features=features,
            preprocessing=preprocessing,
        )
        try:
            self.public_key.verify(signed.signature, message)
        except InvalidSignature as exc:
            raise SecurityError(
                f"version {version} of {name!r} (round {round}, run {signed.run_id!r}, "
                f"sha256 {sha256[:12]}...) does not match its signature: tampered, or "
                "signed for another version, round, run, feature module or scaler"
            ) from exc

    def verify_audit_head(self, head: SignedHead) -> None:
        """Raise ``SecurityError`` unless ``head`` is this key's signature over its (seq, hash)."""
        if head.key_id != self.key_id:
            raise SecurityError(
                f"the audit head at seq {head.seq} is signed by key {head.key_id or '(none)'}, "
                f"not by the pinned key {self.key_id}"
            )
        try:
            self.public_key.verify(head.signature, head_message(seq=head.seq, hash=head.hash))
        except (InvalidSignature, ValueError) as exc:
            raise SecurityError(
                f"the audit head at seq {head.seq} does not match its signature"
            ) from exc


# --- key files ---------------------------------------------------------------------------


def load_or_create_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The signing key in ``path``; a new one is created there (mode 0600) when it is absent.

    A new key's public half is written beside it as ``model-signing.pub``, for clients to pin.
    """
    path = Path(path)
    if path.exists():
        return load_signing_key(path)
    key = generate_signing_key()
    write_signing_key(path, key)
    write_public_key(path.with_name(PUBLIC_KEY_FILE), key.public_key())
    return key


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (``ConfigError`` naming the file when it is not)."""
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read the model-signing key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise SecurityError(f"the model-signing key {path} is readable by others: chmod 600 {path}")
    return key


def load_public_key(path: str | Path) -> PinnedKey:
    """The coordinator's public key to pin, from a PEM file (``ConfigError`` if it is none)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the coordinator key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return PinnedKey.of(key)


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a public key: the file clients pin."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_public_key(path: str | Path, public_key: Ed25519PublicKey) -> None:
    """Write the public key's PEM to ``path`` (replacing it whole)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(public_pem(public_key))
    partial.chmod(0o644)
    partial.replace(path)


def write_signing_key(path: str | Path, key: Ed25519PrivateKey) -> None:
    """Write a new private key file created with mode 0600 (refused when it exists)."""
    _write_new(Path(path), _private_pem(key), mode=0o600)


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start: a key is never readable by others."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise SecurityError(f"{path} exists: refusing to overwrite a key") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create the key file {path}: {exc.strerror}") from exc
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it


def _length_prefixed(field: bytes) -> bytes:
    return struct.pack(">I", len(field)) + field
