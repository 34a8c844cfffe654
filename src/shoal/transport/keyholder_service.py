"""The key holder as a network service: gRPC on its own port, TLS by default, bytes payloads.

Two unary methods of the service ``shoal.v1.KeyHolder``, registered as gRPC
generic handlers with bytes in and bytes out (no protobuf schema to share):

- ``PublicContext``: empty request; the serialized public context.
- ``Decrypt``: a framed request (:func:`encode_decrypt_request`: run id,
  round, the encrypted aggregate, the receipts); the plaintext sum as
  little-endian float64.

The server reads a ``Decrypt`` in order of cost: the framing, at most one
receipt per registered silo, the receipts' signatures and the journal, and
only then the aggregate, whose parse costs about a microsecond per
ciphertext (20 MB of empty ones took 3 s) and whose decryption far more.

Refusals are counted and their log lines limited per peer (as the
coordinator's are) and keep their meaning across the wire: ``SecurityError`` travels as
``PERMISSION_DENIED``, ``ProtocolError`` as ``INVALID_ARGUMENT``, any other
Shoal error as ``FAILED_PRECONDITION``, each with its message;
:class:`KeyHolderClient` turns them back into ``SecurityError``,
``ProtocolError`` and ``TransportError`` (as it does every other failure).

>>> server = serve_keyholder("keyholder", address="127.0.0.1:0", insecure=True)  # doctest: +SKIP
>>> KeyHolderClient(f"127.0.0.1:{server.port}", insecure=True).public_context()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NoReturn, TypeAlias

import grpc
import numpy as np
import numpy.typing as npt

from shoal.core.errors import (
    ConfigError,
    ProtocolError,
    SecurityError,
    ShoalError,
    TransportError,
)
from shoal.secure.ckks import EncryptedVector, FrameReader, length_prefixed
from shoal.secure.keyholder import ContributionReceipt, KeyHolder
from shoal.telemetry.refusals import RefusalLog
from shoal.transport.certs import (
    CertificateFiles,
    load_channel_credentials,
    load_server_credentials,
)
from shoal.transport.listen import EXCLUSIVE_PORT, SILENT_CONNECTIONS_CLOSED, bind_server

log = logging.getLogger("shoal.keyholder")

SERVICE_NAME = "shoal.v1.KeyHolder"
PUBLIC_CONTEXT_METHOD = f"/{SERVICE_NAME}/PublicContext"
DECRYPT_METHOD = f"/{SERVICE_NAME}/Decrypt"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 2**20
"""Room for the aggregate of about six million parameters (245 ciphertexts of 330 KB per 1M)."""

MAX_KEYHOLDER_CALLS = 8
"""Calls a key holder serves at once, on one connection and in all (more: RESOURCE_EXHAUSTED)."""

_REQUEST_MAGIC = b"SHOALKHD\x01"
_ROUND = struct.Struct(">q")
_COUNT = struct.Struct(">I")
_MAX_RECEIPTS = 100_000
_MAX_RECEIPT_BYTES = 1024
_MAX_ID_BYTES = 256


@dataclass(frozen=True, slots=True)
class DecryptRequest:
    """What ``Decrypt`` carries; the aggregate stays bytes until :meth:`aggregate` parses it."""

    run_id: str
    round: int
    encoded_aggregate: bytes = field(repr=False)
    receipts: tuple[ContributionReceipt, ...]

    def aggregate(self) -> EncryptedVector:
        """The encrypted sum; ``ProtocolError`` if its bytes are not an encrypted vector."""
        return EncryptedVector.from_bytes(self.encoded_aggregate)


def encode_decrypt_request(
    *,
    run_id: str,
    round: int,
    aggregate: EncryptedVector,
    receipts: Sequence[ContributionReceipt],
) -> bytes:
    """Magic, run id, round, the aggregate, then the receipts, each length-prefixed."""
    parts = [
        _REQUEST_MAGIC,
        length_prefixed(run_id.encode()),
        _ROUND.pack(round),
        length_prefixed(aggregate.to_bytes()),
        _COUNT.pack(len(receipts)),
    ]
    parts.extend(length_prefixed(receipt.to_bytes()) for receipt in receipts)
    return b"".join(parts)


def decode_decrypt_request(data: bytes, *, max_receipts: int = _MAX_RECEIPTS) -> DecryptRequest:
    """Parse :func:`encode_decrypt_request` but the aggregate; ``ProtocolError`` if malformed.

    A server passes its number of silos as ``max_receipts``: a request with
    more receipts is refused before they are read.
    """
    reader = FrameReader(data, "a decrypt request")
    reader.expect(_REQUEST_MAGIC)
    try:
        run_id = reader.field(max_bytes=_MAX_ID_BYTES).decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("the run id of a decrypt request is not UTF-8") from exc
    (round_number,) = reader.unpack(_ROUND)
    aggregate = reader.field(max_bytes=2**31)
    (count,) = reader.unpack(_COUNT)
    if count > max_receipts:
        raise ProtocolError(
            f"a decrypt request carries at most {max_receipts} receipts (one per registered "
            f"silo), got {count}"
        )
    receipts = tuple(
        ContributionReceipt.from_bytes(reader.field(max_bytes=_MAX_RECEIPT_BYTES))
        for _ in range(count)
    )
    reader.finish()
    return DecryptRequest(run_id, round_number, aggregate, receipts)


def decode_plaintext(data: bytes, *, length: int) -> npt.NDArray[np.float64]:
    """The float64 vector of a ``Decrypt`` reply, which must hold ``length`` values."""
    if len(data) != 8 * length:
        raise ProtocolError(
            f"a plaintext of {length} values has {8 * length} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


# --- server ------------------------------------------------------------------------------


_STATUS_OF_ERROR: tuple[tuple[type[ShoalError], grpc.StatusCode], ...] = (
    (SecurityError, grpc.StatusCode.PERMISSION_DENIED),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (ShoalError, grpc.StatusCode.FAILED_PRECONDITION),
)


class _Handlers:
    def __init__(self, holder: KeyHolder) -> None:
        self.holder = holder
        self.refusals = RefusalLog(log, level=logging.WARNING)

    def public_context(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request:
            self._refuse(
                context, "PublicContext", ProtocolError("PublicContext takes an empty request")
            )
        return self.holder.public_context()

    def decrypt(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            parsed = decode_decrypt_request(request, max_receipts=len(self.holder.silos))
            self.holder.check_request(
                run_id=parsed.run_id, round=parsed.round, receipts=parsed.receipts
            )
            values = self.holder.decrypt_aggregate(
                run_id=parsed.run_id,
                round=parsed.round,
                aggregate=parsed.aggregate(),
                receipts=parsed.receipts,
            )
        except ShoalError as exc:
            self._refuse(context, "Decrypt", exc)
        log.info(
            "decrypted run %r round %d for %s (%d silos)",
            parsed.run_id,
            parsed.round,
            context.peer(),
            len(parsed.receipts),
        )
        return np.asarray(values, dtype="<f8").tobytes()

    def _refuse(self, context: grpc.ServicerContext, rpc: str, error: ShoalError) -> NoReturn:
        code = next(code for kind, code in _STATUS_OF_ERROR if isinstance(error, kind))
        reason = code.name.lower()
        self.refusals.refused(peer=context.peer(), rpc=rpc, reason=reason, detail=str(error))
        context.abort(code, str(error))


class KeyHolderServer:
    """A running key-holder service; ``stop()`` it, or use it as a context manager."""

    def __init__(self, server: grpc.Server, *, host: str, port: int) -> None:
        self._server = server
        self.port = port
        self.address = f"{host}:{port}"

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop accepting calls; calls in flight get ``grace_s`` seconds to finish."""
        self._server.stop(grace_s).wait()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout_s`` passes (False)."""
        return bool(self._server.wait_for_termination(timeout_s))

    def __enter__(self) -> KeyHolderServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_keyholder(
    directory: str | Path,
    *,
    address: str = "127.0.0.1:0",
    server_certificate: CertificateFiles | None = None,
    client_ca: str | Path | None = None,
    insecure: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_workers: int = 4,
) -> KeyHolderServer:
    """Open the key holder in ``directory`` and serve it on ``address`` (port 0: any free one).

    TLS with ``server_certificate`` (mutual TLS with ``client_ca``: only
    clients with a certificate from that CA may call), or plaintext when
    ``insecure`` is given explicitly; ``ConfigError`` when neither is.
    """
    if (server_certificate is None) != insecure:
        raise ConfigError(
            "the key holder serves with TLS (a server certificate) or, explicitly, insecure; "
            "give exactly one"
        )
    if client_ca is not None and server_certificate is None:
        raise ConfigError("mutual TLS (a client CA) needs a server certificate")
    holder = KeyHolder.open(directory)
    handlers = _Handlers(holder)
    generic = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "PublicContext": grpc.unary_unary_rpc_method_handler(handlers.public_context),
            "Decrypt": grpc.unary_unary_rpc_method_handler(handlers.decrypt),
        },
    )
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="keyholder"),
        handlers=[generic],
        options=[
            *_message_options(max_message_bytes),
            SILENT_CONNECTIONS_CLOSED,
            ("grpc.max_concurrent_streams", MAX_KEYHOLDER_CALLS),
            EXCLUSIVE_PORT,
        ],
        # a coordinator makes one call at a time; each call may hold a message of up to
        # max_message_bytes before anything reads it (mutual TLS keeps strangers from calling)
        maximum_concurrent_rpcs=MAX_KEYHOLDER_CALLS,
    )
    credentials = (
        None
        if server_certificate is None
        else load_server_credentials(server_certificate, client_ca=client_ca)
    )
    port = bind_server(server, address, credentials, option="--listen")
    if credentials is None:
        log.warning("key holder serving WITHOUT TLS (insecure): aggregates cross in clear")
    server.start()
    return KeyHolderServer(server, host=address.rpartition(":")[0], port=port)


def _message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    if not 0 < max_message_bytes < 2**31:
        raise ConfigError(f"max_message_bytes must be in (0, 2^31), got {max_message_bytes}")
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


# --- client ------------------------------------------------------------------------------

_Method: TypeAlias = "grpc.UnaryUnaryMultiCallable[bytes, bytes]"  # generic only in the stubs


class KeyHolderClient:
    """The coordinator's side: fetch the public context, have an aggregate decrypted."""

    def __init__(
        self,
        address: str,
        *,
        ca: str | Path | bytes | None = None,
        client_certificate: CertificateFiles | None = None,
        insecure: bool = False,
        timeout_s: float = 300.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if (ca is None) != insecure:
            raise ConfigError(
                "a key-holder client pins a CA (or the server's certificate) or, explicitly, "
                "connects insecure; give exactly one"
            )
        if client_certificate is not None and ca is None:
            raise ConfigError("a client certificate (mutual TLS) needs the CA to pin")
        options = _message_options(max_message_bytes)
        self._tls = None if ca is None else ("mutual" if client_certificate else "server")
        if ca is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = load_channel_credentials(ca, client_certificate)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self.address = address
        self.timeout_s = timeout_s
        self._public_context: _Method = self._channel.unary_unary(PUBLIC_CONTEXT_METHOD)
        self._decrypt: _Method = self._channel.unary_unary(DECRYPT_METHOD)

    def wait_ready(self, *, timeout_s: float) -> None:
        """Block until the channel connects; ``TransportError`` after ``timeout_s``."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as exc:
            hint = (
                ""
                if self._tls is None
                else " (or its TLS handshake failed: check the pinned CA, and the client "
                "certificate if it requires mutual TLS)"
            )
            raise TransportError(
                f"the key holder at {self.address} is not reachable after {timeout_s} s{hint}"
            ) from exc

    def public_context(self) -> bytes:
        """The consortium's serialized public context."""
        return self._call(self._public_context, b"")

    def decrypt_aggregate(
        self,
        *,
        run_id: str,
        round: int,
        aggregate: EncryptedVector,
        receipts: Sequence[ContributionReceipt],
    ) -> npt.NDArray[np.float64]:
        """The plaintext sum (float64), or the key holder's refusal as a typed error."""
        request = encode_decrypt_request(
            run_id=run_id, round=round, aggregate=aggregate, receipts=receipts
        )
        return decode_plaintext(self._call(self._decrypt, request), length=aggregate.length)

    def _call(self, method: _Method, request: bytes) -> bytes:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _error_of(exc, self.address) from exc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KeyHolderClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _error_of(exc: grpc.RpcError, address: str) -> ShoalError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return SecurityError(f"the key holder refused: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return ProtocolError(f"the key holder rejected the request: {details}")
    return TransportError(f"key holder at {address}: {code.name}: {details}")
