"""The SecAgg+ client: a sans-IO state machine that masks one client's contribution.

``SecAggClient.handle(request)`` takes the server's request for the next
stage and returns the reply to send; it never touches a socket. The stages
follow a literal transition table; a request out of order raises
:class:`IllegalTransition`, one of another round raises
:class:`StaleMessage`, and in both cases nothing changes.

The client's secrets are its mask key (X25519) and a fresh self-mask seed;
both are split t-of-(k + 1) among its k neighbours and itself, sealed with
AES-GCM to each neighbour. Its masked input is

    y = x + PRG(seed) + sum over neighbours v of sign(u, v) * PRG(s_uv)  (mod 2^32)

with sign +1 when u < v and -1 otherwise, so pairwise masks cancel in the sum
and the server can remove the rest only with enough shares.

It does not trust the server (see :mod:`shoal.secure.consistency`): it
refuses a threshold below the safe floor and more neighbours than
:data:`~shoal.core.sharing.MAX_NEIGHBOURS`, signs its advertised keys and
checks its neighbours' signatures, checks each share it receives against
its dealer's digest, signs one survivor set per round, and reveals shares
only once at least t of the clients it knows signed that very set: a seed
share for each member of the set, a key share for each other neighbour.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ClientError, IllegalTransition, ProtocolError, SecurityError
from shoal.core.sharing import MAX_NEIGHBOURS, minimum_threshold
from shoal.privacy.noise import NoiseSource
from shoal.secure.consistency import (
    IdentityKey,
    Verifier,
    advertisement_message,
    seed_commitment,
    share_digest,
    survivors_message,
)
from shoal.secure.crypto import (
    KEY_BYTES,
    SEED_BYTES,
    KeyPair,
    Purpose,
    SessionContext,
    ShareAddress,
    add_masks,
    agree,
    new_seed,
    open_sealed,
    seal,
)
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    Advertisement,
    ClientMessage,
    ConsistencyRequest,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PublicKeys,
    ServerRequest,
    SessionConfig,
    ShareKeysRequest,
    SharesSent,
    Stage,
    StaleMessage,
    SurvivorsSigned,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.shamir import bytes_to_field, share

SECRET_LIMBS = KEY_BYTES // 2  # one 32-byte secret is 16 limbs of 16 bits
SHARE_BYTES = 4 * 2 * SECRET_LIMBS  # a share of both secrets: 32 limbs as little-endian uint32


class ClientStage(enum.Enum):
    """Where a client stands in the protocol."""

    READY = "ready"
    KEYS_ADVERTISED = "keys advertised"
    KEYS_SHARED = "keys shared"
    INPUT_MASKED = "input masked"
    SURVIVORS_SIGNED = "survivors signed"
    UNMASKED = "unmasked"


_C = ClientStage

CLIENT_TRANSITIONS: Final[Mapping[tuple[ClientStage, type[ServerRequest]], ClientStage]] = {
    (_C.READY, AdvertiseKeysRequest): _C.KEYS_ADVERTISED,
    (_C.KEYS_ADVERTISED, ShareKeysRequest): _C.KEYS_SHARED,
    (_C.KEYS_SHARED, MaskedInputRequest): _C.INPUT_MASKED,
    (_C.INPUT_MASKED, ConsistencyRequest): _C.SURVIVORS_SIGNED,
    (_C.SURVIVORS_SIGNED, UnmaskRequest): _C.UNMASKED,
}


@dataclass(frozen=True, slots=True)
class Contribution:
    """What the client adds to the sum: its update, example count and training loss.

    Under user-level DP every client weighs the same (``uniform_weight``), and
    under distributed DP it adds discrete Gaussian noise of ``noise_std`` (in
    the update's units) after quantization, from ``noise`` (a CSPRNG by default).
    ``exact_weight``: the client refuses to contribute rather than be counted as
    fewer examples than it has (the session's ``max_weight`` caps a weight): a
    statistics run's moments, whose weighted mean a capped weight would bias.
    """

    update: npt.NDArray[np.float32]
    num_examples: int
    loss: float = 0.0
    uniform_weight: bool = False
    noise_std: float = 0.0
    noise: NoiseSource | None = None
    exact_weight: bool = False


class SecAggClient:
    """One client's side of one secure round; see the module docstring.

    ``identity`` is the client's long-term signing key: its enrolled Ed25519
    key over the network, a per-run key in simulation.
    """

    def __init__(
        self, *, round: int, identity: IdentityKey, rng: np.random.Generator | None = None
    ) -> None:
        self.round = round
        self._identity = identity
        self.stage = ClientStage.READY
        # stochastic rounding only; the secrets themselves come from the OS CSPRNG
        self._rng = rng if rng is not None else np.random.default_rng()
        self._session: SessionConfig | None = None
        self._node = 0
        self._neighbours: frozenset[int] = frozenset()
        self._cipher_keys = KeyPair.generate()
        self._mask_keys = KeyPair.generate()
        self._seed = new_seed()
        self._peer_keys: dict[int, PublicKeys] = {}
        self._verifiers: dict[int, Verifier] = {}  # neighbours' identities, checked in stage 2
        self._signed: frozenset[int] | None = None  # the one survivor set this client signs
        self._session_context: SessionContext | None = None
        self._channel_keys: dict[int, bytes] = {}  # AES-GCM keys, by peer
        self._held_shares: dict[int, npt.NDArray[np.int64]] = {}  # by owner, including my own

    @property
    def node(self) -> int:
        return self._node

    @property
    def session(self) -> SessionConfig | None:
        """The session this client joined (None before the advertise-keys request)."""
        return self._session

    def handle(
        self, request: ServerRequest, contribution: Contribution | None = None
    ) -> ClientMessage:
        """The reply to ``request``; ``contribution`` is needed for the masked-input request."""
        if request.round != self.round:
            raise StaleMessage(
                f"a {request.stage.label} request of round {request.round} reached "
                f"the client of round {self.round}"
            )
        following = CLIENT_TRANSITIONS.get((self.stage, type(request)))
        if following is None:
            raise IllegalTransition(
                f"a {request.stage.label} request is not allowed "
                f"while the client is {self.stage.value}"
            )
        reply = self._reply(request, contribution)
        self.stage = following  # only once the reply is built: a refused request changes nothing
        return reply

    def _reply(self, request: ServerRequest, contribution: Contribution | None) -> ClientMessage:
        match request:
            case AdvertiseKeysRequest():
                return self._advertise(request)
            case ShareKeysRequest():
                return self._share(request)
            case MaskedInputRequest():
                if contribution is None:
                    raise ProtocolError("the masked-input stage needs the client's contribution")
                return self._mask(request, contribution)
            case ConsistencyRequest():
                return self._sign_survivors(request)
            case UnmaskRequest():
                return self._unmask(request)

    # --- stage 1 -----------------------------------------------------------------------

    def _advertise(self, request: AdvertiseKeysRequest) -> KeysAdvertised:
        threshold, neighbours = request.session.threshold, len(request.neighbours)
        if neighbours > MAX_NEIGHBOURS:
            raise ProtocolError(
                f"{neighbours} neighbours are more than the {MAX_NEIGHBOURS} a client shares "
                "its secrets among"
            )
        if neighbours + 1 < threshold:
            raise ProtocolError(f"{neighbours} neighbours cannot hold a {threshold}-of-n sharing")
        floor = minimum_threshold(neighbours)
        if threshold < floor:
            raise ProtocolError(
                f"threshold {threshold} is below the safe floor {floor} for {neighbours} "
                "neighbours: a server could collect both of this client's secrets"
            )
        self._session, self._node, self._neighbours = (
            request.session,
            request.node,
            request.neighbours,
        )
        keys = PublicKeys(cipher=self._cipher_keys.public, mask=self._mask_keys.public)
        commitment = seed_commitment(self._context(), self._node, self._seed)
        message = advertisement_message(
            self._context(),
            self._node,
            cipher=keys.cipher,
            mask=keys.mask,
            seed_commitment=commitment,
        )
        advertisement = Advertisement(keys, commitment, self._identity.sign(message))
        return KeysAdvertised(round=self.round, advertisement=advertisement)

    # --- stage 2 -----------------------------------------------------------------------

    def _share(self, request: ShareKeysRequest) -> SharesSent:
        session = self._require_session()
        strangers = set(request.peers) - self._neighbours
        if strangers:
            raise ProtocolError(f"keys of nodes {sorted(strangers)} that are not my neighbours")
        holders = sorted(request.peers)
        if len(holders) + 1 < session.threshold:
            raise ProtocolError(
                f"only {len(holders)} neighbours advertised keys; "
                f"a {session.threshold}-of-n sharing needs {session.threshold - 1}"
            )
        verifiers = self._check_advertisements(request)
        secrets = np.concatenate(
            [bytes_to_field(self._mask_keys.private), bytes_to_field(self._seed)]
        )
        points = [*holders, self._node]
        shares = share(secrets, threshold=session.threshold, xs=points)
        self._held_shares = {self._node: shares[-1]}
        self._peer_keys = {node: peer.advertisement.keys for node, peer in request.peers.items()}
        self._verifiers = verifiers
        sealed, digests = {}, {}
        for holder, row in zip(holders, shares[:-1], strict=True):
            plaintext = _share_to_bytes(row)
            address = self._address(Stage.SHARE_KEYS, sender=self._node, receiver=holder)
            sealed[holder] = seal(self._channel_key(holder), plaintext, address)
            digests[holder] = _digest(self._context(), self._node, holder, plaintext)
        return SharesSent(round=self.round, sealed_shares=sealed, share_digests=digests)

    def _check_advertisements(self, request: ShareKeysRequest) -> dict[int, Verifier]:
        """Each neighbour's keys must carry its identity's signature: no one can swap them.

        Identities are distinct: one client cannot stand for several neighbours (or for me).
        """
        identities = [peer.identity for peer in request.peers.values()] + [self._identity.public]
        if len(set(identities)) != len(identities):
            raise SecurityError("two of my neighbours (or one and I) share an identity key")
        verifiers = {}
        for node, peer in sorted(request.peers.items()):
            advertisement, verifier = peer.advertisement, Verifier(peer.identity)
            message = advertisement_message(
                self._context(),
                node,
                cipher=advertisement.keys.cipher,
                mask=advertisement.keys.mask,
                seed_commitment=advertisement.seed_commitment,
            )
            if not verifier.verify(advertisement.signature, message):
                raise SecurityError(
                    f"the keys of node {node} carry no valid signature of its identity"
                )
            verifiers[node] = verifier
        return verifiers

    # --- stage 3 -----------------------------------------------------------------------

    def _mask(self, request: MaskedInputRequest, contribution: Contribution) -> MaskedInput:
        session = self._require_session()
        unknown = set(request.sealed_shares) - set(self._peer_keys)
        if unknown:
            raise ProtocolError(f"shares from nodes {sorted(unknown)} whose keys I never received")
        if contribution.update.shape != (session.vector_length,):
            raise ProtocolError(
                f"the update has shape {contribution.update.shape}, "
                f"the session expects {session.vector_length} values"
            )
        held = {}
        for sender, sealed in request.sealed_shares.items():
            address = self._address(Stage.SHARE_KEYS, sender=sender, receiver=self._node)
            plaintext = open_sealed(self._channel_key(sender), sealed, address)
            if (
                _digest(self._context(), sender, self._node, plaintext)
                != (request.share_digests[sender])
            ):
                raise SecurityError(
                    f"the share from node {sender} does not match the digest it published"
                )
            held[sender] = _share_from_bytes(plaintext)
        self._held_shares.update(held)
        quantization = session.quantization
        if contribution.exact_weight and contribution.num_examples > quantization.max_weight:
            raise ClientError(  # its count stays here: the secure sum masks it for a reason
                "this client holds more examples than the secure sum counts of one client "
                f"(secure_aggregation.max_weight = {quantization.max_weight:,}): raise "
                "max_weight above the largest client's count"
            )
        vector = quantization.encode(
            contribution.update,
            num_examples=(
                quantization.max_weight
                if contribution.uniform_weight
                else contribution.num_examples
            ),
            loss=contribution.loss,
            rng=self._rng,
        )
        if contribution.noise_std > 0:
            source = contribution.noise if contribution.noise is not None else NoiseSource.secure()
            sigma = contribution.noise_std / quantization.step()  # in quantization steps
            noise = source.discrete_gaussian(session.vector_length, sigma=sigma)
            vector[: session.vector_length] += noise.astype(np.uint32)  # two's complement wraps
        peers = sorted(held)  # masks only with neighbours who shared: they are in U2
        add_masks(
            vector,
            add=[self._seed, *(self._pair_seed(peer) for peer in peers if self._node < peer)],
            subtract=[self._pair_seed(peer) for peer in peers if self._node > peer],
        )
        return MaskedInput(round=self.round, vector=vector)

    # --- stage 4 -----------------------------------------------------------------------

    def _sign_survivors(self, request: ConsistencyRequest) -> SurvivorsSigned:
        session, survivors = self._require_session(), request.survivors
        if self._node not in survivors:
            raise ProtocolError("the survivor set must list this client: it sent its input")
        if len(survivors) < session.threshold or max(survivors) > session.num_nodes:
            raise ProtocolError(
                f"a survivor set of {len(survivors)} nodes up to {max(survivors)} does not fit "
                f"a session of {session.num_nodes} with threshold {session.threshold}"
            )
        unshared = (survivors & self._neighbours) - set(self._held_shares)
        if unshared:
            raise ProtocolError(
                f"nodes {sorted(unshared)} are listed as survivors but never shared with me"
            )
        self._signed = survivors
        message = survivors_message(
            self._context(), survivors, signer=self._node, mask_key=self._mask_keys.public
        )
        signature = self._identity.sign(message)
        return SurvivorsSigned(round=self.round, signature=signature)

    # --- stage 5 -----------------------------------------------------------------------

    def _unmask(self, request: UnmaskRequest) -> UnmaskShares:
        survivors = self._signed
        if survivors is None:
            raise IllegalTransition("no survivor set was signed")
        self._require_signatures(request, survivors)
        seeds = {node: row for node, row in self._held_shares.items() if node in survivors}
        keys = {node: row for node, row in self._held_shares.items() if node not in survivors}
        return UnmaskShares(
            round=self.round,
            seed_shares={node: _limbs_to_bytes(row[SECRET_LIMBS:]) for node, row in seeds.items()},
            key_shares={node: _limbs_to_bytes(row[:SECRET_LIMBS]) for node, row in keys.items()},
        )

    def _require_signatures(self, request: UnmaskRequest, survivors: frozenset[int]) -> None:
        """At least t of the clients I know (myself included) must have signed my very set."""
        threshold = self._require_session().threshold
        valid = 1  # my own: I signed this set
        for signer in sorted(set(request.signatures) & set(self._verifiers) & survivors):
            if valid >= threshold:
                break
            message = survivors_message(
                self._context(), survivors, signer=signer, mask_key=self._peer_keys[signer].mask
            )
            valid += self._verifiers[signer].verify(request.signatures[signer], message)
        if valid < threshold:
            raise SecurityError(
                f"only {valid} valid signatures over the survivor set this client signed, "
                f"{threshold} needed: the server may be showing clients different sets"
            )

    # --- helpers -----------------------------------------------------------------------

    def _require_session(self) -> SessionConfig:
        if self._session is None:
            raise IllegalTransition("the session has not started")
        return self._session

    def _context(self) -> SessionContext:
        if self._session_context is None:
            session = self._require_session()
            self._session_context = SessionContext(run_id=session.run_id, round=session.round)
        return self._session_context

    def _address(self, stage: Stage, *, sender: int, receiver: int) -> ShareAddress:
        return ShareAddress(self._context(), stage.label, sender, receiver)

    def _channel_key(self, peer: int) -> bytes:
        key = self._channel_keys.get(peer)
        if key is None:
            cipher = self._peer_keys[peer].cipher
            key = agree(self._cipher_keys, cipher, self._context(), Purpose.SHARE_KEY)
            self._channel_keys[peer] = key
        return key

    def _pair_seed(self, peer: int) -> bytes:
        return agree(self._mask_keys, self._peer_keys[peer].mask, self._context(), Purpose.MASK)


def _share_to_bytes(row: npt.NDArray[np.int64]) -> bytes:
    return row.astype("<u4").tobytes()


def _digest(context: SessionContext, dealer: int, holder: int, plaintext: bytes) -> bytes:
    """The digest of a share as dealt: its key half and seed half, as they are revealed."""
    half = 4 * SECRET_LIMBS
    return share_digest(
        context,
        dealer=dealer,
        holder=holder,
        key_half=plaintext[:half],
        seed_half=plaintext[half:],
    )


def _share_from_bytes(data: bytes) -> npt.NDArray[np.int64]:
    if len(data) != SHARE_BYTES:
        raise ProtocolError(f"a share has {SHARE_BYTES} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<u4").astype(np.int64)


def _limbs_to_bytes(limbs: npt.NDArray[np.int64]) -> bytes:
    return limbs.astype("<u4").tobytes()


assert SEED_BYTES == KEY_BYTES  # both secrets split into the same number of limbs
