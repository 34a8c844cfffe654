"""Homomorphic aggregation's messages and the silo's side: encrypt a weighted update, sign it.

A silo's contribution is one CKKS-encrypted vector

    [ n * update ..., n, n * loss ]

with n its example count, so the decrypted sum gives the weighted mean and
the total weight without any one silo's weight being revealed. The silo signs
a receipt for the ciphertext's sha256 (:mod:`shoal.secure.keyholder`): the
coordinator checks it on arrival, and the key holder decrypts only a sum of
enough receipted contributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ProtocolError
from shoal.secure.ckks import EncryptedVector, encrypt_vector
from shoal.secure.keyholder import ContributionReceipt, sign_receipt
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
) -> EncryptedVector:
    """The silo's contribution vector, encrypted (see the module docstring)."""
    if update.ndim != 1:
        raise ProtocolError(f"an update must be 1-D, got shape {update.shape}")
    if num_examples <= 0:
        raise ProtocolError(f"num_examples must be positive, got {num_examples}")
    weight = float(num_examples)
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
) -> EncryptedUpdate:
    """Encrypt and sign: what a silo sends in answer to ``request``."""
    ciphertext = encrypt_contribution(public_context, update, num_examples=num_examples, loss=loss)
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
