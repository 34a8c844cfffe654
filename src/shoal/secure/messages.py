"""SecAgg+ messages: the five stages, the server's requests and the clients' replies.

Every message carries its round, and its type names its stage, so a late
message of an earlier round or stage is recognised and refused (a
:class:`StaleMessage`) instead of corrupting the round in progress. Messages
are frozen and check their own shape; they hold bytes and numpy arrays only,
so any transport can carry them.

    server                                   client
      AdvertiseKeysRequest(session, graph) ->
                                          <- KeysAdvertised(two X25519 keys, a seed
                                                            commitment, signed by its identity)
      ShareKeysRequest(neighbours' signed  ->
                       keys and identities)
                                          <- SharesSent(sealed Shamir shares, one per neighbour,
                                                        and a digest of each)
      MaskedInputRequest(shares for you)   ->   (the client trains here)
                                          <- MaskedInput(uint32 vector)
      ConsistencyRequest(survivor set)     ->
                                          <- SurvivorsSigned(its signature over that set)
      UnmaskRequest(the signatures)        ->
                                          <- UnmaskShares(seed shares of the set's members,
                                                          key shares of the rest)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ProtocolError
from shoal.core.limits import MAX_RUN_ID_CHARS
from shoal.secure.consistency import (
    DIGEST_BYTES,
    SHARE_DIGEST_BYTES,
    check_identity_key,
    check_signature,
)
from shoal.secure.crypto import KEY_BYTES
from shoal.secure.quantization import TRAILER, Quantization


class Stage(enum.IntEnum):
    """The protocol's stages, in order; FINISHED and ABORTED come after all of them."""

    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    CONSISTENCY = 4
    UNMASK = 5
    FINISHED = 6
    ABORTED = 7

    @property
    def label(self) -> str:
        return self.name.lower()


class StaleMessage(ProtocolError):
    """A message of an earlier round or stage: it arrived too late and is refused."""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What every participant of one secure round agrees on."""

    run_id: str
    round: int
    num_nodes: int
    vector_length: int  # the update's values, before the quantization trailer
    threshold: int  # shares needed to rebuild one client's secret
    quantization: Quantization

    def __post_init__(self) -> None:
        if not 1 <= len(self.run_id) <= MAX_RUN_ID_CHARS:
            raise ProtocolError(
                f"a session's run id has 1 to {MAX_RUN_ID_CHARS} characters, got {len(self.run_id)}"
            )
        if self.round < 0 or self.num_nodes < 1 or self.vector_length < 0:
            raise ProtocolError(f"malformed secure-aggregation session {self}")
        if self.threshold < 1:
            raise ProtocolError(f"the reconstruction threshold must be >= 1, got {self.threshold}")
        self.quantization.check_capacity(self.num_nodes)

    @property
    def masked_length(self) -> int:
        return self.vector_length + TRAILER


@dataclass(frozen=True, slots=True)
class PublicKeys:
    """A client's two X25519 public keys: one for the share channel, one for masks."""

    cipher: bytes
    mask: bytes

    def __post_init__(self) -> None:
        if len(self.cipher) != KEY_BYTES or len(self.mask) != KEY_BYTES:
            raise ProtocolError(f"public keys have {KEY_BYTES} bytes each")
        if self.cipher == self.mask:
            raise ProtocolError("the share and mask keys must differ")


@dataclass(frozen=True, slots=True)
class Advertisement:
    """What a client advertises in stage 1, signed with its identity key (see ``consistency``)."""

    keys: PublicKeys
    seed_commitment: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.seed_commitment) != DIGEST_BYTES:
            raise ProtocolError(f"a seed commitment has {DIGEST_BYTES} bytes")
        check_signature(self.signature, "advertised keys")


@dataclass(frozen=True, slots=True)
class PeerKeys:
    """A neighbour's signed advertisement and the identity key that signed it."""

    identity: bytes
    advertisement: Advertisement

    def __post_init__(self) -> None:
        check_identity_key(self.identity, "a neighbour's identity")


def _check_round(round_number: int) -> None:
    if round_number < 0:
        raise ProtocolError(f"round numbers start at 0, got {round_number}")


def _check_nodes(nodes: Mapping[int, object] | frozenset[int], what: str) -> None:
    if nodes and min(nodes) < 1:  # min runs in C: a survivor set of 1,000 goes to 1,000 nodes
        raise ProtocolError(f"{what}: node numbers start at 1")


