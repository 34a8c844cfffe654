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
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from shoal.core.errors import IllegalTransition, ProtocolError
from shoal.privacy.noise import NoiseSource
from shoal.secure.crypto import (
    KEY_BYTES,
    SEED_BYTES,
    KeyPair,
    Purpose,
    SessionContext,
    ShareAddress,
    agree,
    expand_mask,
    new_seed,
    open_sealed,
    seal,
)
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    ClientMessage,
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
    UNMASKED = "unmasked"


_C = ClientStage

CLIENT_TRANSITIONS: Final[Mapping[tuple[ClientStage, type[ServerRequest]], ClientStage]] = {
    (_C.READY, AdvertiseKeysRequest): _C.KEYS_ADVERTISED,
    (_C.KEYS_ADVERTISED, ShareKeysRequest): _C.KEYS_SHARED,
    (_C.KEYS_SHARED, MaskedInputRequest): _C.INPUT_MASKED,
    (_C.INPUT_MASKED, UnmaskRequest): _C.UNMASKED,
}


@dataclass(frozen=True, slots=True)
class Contribution:
    """What the client adds to the sum: its update, example count and training loss.

    Under user-level DP every client weighs the same (``uniform_weight``), and
    under distributed DP it adds discrete Gaussian noise of ``noise_std`` (in
    the update's units) after quantization, from ``noise`` (a CSPRNG by default).
    """

    update: npt.NDArray[np.float32]
    num_examples: int
    loss: float = 0.0
    uniform_weight: bool = False
    noise_std: float = 0.0
    noise: NoiseSource | None = None


class SecAggClient:
    """One client's side of one secure round; see the module docstring."""

    def __init__(self, *, round: int, rng: np.random.Generator | None = None) -> None:
        self.round = round
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
        self._channel_keys: dict[int, bytes] = {}  # AES-GCM keys, by peer
        self._held_shares: dict[int, npt.NDArray[np.int64]] = {}  # by owner, including my own

    @property
    def node(self) -> int:
        return self._node

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
            case UnmaskRequest():
                return self._unmask(request)

    # --- stage 1 -----------------------------------------------------------------------

    def _advertise(self, request: AdvertiseKeysRequest) -> KeysAdvertised:
        if len(request.neighbours) + 1 < request.session.threshold:
            raise ProtocolError(
                f"{len(request.neighbours)} neighbours cannot hold a "
                f"{request.session.threshold}-of-n sharing"
            )
        self._session, self._node, self._neighbours = (
            request.session,
            request.node,
            request.neighbours,
        )
        keys = PublicKeys(cipher=self._cipher_keys.public, mask=self._mask_keys.public)
        return KeysAdvertised(round=self.round, keys=keys)

    # --- stage 2 -----------------------------------------------------------------------

    def _share(self, request: ShareKeysRequest) -> SharesSent:
        session = self._require_session()
        strangers = set(request.public_keys) - self._neighbours
        if strangers:
            raise ProtocolError(f"keys of nodes {sorted(strangers)} that are not my neighbours")
        holders = sorted(request.public_keys)
        if len(holders) + 1 < session.threshold:
            raise ProtocolError(
                f"only {len(holders)} neighbours advertised keys; "
                f"a {session.threshold}-of-n sharing needs {session.threshold - 1}"
            )
        secrets = np.concatenate(
            [bytes_to_field(self._mask_keys.private), bytes_to_field(self._seed)]
        )
        points = [*holders, self._node]
        shares = share(secrets, threshold=session.threshold, xs=points)
        self._held_shares = {self._node: shares[-1]}
        self._peer_keys = dict(request.public_keys)
        sealed = {
            holder: seal(
                self._channel_key(holder),
                _share_to_bytes(row),
                self._address(Stage.SHARE_KEYS, sender=self._node, receiver=holder),
            )
            for holder, row in zip(holders, shares[:-1], strict=True)
        }
        return SharesSent(round=self.round, sealed_shares=sealed)

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
        held = {
            sender: _share_from_bytes(
                open_sealed(
                    self._channel_key(sender),
                    sealed,
                    self._address(Stage.SHARE_KEYS, sender=sender, receiver=self._node),
                )
            )
            for sender, sealed in request.sealed_shares.items()
        }
        self._held_shares.update(held)
        quantization = session.quantization
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
        length = session.masked_length
        vector += expand_mask(self._seed, length)
        for peer in sorted(held):  # masks only with neighbours who shared: they are in U2
            mask = expand_mask(self._pair_seed(peer), length)
            if self._node < peer:
                vector += mask
            else:
                vector -= mask
        return MaskedInput(round=self.round, vector=vector)

    # --- stage 4 -----------------------------------------------------------------------

    def _unmask(self, request: UnmaskRequest) -> UnmaskShares:
        asked = request.survivors | request.dropped
        missing = asked - set(self._held_shares)
        if missing:
            raise ProtocolError(f"asked about nodes {sorted(missing)} whose shares I do not hold")
        if self._node not in request.survivors:
            raise ProtocolError("the unmask request must list this client among the survivors")
        # too few survivors to rebuild a secret only fails the round; the server refuses to
        # finish with fewer inputs than the threshold, so a sum never exposes one input
        return UnmaskShares(
            round=self.round,
            seed_shares={
                node: _limbs_to_bytes(self._held_shares[node][SECRET_LIMBS:])
                for node in sorted(request.survivors)
            },
            key_shares={
                node: _limbs_to_bytes(self._held_shares[node][:SECRET_LIMBS])
                for node in sorted(request.dropped)
            },
        )

    # --- helpers -----------------------------------------------------------------------

    def _require_session(self) -> SessionConfig:
        if self._session is None:
            raise IllegalTransition("the session has not started")
        return self._session

    def _context(self) -> SessionContext:
        session = self._require_session()
        return SessionContext(run_id=session.run_id, round=session.round)

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


def _share_from_bytes(data: bytes) -> npt.NDArray[np.int64]:
    if len(data) != SHARE_BYTES:
        raise ProtocolError(f"a share has {SHARE_BYTES} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<u4").astype(np.int64)


def _limbs_to_bytes(limbs: npt.NDArray[np.int64]) -> bytes:
    return limbs.astype("<u4").tobytes()


def limbs_from_bytes(data: bytes) -> npt.NDArray[np.int64]:
    """The field elements of one revealed share (the inverse of the client's encoding)."""
    if len(data) != 4 * SECRET_LIMBS:
        raise ProtocolError(f"a revealed share has {4 * SECRET_LIMBS} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<u4").astype(np.int64)


assert SEED_BYTES == KEY_BYTES  # both secrets split into the same number of limbs
