"""Homomorphic aggregation's messages and the silo's side: encrypt a weighted update, sign it.

A silo's contribution is one CKKS-encrypted vector

    [ n * update ..., n, n * loss ]

with n its example count (1 under user-level DP, where every silo weighs
the same), so the decrypted sum gives the weighted mean and the total weight
without any one silo's weight being revealed. The silo signs a receipt for
the ciphertext's sha256 (:mod:`shoal.secure.keyholder`): the coordinator
checks it on arrival, and the key holder decrypts only a sum of enough
receipted contributions.

A networked silo holds :class:`SiloCredentials`: the consortium's public
context, distributed out of band and pinned by its sha256, and its own
receipt-signing key. It encrypts only under that context.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError, ProtocolError, SecurityError
from shoal.secure.ckks import EncryptedVector, encrypt_vector
from shoal.secure.keyholder import ContributionReceipt, read_silo_keys, sign_receipt
from shoal.secure.messages import Stage
from shoal.secure.quantization import DecodedSum

TRAILER = 2  # the example count and the weighted loss, after the update


@dataclass(frozen=True, slots=True)
class EncryptionRequest:
    """Train, then send your update encrypted under the consortium's public key."""

    stage: ClassVar[Stage] = Stage.MASKED_INPUT
    round: int
    run_id: str
    public_context_sha256: str  # silos compare it with the context they were given


@dataclass(frozen=True, slots=True)
class EncryptedUpdate:
    """A silo's encrypted contribution and its signed receipt."""

    stage: ClassVar[Stage] = Stage.MASKED_INPUT
    round: int
    ciphertext: EncryptedVector
    receipt: ContributionReceipt

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ProtocolError(f"round numbers start at 0, got {self.round}")


def encrypt_contribution(
    public_context: bytes,
    update: npt.NDArray[np.floating],
    *,
    num_examples: int,
    loss: float,
    uniform_weight: bool = False,
) -> EncryptedVector:
    """The silo's contribution vector, encrypted (see the module docstring)."""
    if update.ndim != 1:
        raise ProtocolError(f"an update must be 1-D, got shape {update.shape}")
    if num_examples <= 0:
        raise ProtocolError(f"num_examples must be positive, got {num_examples}")
    weight = 1.0 if uniform_weight else float(num_examples)
    vector = np.empty(update.size + TRAILER, dtype=np.float64)
    np.multiply(update, weight, out=vector[: update.size])
    vector[update.size] = weight
    vector[update.size + 1] = weight * (loss if math.isfinite(loss) else 0.0)
    return encrypt_vector(public_context, vector)


def seal_contribution(
    public_context: bytes,
    signing_key: bytes,
    update: npt.NDArray[np.floating],
    *,
    silo_id: str,
    request: EncryptionRequest,
    num_examples: int,
    loss: float,
    uniform_weight: bool = False,
) -> EncryptedUpdate:
    """Encrypt and sign: what a silo sends in answer to ``request``."""
    ciphertext = encrypt_contribution(
        public_context,
        update,
        num_examples=num_examples,
        loss=loss,
        uniform_weight=uniform_weight,
    )
    receipt = sign_receipt(
        signing_key,
        run_id=request.run_id,
        round=request.round,
        silo_id=silo_id,
        ciphertext_sha256=ciphertext.sha256(),
    )
    return EncryptedUpdate(request.round, ciphertext, receipt)


def decode_decrypted_sum(total: npt.NDArray[np.float64]) -> DecodedSum:
    """The key holder's plaintext sum, as the same :class:`DecodedSum` SecAgg+ produces."""
    if total.ndim != 1 or total.size < TRAILER:
        raise ProtocolError(f"a decrypted sum needs at least {TRAILER} values")
    total_weight = float(total[-2])
    return DecodedSum(
        weighted_sum=total[:-TRAILER].astype(np.float64),
        total_weight=total_weight,
        num_examples=max(0, round(total_weight)),
        weighted_loss=float(total[-1]),
    )


@dataclass(frozen=True, slots=True)
class SiloCredentials:
    """What a networked silo needs to answer encryption requests (see the module docstring)."""

    silo_id: str
    public_context: bytes = field(repr=False)
    signing_key: bytes = field(repr=False)  # the raw Ed25519 private key of its receipts

    def __post_init__(self) -> None:
        if not self.public_context:
            raise ConfigError("a silo needs the consortium's public context")
        if len(self.signing_key) != 32:
            raise ConfigError(f"a receipt key is 32 bytes of Ed25519, got {len(self.signing_key)}")

    @property
    def public_context_sha256(self) -> str:
        return hashlib.sha256(self.public_context).hexdigest()

    @classmethod
    def load(cls, silo_id: str, *, public_context: Path, silo_keys: Path) -> SiloCredentials:
        """The context file of ``shoal keyholder init`` and this silo's entry of a keys file.

        ``silo_keys`` is a file of ``shoal keyholder silo-keys``: a JSON object of
        silo id to ``{"private": hex, "public": hex}`` (a silo keeps its own entry).
        """
        try:
            context = public_context.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the public context {public_context}: {exc}") from exc
        keys = read_silo_keys(silo_keys).get(silo_id)
        if keys is None or keys.private is None:
            raise ConfigError(f"{silo_keys} holds no private key for silo {silo_id!r}")
        return cls(silo_id, context, keys.private)

    def answer(
        self,
        request: EncryptionRequest,
        update: npt.NDArray[np.floating],
        *,
        num_examples: int,
        loss: float,
        uniform_weight: bool = False,
    ) -> EncryptedUpdate:
        """Encrypt and sign ``update`` for ``request``, only under the pinned public context."""
        if request.public_context_sha256 != self.public_context_sha256:
            raise SecurityError(
                "the coordinator asks for encryption under public context "
                f"{request.public_context_sha256[:16]}..., this silo pins "
                f"{self.public_context_sha256[:16]}...: refusing to encrypt"
            )
        return seal_contribution(
            self.public_context,
            self.signing_key,
            update,
            silo_id=self.silo_id,
            request=request,
            num_examples=num_examples,
            loss=loss,
            uniform_weight=uniform_weight,
        )
