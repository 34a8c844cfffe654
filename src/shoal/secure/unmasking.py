"""Unmasking a SecAgg+ sum: rebuild each secret from checked shares, and name whoever cheated.

The server keeps every revealed share in a :class:`ShareLedger`. A share
enters it only if it matches the digest its dealer published when it dealt
it (stage 2); one that does not was altered by its holder, who is named a
culprit, and the share is set aside. A secret is rebuilt from t shares that
passed, and the result is checked against the owner's commitment (the seed
commitment, or the mask public key): when it fails, the dealer dealt shares
that do not rebuild what it committed to, and is named. A client's share of
its own secret has no digest (nobody else received it), so it is used last:
only when it is needed, and then a failure is that client's either way.

>>> ledger = ShareLedger()
>>> ledger.culprits
{}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ProtocolError, SecurityError
from shoal.secure.client import SECRET_LIMBS
from shoal.secure.consistency import DIGEST_BYTES, half_digest, seed_commitment
from shoal.secure.crypto import KeyPair, Purpose, SessionContext, add_masks, agree
from shoal.secure.messages import Advertisement
from shoal.secure.shamir import field_to_bytes, reconstruct

Limbs = npt.NDArray[np.int64]


class DealerCheated(SecurityError):
    """A client's shares do not rebuild the secret it committed to: it dealt them wrong."""

    def __init__(self, node: int, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


@dataclass(slots=True)
class ShareLedger:
    """The shares revealed so far, by owner then holder, each checked against its digest."""

    seeds: dict[int, dict[int, Limbs]] = field(default_factory=dict)
    keys: dict[int, dict[int, Limbs]] = field(default_factory=dict)
    culprits: dict[int, str] = field(default_factory=dict)  # node -> what it did
    names: Mapping[int, str] = field(default_factory=dict)  # node -> client id, for the reasons

    def take(
        self,
        context: SessionContext,
        holder: int,
        *,
        seed_shares: Mapping[int, bytes],
        key_shares: Mapping[int, bytes],
        digests: Mapping[int, bytes],
    ) -> None:
        """Keep ``holder``'s revealed shares; ``digests`` are those dealt to it, by dealer."""
        for kind, revealed, book, offset in (
            (b"seed", seed_shares, self.seeds, DIGEST_BYTES),
            (b"key", key_shares, self.keys, 0),
        ):
            for owner, data in revealed.items():
                limbs = limbs_from_bytes(data)
                if owner != holder:
                    dealt = digests[owner][offset : offset + DIGEST_BYTES]
                    if half_digest(context, owner, holder, kind, data) != dealt:
                        self.culprits.setdefault(
                            holder,
                            f"revealed a {kind.decode()} share of "
                            f"{self.names.get(owner, f'node {owner}')} "
                            "that differs from the one it was dealt",
                        )
                        continue
                book.setdefault(owner, {})[holder] = limbs

    def count(self, *, seeds: bool, owner: int) -> int:
        return len((self.seeds if seeds else self.keys).get(owner, {}))

    def enough(
        self, *, masked: AbstractSet[int], dropped: AbstractSet[int], threshold: int
    ) -> bool:
        """Whether every survivor's seed and every dropped client's key have t shares here."""
        return all(self.count(seeds=True, owner=node) >= threshold for node in masked) and all(
            self.count(seeds=False, owner=node) >= threshold for node in dropped
        )

    def rebuild(
        self, owner: int, *, seeds: bool, threshold: int, matches: Callable[[bytes], bool]
    ) -> bytes:
        """``owner``'s secret from ``threshold`` checked shares; raises :class:`DealerCheated`."""
        shares = (self.seeds if seeds else self.keys).get(owner, {})
        holders = sorted(holder for holder in shares if holder != owner)
        holders += [owner] if owner in shares else []
        if len(holders) < threshold:
            raise SecurityError(
                f"{len(holders)} shares of node {owner}'s secret, {threshold} needed"
            )
        secret = _interpolate(shares, holders[:threshold])
        if secret is None or not matches(secret):
            what = "self-mask seed" if seeds else "mask key"
            raise DealerCheated(
                owner, f"dealt shares that do not rebuild the {what} it committed to"
            )
        return secret


def remove_masks(
    total: npt.NDArray[np.uint32],
    ledger: ShareLedger,
    *,
    masked: AbstractSet[int],
    dropped: AbstractSet[int],
    adverts: Mapping[int, Advertisement],
    graph: Mapping[int, frozenset[int]],
    context: SessionContext,
    threshold: int,
) -> None:
    """Subtract, in place, each survivor's self mask and the pairwise masks that survivors
    share with clients that dropped after sharing their keys; raises :class:`DealerCheated`."""
    add: list[bytes] = []
    subtract: list[bytes] = []
    for node in sorted(masked):
        matches = _seed_matches(context, node, adverts[node].seed_commitment)
        subtract.append(ledger.rebuild(node, seeds=True, threshold=threshold, matches=matches))
    for node in sorted(dropped):
        matches = _key_matches(adverts[node].keys.mask)
        private = KeyPair.from_private(
            ledger.rebuild(node, seeds=False, threshold=threshold, matches=matches)
        )
        for survivor in sorted(graph[node] & masked):
            pair = agree(private, adverts[survivor].keys.mask, context, Purpose.MASK)
            (subtract if survivor < node else add).append(pair)
    add_masks(total, add=add, subtract=subtract)  # every secret checked first: all or nothing


def _seed_matches(context: SessionContext, node: int, commitment: bytes) -> Callable[[bytes], bool]:
    return lambda seed: seed_commitment(context, node, seed) == commitment


def _key_matches(public: bytes) -> Callable[[bytes], bool]:
    return lambda private: KeyPair.from_private(private).public == public


def _interpolate(shares: Mapping[int, Limbs], holders: list[int]) -> bytes | None:
    try:
        limbs = reconstruct(holders, np.stack([shares[holder] for holder in holders]))
        return field_to_bytes(limbs, length=2 * len(limbs))
    except ProtocolError:
        return None  # a share outside the field, or limbs out of range: no secret's bytes


def limbs_from_bytes(data: bytes) -> Limbs:
    """The field elements of one revealed share (the inverse of the client's encoding)."""
    if len(data) != 4 * SECRET_LIMBS:
        raise ProtocolError(f"a revealed share has {4 * SECRET_LIMBS} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<u4").astype(np.int64)
