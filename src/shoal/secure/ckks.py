"""CKKS homomorphic encryption of parameter vectors over TenSEAL: keys, encrypt, sum, decrypt.

Cross-silo aggregation without a trusted coordinator: every silo encrypts
its update under the consortium's public key, the coordinator adds the
ciphertexts without ever being able to read one, and only the key holder
(:mod:`shoal.secure.keyholder`), the one party with the secret key, turns
the sum back into numbers. CKKS is approximate: a decrypted sum differs from
the exact one by a small absolute error (about 2e-8 for ten silos at the
default 2^40 scale).

A CKKS ciphertext holds at most ``slot_count`` (half the polynomial degree)
values, so an :class:`EncryptedVector` is a sequence of ciphertexts, each a
serialized TenSEAL ``CKKSVector``; one million parameters at the default
degree 8192 make 245 ciphertexts of about 330 KB. Contexts and vectors cross
this module's boundary as bytes, never as TenSEAL objects.

TenSEAL is the ``shoal[he]`` extra and is imported only when a function
needs it. Its errors are mapped at the boundary: bytes that are not a
context or a framed vector raise :class:`ProtocolError`; a ciphertext that
SEAL refuses, or that does not fit the consortium's parameters, raises
:class:`SecurityError`. SEAL does not detect every altered bit (a flip
inside the coefficient data yields a valid but wrong ciphertext), so
integrity comes from elsewhere: each silo signs the sha256 of its
ciphertext (:meth:`EncryptedVector.sha256`) in a contribution receipt.

>>> keys = generate_keys(CkksParameters())  # doctest: +SKIP
>>> total = sum_encrypted(keys.public_context, [
...     encrypt_vector(keys.public_context, np.ones(3)) for _ in range(2)])  # doctest: +SKIP
>>> decrypt_vector(keys.secret_context, total).round(6).tolist()  # doctest: +SKIP
[2.0, 2.0, 2.0]
"""

from __future__ import annotations

import hashlib
import importlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError, MissingExtraError, ProtocolError, SecurityError

MAGIC = b"SHOALCKKS"
FORMAT_VERSION = 1
MAX_CHUNK_BYTES = 64 * 2**20  # a degree-32768 ciphertext with 16 primes is 8 MiB
MAX_CHUNKS = 2**24
MAX_LENGTH = 2**40
_SECURE_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}  # SEAL, 128-bit security
_HEADER = struct.Struct(">BQI")  # version, length, number of chunks
_U32 = struct.Struct(">I")
_TENSEAL_ERRORS = (ValueError, RuntimeError, TypeError)


def _tenseal() -> ModuleType:
    try:
        return importlib.import_module("tenseal")
    except ImportError as exc:
        raise MissingExtraError(
            extra="he", package="tenseal", feature="homomorphic aggregation (CKKS)"
        ) from exc


# --- framing -----------------------------------------------------------------------------


def length_prefixed(data: bytes) -> bytes:
    """``data`` preceded by its length as 4 big-endian bytes."""
    return _U32.pack(len(data)) + data


class FrameReader:
    """Reads fixed-size and length-prefixed fields from bytes; short or trailing data is refused.

    Every failure is a :class:`ProtocolError` naming ``what`` was being read.
    """

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(data)
        self._offset = 0
        self.what = what

    def take(self, size: int) -> bytes:
        if size < 0 or self._offset + size > len(self._data):
            raise ProtocolError(f"{self.what} is truncated at byte {self._offset}")
        chunk = bytes(self._data[self._offset : self._offset + size])
        self._offset += size
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def field(self, *, max_bytes: int) -> bytes:
        (size,) = self.unpack(_U32)
        if size > max_bytes:
            raise ProtocolError(f"{self.what}: a field of {size} bytes exceeds {max_bytes}")
        return self.take(size)

    def expect(self, prefix: bytes) -> None:
        if self.take(len(prefix)) != prefix:
            raise ProtocolError(f"{self.what} does not start with {prefix!r}")

    def finish(self) -> None:
        if self._offset != len(self._data):
            raise ProtocolError(
                f"{self.what} has {len(self._data) - self._offset} unexpected trailing bytes"
            )


