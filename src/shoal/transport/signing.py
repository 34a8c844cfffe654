"""Ed25519 request signing: every request a client sends is signed, and replays are refused.

A client holds an Ed25519 key; the coordinator learns its public half at
enrollment. Each request carries a :class:`RequestAuth`: who (client id),
for which run and round, a fresh random nonce, a timestamp, the sha256 of the
request's body, and the signature over all of these in one canonical
encoding (:func:`signed_message`). The coordinator checks the signature with
:func:`verify_request` and then, with a :class:`ReplayGuard`, that the nonce
is new and the timestamp recent.

>>> private_key, public_key = generate_client_key()
>>> auth = create_request_auth(
...     private_key, client_id="c1", run_id="r1", round=3, payload_sha256="00" * 32, timestamp=1.0
... )
>>> verify_request(public_key, auth, payload_sha256="00" * 32)
"""

from __future__ import annotations

import hmac
import math
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from heapq import heappop, heappush

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ProtocolError, SecurityError
from shoal.core.identifiers import check_client_id

SIGNING_CONTEXT = b"shoal.v1/request-auth\x00"
"""Domain separation: a signature over a Shoal request is never valid for anything else."""

NO_ROUND = -1
"""The round of a request that is not about a round (enroll, heartbeat)."""

NONCE_BYTES = 16
_MIN_NONCE, _MAX_NONCE = 16, 64
_MAX_ID_BYTES = 256
_SIGNATURE_BYTES = 64
_KEY_BYTES = 32


def _check_identifier(value: str, what: str) -> None:
    if not value or len(value.encode()) > _MAX_ID_BYTES:
        raise ProtocolError(f"{what} must be 1 to {_MAX_ID_BYTES} bytes, got {value!r}")


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """The signed envelope of one request (the ``RequestAuth`` proto message, typed)."""

    client_id: str
    run_id: str
    round: int
    nonce: bytes
    timestamp: float
    payload_sha256: str
    signature: bytes

    def __post_init__(self) -> None:
        check_client_id(self.client_id)
        _check_identifier(self.run_id, "run id")
        if self.round < NO_ROUND:
            raise ProtocolError(f"round must be >= {NO_ROUND}, got {self.round}")
        if not _MIN_NONCE <= len(self.nonce) <= _MAX_NONCE:
            raise ProtocolError(
                f"a nonce has {_MIN_NONCE} to {_MAX_NONCE} bytes, got {len(self.nonce)}"
            )
        if not math.isfinite(self.timestamp):
            raise ProtocolError(f"timestamp must be finite, got {self.timestamp}")
        check_sha256_hex(self.payload_sha256, "payload_sha256")
        if len(self.signature) != _SIGNATURE_BYTES:
            raise ProtocolError(f"an Ed25519 signature has 64 bytes, got {len(self.signature)}")


def generate_client_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as raw bytes: (private key, public key), 32 bytes each."""
    private = Ed25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_key_of(private_key: bytes) -> bytes:
    """The raw public key of a raw Ed25519 private key."""
    return _load_private(private_key).public_key().public_bytes_raw()


def new_nonce() -> bytes:
    """A fresh random nonce from the operating system's CSPRNG."""
    return secrets.token_bytes(NONCE_BYTES)


def signed_message(
    *,
    client_id: str,
    run_id: str,
    round: int,
    nonce: bytes,
    timestamp: float,
    payload_sha256: str,
) -> bytes:
    """The exact bytes a request signature covers.

    The context string, then each variable-length field prefixed by its
    length (4 bytes, big-endian), integers and the timestamp as fixed-size
    big-endian values, and the payload hash as its 32 raw bytes: no two
    different requests share an encoding.
    """
    check_sha256_hex(payload_sha256, "payload_sha256")
    return b"".join(
        (
            SIGNING_CONTEXT,
            _length_prefixed(client_id.encode()),
            _length_prefixed(run_id.encode()),
            struct.pack(">q", round),
            _length_prefixed(nonce),
            struct.pack(">d", timestamp),
            bytes.fromhex(payload_sha256),
        )
    )


def sign_request(
    private_key: bytes,
    *,
    client_id: str,
    run_id: str,
    round: int,
    nonce: bytes,
    timestamp: float,
    payload_sha256: str,
) -> bytes:
    """The Ed25519 signature (64 bytes) of a request's fields with a raw private key."""
    message = signed_message(
        client_id=client_id,
        run_id=run_id,
        round=round,
        nonce=nonce,
        timestamp=timestamp,
        payload_sha256=payload_sha256,
    )
    return _load_private(private_key).sign(message)


def create_request_auth(
    private_key: bytes,
    *,
    client_id: str,
    run_id: str,
    round: int,
    payload_sha256: str,
    timestamp: float,
    nonce: bytes | None = None,
) -> RequestAuth:
    """A signed :class:`RequestAuth`, ready to attach to a request.

    ``nonce`` is fresh unless given: a request whose body depends on its
    nonce (attestation evidence made for it) draws one with :func:`new_nonce` first.
    """
    nonce = new_nonce() if nonce is None else nonce
    signature = sign_request(
        private_key,
        client_id=client_id,
        run_id=run_id,
        round=round,
        nonce=nonce,
        timestamp=timestamp,
        payload_sha256=payload_sha256,
    )
    return RequestAuth(client_id, run_id, round, nonce, timestamp, payload_sha256, signature)