def _check_digests(sealed: Mapping[int, bytes], digests: Mapping[int, bytes]) -> None:
    if set(sealed) != set(digests):
        raise ProtocolError("every sealed share travels with its digest, and only those")
    if any(len(digest) != SHARE_DIGEST_BYTES for digest in digests.values()):
        raise ProtocolError(f"a share digest has {SHARE_DIGEST_BYTES} bytes")


# --- server to client -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdvertiseKeysRequest:
    """Stage 1: the session, your node number and your neighbours; advertise your keys."""

    stage: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    round: int
    session: SessionConfig
    node: int
    neighbours: frozenset[int]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_nodes(self.neighbours, "neighbours")
        if self.session.round != self.round:
            raise ProtocolError("the session belongs to another round")
        if not 1 <= self.node <= self.session.num_nodes or self.node in self.neighbours:
            raise ProtocolError(f"node {self.node} is not a valid member of this session")


@dataclass(frozen=True, slots=True)
class ShareKeysRequest:
    """Stage 2: the signed keys of your neighbours who advertised theirs, with their identities."""

    stage: ClassVar[Stage] = Stage.SHARE_KEYS
    round: int
    peers: Mapping[int, PeerKeys]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_nodes(self.peers, "public keys")


@dataclass(frozen=True, slots=True)
class MaskedInputRequest:
    """Stage 3: the sealed shares your neighbours sent you and their digests, by sender."""

    stage: ClassVar[Stage] = Stage.MASKED_INPUT
    round: int
    sealed_shares: Mapping[int, bytes]
    share_digests: Mapping[int, bytes]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_nodes(self.sealed_shares, "shares")
        _check_digests(self.sealed_shares, self.share_digests)


@dataclass(frozen=True, slots=True)
class ConsistencyRequest:
    """Stage 4: the survivor set U3 (every node whose masked input is in the sum); sign it."""

    stage: ClassVar[Stage] = Stage.CONSISTENCY
    round: int
    survivors: frozenset[int]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_nodes(self.survivors, "survivors")
        if not self.survivors:
            raise ProtocolError("the survivor set is empty")


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """Stage 5: the signatures over the survivor set, by signer; reveal your shares."""

    stage: ClassVar[Stage] = Stage.UNMASK
    round: int
    signatures: Mapping[int, bytes]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_nodes(self.signatures, "signatures")
        for signature in self.signatures.values():
            check_signature(signature, "a survivor-set signature")


ServerRequest = (
    AdvertiseKeysRequest
    | ShareKeysRequest
    | MaskedInputRequest
    | ConsistencyRequest
    | UnmaskRequest
)


# --- client to server -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeysAdvertised:
    """Stage 1 reply: my public keys and seed commitment, signed with my identity."""

    stage: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    round: int
    advertisement: Advertisement

    def __post_init__(self) -> None:
        _check_round(self.round)


@dataclass(frozen=True, slots=True)
class SharesSent:
    """Stage 2 reply: one sealed share of my secrets per neighbour and its digest, by receiver."""

    stage: ClassVar[Stage] = Stage.SHARE_KEYS
    round: int
    sealed_shares: Mapping[int, bytes]
    share_digests: Mapping[int, bytes]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_nodes(self.sealed_shares, "shares")
        _check_digests(self.sealed_shares, self.share_digests)


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """Stage 3 reply: my quantized contribution plus all my masks, modulo 2^32."""

    stage: ClassVar[Stage] = Stage.MASKED_INPUT
    round: int
    vector: npt.NDArray[np.uint32]

    def __post_init__(self) -> None:
        _check_round(self.round)
        if not isinstance(self.vector, np.ndarray) or self.vector.dtype != np.uint32:
            raise ProtocolError("a masked input is a uint32 numpy vector")
        if self.vector.ndim != 1:
            raise ProtocolError(f"a masked input is 1-D, got shape {self.vector.shape}")


@dataclass(frozen=True, slots=True)
class SurvivorsSigned:
    """Stage 4 reply: my identity's signature over the survivor set I was shown."""

    stage: ClassVar[Stage] = Stage.CONSISTENCY
    round: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_round(self.round)
        check_signature(self.signature, "a survivor-set signature")


@dataclass(frozen=True, slots=True)
class UnmaskShares:
    """Stage 5 reply: my shares of survivors' self-mask seeds and of the dropped's mask keys."""

    stage: ClassVar[Stage] = Stage.UNMASK
    round: int
    seed_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_nodes(self.seed_shares, "seed shares")
        _check_nodes(self.key_shares, "key shares")
        if set(self.seed_shares) & set(self.key_shares):
            raise ProtocolError("a client never reveals both secrets of one node")


ClientMessage = KeysAdvertised | SharesSent | MaskedInput | SurvivorsSigned | UnmaskShares
