"""Byte payloads in chunks: split a model or an update for streaming, and put it back together.

The sender cuts a payload into :class:`~shoal.transport.messages.Chunk`\\ s,
each carrying its offset and the payload's total size and sha256. The
receiver feeds them to a :class:`ChunkAssembler` (sans-IO: it works the same
for a sync iterator and an ``async for``), which refuses a gap, a duplicate
or out-of-order chunk, a payload larger than it accepts, and bytes that do
not hash to the sha256 expected. :func:`decode_parameters` then reads the
safetensors payload, with clear errors for malformed bytes.

>>> data = b"x" * 10
>>> assemble_chunks(chunk_payload(data, 4), max_bytes=100) == data
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from shoal.core.errors import IntegrityError, ModelError, ProtocolError
from shoal.core.parameters import Parameters
from shoal.transport.messages import Chunk

DEFAULT_CHUNK_SIZE = 256 * 1024
"""Bytes per chunk: well under gRPC's 4 MiB message limit, small enough to resume cheaply."""

MAX_REQUEST_BYTES = 2**20
"""The largest message a coordinator receives: a chunk with its part's header, or a check-in
with its attestation evidence (64 KiB), fit with room to spare. gRPC holds a message whole
before any handler sees it, so each stream of an unauthenticated peer could hold this much:
at 8 MiB, 40 stalled streams of one peer held 310 MiB of the coordinator's memory."""


class PayloadTooLarge(ProtocolError):
    """A payload is (or claims to be) larger than the receiver accepts."""


def chunk_payload(
    data: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    start: int = 0,
    sha256: str | None = None,
) -> Iterator[Chunk]:
    """Cut ``data`` into chunks of ``chunk_size`` bytes, from byte ``start`` on.

    An empty payload is one empty chunk, so that the receiver still learns
    its size and sha256. ``start`` resumes a broken transfer. ``sha256`` is
    the payload's digest when the sender has it already (it is not hashed again).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0 <= start <= len(data):
        raise ProtocolError(f"cannot resume at byte {start} of a {len(data)}-byte payload")
    digest = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
    if start == len(data):
        yield Chunk(start, len(data), digest, b"")
        return
    view = memoryview(data)
    for offset in range(start, len(data), chunk_size):
        yield Chunk(offset, len(data), digest, bytes(view[offset : offset + chunk_size]))


class ChunkAssembler:
    """Receives the chunks of one payload in order and returns its verified bytes.

    ``max_bytes`` bounds the payload (checked against the size it declares
    before any data is kept); ``expected_sha256`` and ``expected_size``,
    when given, are what the payload must be (e.g. from a signed header).
    ``prefix`` holds the bytes already received before a resumed transfer.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        prefix: bytes = b"",
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self._buffer = bytearray(prefix)
        self._declared: tuple[int, str] | None = None
        self._chunks = 0

    @property
    def received(self) -> int:
        """Bytes received so far (the resumed prefix included)."""
        return len(self._buffer)

    def add(self, chunk: Chunk) -> None:
        """Take the next chunk; raise ``ProtocolError`` or ``IntegrityError`` if it cannot be."""
        self._check_declaration(chunk)
        if self._chunks and self.received == chunk.total_size:
            raise ProtocolError(f"chunk at offset {chunk.offset} after the payload was complete")
        if chunk.offset != self.received:
            problem = "duplicate or out-of-order" if chunk.offset < self.received else "missing"
            raise ProtocolError(
                f"{problem} chunk: got offset {chunk.offset}, expected {self.received}"
            )
        if not chunk.data and chunk.total_size != chunk.offset:
            raise ProtocolError(f"empty chunk at offset {chunk.offset} of an unfinished payload")
        self._buffer += chunk.data
        self._chunks += 1

    def finish(self) -> bytes:
        """The whole payload, once its size and sha256 are as declared and expected."""
        if self._declared is None:
            raise ProtocolError("no chunk received")
        total_size, sha256 = self._declared
        if self.received != total_size:
            raise ProtocolError(f"truncated payload: {self.received} of {total_size} bytes")
        actual = hashlib.sha256(self._buffer).hexdigest()
        if actual != sha256:
            raise IntegrityError(
                f"payload hashes to {actual[:16]}..., it was declared as {sha256[:16]}..."
            )
        return bytes(self._buffer)

    def _check_declaration(self, chunk: Chunk) -> None:
        """Every chunk must declare the same size and sha256, and the ones expected."""
        if self._declared is None:
            if chunk.total_size > self.max_bytes:
                raise PayloadTooLarge(
                    f"payload of {chunk.total_size} bytes exceeds the limit of {self.max_bytes}"
                )
            if self.expected_size is not None and chunk.total_size != self.expected_size:
                raise ProtocolError(
                    f"chunks declare {chunk.total_size} bytes, expected {self.expected_size}"
                )
            if self.expected_sha256 is not None and chunk.sha256 != self.expected_sha256:
                raise IntegrityError(
                    f"chunks declare sha256 {chunk.sha256[:16]}..., "
                    f"expected {self.expected_sha256[:16]}..."
                )
            self._declared = (chunk.total_size, chunk.sha256)
        elif (chunk.total_size, chunk.sha256) != self._declared:
            raise ProtocolError(f"chunk at offset {chunk.offset} declares another payload")


def assemble_chunks(
    chunks: Iterable[Chunk],
    *,
    max_bytes: int,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
) -> bytes:
    """Put a payload back together from its chunks (see :class:`ChunkAssembler`).

    Raises ``PayloadTooLarge`` (a ``ProtocolError``) past ``max_bytes``,
    ``ProtocolError`` for a gap, a duplicate, an out-of-order or a missing
    chunk, and ``IntegrityError`` when the bytes do not hash as expected.
    """
    assembler = ChunkAssembler(
        max_bytes=max_bytes, expected_sha256=expected_sha256, expected_size=expected_size
    )
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


def decode_parameters(data: bytes, *, expected_sha256: str | None = None) -> Parameters:
    """Read a safetensors payload; ``expected_sha256`` is the parameters' content hash.

    Raises ``ProtocolError`` for bytes that are not a readable Shoal
    safetensors payload, and ``IntegrityError`` when the content does not
    match its embedded or expected sha256.
    """
    try:
        return Parameters.from_bytes(data, expected_sha256=expected_sha256)
    except IntegrityError:
        raise
    except ModelError as exc:
        raise ProtocolError(f"malformed parameters payload: {exc}") from exc