def verify_request(public_key: bytes, auth: RequestAuth, *, payload_sha256: str) -> None:
    """Check a request's signature, given the digest of the body the server received.

    Raises ``SecurityError`` when the body's digest is not the one that was
    signed, when the key is not a valid Ed25519 public key, or when the
    signature does not verify (forged, altered, or made with another key).
    """
    if not hmac.compare_digest(auth.payload_sha256.encode(), payload_sha256.encode()):
        raise SecurityError("the request body does not match the sha256 it was signed with")
    if len(public_key) != _KEY_BYTES:
        raise SecurityError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        key.verify(
            auth.signature,
            signed_message(
                client_id=auth.client_id,
                run_id=auth.run_id,
                round=auth.round,
                nonce=auth.nonce,
                timestamp=auth.timestamp,
                payload_sha256=auth.payload_sha256,
            ),
        )
    except InvalidSignature as exc:
        raise SecurityError(f"bad signature on a request from {auth.client_id!r}") from exc
    except ValueError as exc:
        raise SecurityError(f"not a usable Ed25519 public key: {exc}") from exc


def _length_prefixed(field: bytes) -> bytes:
    return struct.pack(">I", len(field)) + field


def _load_private(private_key: bytes) -> Ed25519PrivateKey:
    if len(private_key) != _KEY_BYTES:
        raise SecurityError(f"an Ed25519 private key has 32 bytes, got {len(private_key)}")
    return Ed25519PrivateKey.from_private_bytes(private_key)


@dataclass(frozen=True, slots=True)
class Remembered:
    """A nonce the :class:`ReplayGuard` holds: whose (client id and key) and until when."""

    expires: float  # seconds since the epoch: the request's timestamp plus the window
    client_id: str
    key: bytes
    nonce: bytes


class ReplayGuard:
    """Refuses a request whose nonce was seen before or whose timestamp is not recent.

    Sans-IO: the caller passes ``now`` (seconds since the Unix epoch). A
    request is fresh while ``|now - timestamp| <= window_s`` (the window
    also absorbs clock skew between client and coordinator). A nonce is
    remembered only while its request could still be fresh, so memory is
    bounded by the requests of one window; ``max_per_client`` caps what one
    signer can make the guard hold. Nonces are kept per signer: the client id
    together with the public key that verified the request, which is all a
    signature proves. Call :meth:`check` only after the signature verified
    with ``key``, and only for a key the caller trusts for that id (the
    enrolled one, or an enrollment's own once its token is good), so that
    forged requests cannot fill the cache, and a stranger's requests that
    name a client's id, signed with the stranger's key, never use up that
    client's share.

    What the guard holds lives in memory; ``on_remember`` gets each nonce as
    it is accepted, and :meth:`restore` takes them back, so that a store of
    them (the coordinator's journal) keeps a restart from accepting a request
    captured before it.
    """

    def __init__(
        self,
        *,
        window_s: float = 300.0,
        max_per_client: int = 4096,
        on_remember: Callable[[Remembered], None] | None = None,
    ) -> None:
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be positive and finite, got {window_s}")
        if max_per_client < 1:
            raise ValueError(f"max_per_client must be >= 1, got {max_per_client}")
        self.window_s = float(window_s)
        self.max_per_client = max_per_client
        self._seen: dict[tuple[str, bytes], set[bytes]] = {}
        self._expiries: list[tuple[float, tuple[str, bytes], bytes]] = []
        self.on_remember = on_remember

    def __len__(self) -> int:
        """How many nonces the guard holds now."""
        return len(self._expiries)

    def check(self, auth: RequestAuth, *, key: bytes, now: float) -> None:
        """Accept and remember ``auth``'s nonce, or raise ``SecurityError``; ``key``: the
        public key its signature verified with."""
        self.expire(now=now)
        if abs(now - auth.timestamp) > self.window_s:
            raise SecurityError(
                f"request from {auth.client_id!r} signed at {auth.timestamp:.3f} is outside "
                f"the {self.window_s:g} s window around {now:.3f} (replayed, or a clock is off)"
            )
        signer = (auth.client_id, bytes(key))
        nonces = self._seen.setdefault(signer, set())
        if auth.nonce in nonces:
            raise SecurityError(f"replayed request: {auth.client_id!r} already used this nonce")
        if len(nonces) >= self.max_per_client:
            raise SecurityError(
                f"{auth.client_id!r} sent more than {self.max_per_client} requests "
                f"within {self.window_s:g} s"
            )
        self._remember(auth.timestamp + self.window_s, signer, auth.nonce)
        if self.on_remember is not None:
            self.on_remember(Remembered(auth.timestamp + self.window_s, *signer, auth.nonce))

    def _remember(self, expires: float, signer: tuple[str, bytes], nonce: bytes) -> None:
        self._seen.setdefault(signer, set()).add(nonce)
        heappush(self._expiries, (expires, signer, nonce))

    def remembered(self) -> list[Remembered]:
        """Every nonce the guard holds, soonest to expire first."""
        return [
            Remembered(expires, *signer, nonce) for expires, signer, nonce in sorted(self._expiries)
        ]

    def restore(self, entries: Iterable[Remembered], *, now: float) -> int:
        """Hold ``entries`` again (those not expired at ``now``, each once, whatever the
        per-client cap: they were accepted); how many were taken. ``on_remember`` is not
        called for them."""
        taken = 0
        for entry in entries:
            signer = (entry.client_id, bytes(entry.key))
            if entry.expires < now or entry.nonce in self._seen.get(signer, ()):
                continue
            self._remember(entry.expires, signer, bytes(entry.nonce))
            taken += 1
        return taken

    def expire(self, *, now: float) -> None:
        """Forget the nonces whose requests can no longer pass the time window."""
        while self._expiries and self._expiries[0][0] < now:
            _, signer, nonce = heappop(self._expiries)
            nonces = self._seen[signer]
            nonces.discard(nonce)
            if not nonces:
                del self._seen[signer]