# --- parameters and keys -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CkksParameters:
    """The CKKS parameters of a consortium; the defaults give 128-bit security (SEAL's table).

    Only additions are ever computed, so the default chain of primes is
    generous; ``global_scale_bits`` sets the precision (the absolute error
    scales as 2^-global_scale_bits).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40

    def __post_init__(self) -> None:
        degree, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if degree not in _SECURE_COEFF_BITS:
            raise ConfigError(
                f"poly_modulus_degree must be one of {sorted(_SECURE_COEFF_BITS)}, got {degree}"
            )
        if not isinstance(bits, tuple) or len(bits) < 2:
            raise ConfigError(f"coeff_mod_bit_sizes needs a tuple of >= 2 primes, got {bits!r}")
        if any(not isinstance(b, int) or not 20 <= b <= 60 for b in bits):
            raise ConfigError(f"each coefficient prime has 20 to 60 bits, got {bits}")
        if sum(bits) > _SECURE_COEFF_BITS[degree]:
            raise ConfigError(
                f"coeff_mod_bit_sizes sum to {sum(bits)} bits, above the "
                f"{_SECURE_COEFF_BITS[degree]} that degree {degree} allows at 128-bit security"
            )
        if not 20 <= self.global_scale_bits < bits[0]:
            raise ConfigError(
                f"global_scale_bits must be >= 20 and below the first prime's {bits[0]} bits, "
                f"got {self.global_scale_bits}"
            )

    @property
    def slot_count(self) -> int:
        """How many values one ciphertext holds."""
        return self.poly_modulus_degree // 2


@dataclass(frozen=True, slots=True, repr=False)
class ConsortiumKeys:
    """A consortium's serialized TenSEAL contexts.

    ``public_context`` holds the parameters and the public key: enough to
    encrypt and add, and what silos and the coordinator get. Only the key
    holder keeps ``secret_context``, which also holds the secret key.
    """

    public_context: bytes
    secret_context: bytes

    def __repr__(self) -> str:  # never print a secret key, nor half a megabyte of public one
        return f"ConsortiumKeys(public_context=<{len(self.public_context)} bytes>, secret=<hidden>)"


def generate_keys(params: CkksParameters) -> ConsortiumKeys:
    """A fresh CKKS key pair for ``params``, as serialized public and secret contexts."""
    ts = _tenseal()
    try:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except _TENSEAL_ERRORS as exc:
        raise ConfigError(f"TenSEAL refused the CKKS parameters {params}: {exc}") from exc
    context.global_scale = 2.0**params.global_scale_bits

    def serialize(*, secret: bool) -> bytes:
        # no relinearization or Galois keys: an aggregate needs additions only
        return bytes(
            context.serialize(
                save_public_key=True,
                save_secret_key=secret,
                save_galois_keys=False,
                save_relin_keys=False,
            )
        )

    return ConsortiumKeys(serialize(secret=False), serialize(secret=True))


def load_context(serialized: bytes) -> Any:
    """A TenSEAL CKKS context from its bytes; ``ProtocolError`` if they are not one."""
    ts = _tenseal()
    try:
        context = ts.context_from(serialized)
    except _TENSEAL_ERRORS as exc:
        raise ProtocolError(f"not a serialized TenSEAL context: {exc}") from exc
    if _parameters_of(context).scheme().name != "CKKS":
        raise ProtocolError("the serialized TenSEAL context is not a CKKS context")
    return context


def _parameters_of(context: Any) -> Any:
    return context.seal_context().data.key_context_data().parms()


def slot_count_of(context: Any) -> int:
    """The number of values one ciphertext holds under a loaded ``context``."""
    return int(_parameters_of(context).poly_modulus_degree()) // 2


# --- encrypted vectors -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncryptedVector:
    """A vector of ``length`` values encrypted as ciphertexts of up to ``slot_count`` values each.

    ``chunks`` are serialized TenSEAL ``CKKSVector``\\ s, in order. The empty
    vector has no chunk. Whether the chunk sizes fit a context's slot count
    is checked when the chunks are read against that context.
    """

    length: int
    chunks: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.chunks, tuple):
            raise ProtocolError(f"chunks must be a tuple of bytes, got {type(self.chunks)}")
        if not 0 <= self.length <= MAX_LENGTH:
            raise ProtocolError(f"length must be in [0, {MAX_LENGTH}], got {self.length}")
        if (self.length == 0) != (not self.chunks) or len(self.chunks) > self.length:
            raise ProtocolError(
                f"{len(self.chunks)} ciphertexts cannot hold a vector of {self.length} values"
            )
        if len(self.chunks) > MAX_CHUNKS:
            raise ProtocolError(f"at most {MAX_CHUNKS} ciphertexts, got {len(self.chunks)}")
        for index, chunk in enumerate(self.chunks):
            if not isinstance(chunk, bytes) or not 0 < len(chunk) <= MAX_CHUNK_BYTES:
                raise ProtocolError(f"ciphertext {index} must be 1 to {MAX_CHUNK_BYTES} bytes")

    @property
    def num_bytes(self) -> int:
        """The size of :meth:`to_bytes`, without building it."""
        return len(MAGIC) + _HEADER.size + sum(_U32.size + len(c) for c in self.chunks)

    def to_bytes(self) -> bytes:
        """Magic, version, length, chunk count, then each chunk prefixed by its size."""
        header = MAGIC + _HEADER.pack(FORMAT_VERSION, self.length, len(self.chunks))
        return b"".join((header, *(length_prefixed(chunk) for chunk in self.chunks)))

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedVector:
        """Parse :meth:`to_bytes`; any malformed input raises ``ProtocolError``."""
        reader = FrameReader(data, "an encrypted vector")
        reader.expect(MAGIC)
        version, length, count = reader.unpack(_HEADER)
        if version != FORMAT_VERSION:
            raise ProtocolError(f"encrypted vector format {version} is not {FORMAT_VERSION}")
        if count > min(length, MAX_CHUNKS):
            raise ProtocolError(f"{count} ciphertexts for a vector of {length} values")
        chunks = tuple(reader.field(max_bytes=MAX_CHUNK_BYTES) for _ in range(count))
        reader.finish()
        return cls(length=length, chunks=chunks)

    def sha256(self) -> str:
        """The sha256 of :meth:`to_bytes`, in hex: what a silo signs in its receipt."""
        return hashlib.sha256(self.to_bytes()).hexdigest()


def _chunk_sizes(length: int, slot_count: int) -> list[int]:
    return [min(slot_count, length - start) for start in range(0, length, slot_count)]


def read_ciphertexts(context: Any, vector: EncryptedVector) -> list[Any]:
    """Each chunk as a CKKSVector of the context, checked against the expected layout."""
    ts = _tenseal()
    sizes = _chunk_sizes(vector.length, slot_count_of(context))
    if len(sizes) != len(vector.chunks):
        raise ProtocolError(
            f"a vector of {vector.length} values takes {len(sizes)} ciphertexts under this "
            f"context, got {len(vector.chunks)}"
        )
    loaded = []
    for index, (chunk, size) in enumerate(zip(vector.chunks, sizes, strict=True)):
        try:
            ciphertext = ts.ckks_vector_from(context, chunk)
        except _TENSEAL_ERRORS as exc:
            raise SecurityError(
                f"ciphertext {index} is not valid under the consortium's parameters "
                f"(altered, or encrypted under other parameters): {exc}"
            ) from exc
        if ciphertext.size() != size:
            raise ProtocolError(f"ciphertext {index} holds {ciphertext.size()} values, not {size}")
        loaded.append(ciphertext)
    return loaded


def encrypt_vector(public_context: bytes, vector: npt.ArrayLike) -> EncryptedVector:
    """Encrypt a finite 1-D float32 or float64 vector under the consortium's public key.

    Refuses (``ProtocolError``) another dtype, another shape, and NaN or
    infinity, which CKKS would encode into garbage.
    """
    values = np.asarray(vector)
    if values.dtype not in (np.float32, np.float64) or values.ndim != 1:
        raise ProtocolError(
            f"CKKS encrypts a 1-D float32 or float64 vector, got {values.dtype} of shape "
            f"{values.shape}"
        )
    if not np.isfinite(values).all():
        raise ProtocolError("refusing to encrypt a vector with NaN or infinity")
    ts = _tenseal()
    context = load_context(public_context)
    slots = slot_count_of(context)
    flat = values.astype(np.float64, copy=False)
    chunks = tuple(
        bytes(ts.ckks_vector(context, flat[start : start + slots].tolist()).serialize())
        for start in range(0, len(flat), slots)
    )
    return EncryptedVector(length=len(flat), chunks=chunks)


class EncryptedSum:
    """A running sum of encrypted vectors of one length: ``add`` them as they arrive.

    Each ciphertext is deserialized once and added in place. An ``add`` that
    fails leaves the sum as it was (added chunks are subtracted back, which
    is exact in CKKS: the arithmetic is modular).
    """

    def __init__(self, public_context: bytes) -> None:
        self._context = load_context(public_context)
        self._sum: list[Any] = []
        self._count = 0
        self.length: int | None = None

    @property
    def count(self) -> int:
        """How many vectors were added."""
        return self._count

    def add(self, vector: EncryptedVector) -> None:
        """Add ``vector``; ``ProtocolError`` on a length mismatch, ``SecurityError`` if invalid."""
        if self.length is not None and vector.length != self.length:
            raise ProtocolError(f"cannot add a vector of {vector.length} to a sum of {self.length}")
        incoming = read_ciphertexts(self._context, vector)
        if self.length is None:
            self._sum, self.length = incoming, vector.length
        else:
            self._add_all(incoming)
        self._count += 1

    def _add_all(self, incoming: list[Any]) -> None:
        done = 0
        try:
            for total, ciphertext in zip(self._sum, incoming, strict=True):
                total.add_(ciphertext)
                done += 1
        except _TENSEAL_ERRORS as exc:
            for total, ciphertext in zip(self._sum[:done], incoming[:done], strict=True):
                total.sub_(ciphertext)
            raise SecurityError(
                f"ciphertext {done} cannot be added to the sum (another scale?): {exc}"
            ) from exc

    def result(self) -> EncryptedVector:
        """The encrypted sum so far; ``ProtocolError`` if nothing was added."""
        if self.length is None:
            raise ProtocolError("the sum of no encrypted vector is undefined")
        chunks = tuple(bytes(total.serialize()) for total in self._sum)
        return EncryptedVector(length=self.length, chunks=chunks)


def sum_encrypted(public_context: bytes, vectors: Sequence[EncryptedVector]) -> EncryptedVector:
    """The encrypted sum of ``vectors`` (all of one length; at least one)."""
    if not vectors:
        raise ProtocolError("the sum of no encrypted vector is undefined")
    total = EncryptedSum(public_context)
    for vector in vectors:
        total.add(vector)
    return total.result()


def decrypt_vector(secret_context: bytes, vector: EncryptedVector) -> npt.NDArray[np.float64]:
    """The ``length`` float64 values of ``vector``; needs the context with the secret key.

    Raises ``SecurityError`` when the context holds no secret key (a public
    context cannot decrypt) or a ciphertext is invalid under it.
    """
    context = load_context(secret_context)
    if not context.has_secret_key():
        raise SecurityError("this context holds no secret key: only the key holder can decrypt")
    result = np.empty(vector.length, dtype=np.float64)
    slots = slot_count_of(context)
    for index, ciphertext in enumerate(read_ciphertexts(context, vector)):
        try:
            values = ciphertext.decrypt()
        except _TENSEAL_ERRORS as exc:
            raise SecurityError(f"cannot decrypt ciphertext {index}: {exc}") from exc
        result[index * slots : index * slots + len(values)] = values
    return result
