"""The key holder: the one party with the consortium's secret key, which decrypts only aggregates.

Cross-silo homomorphic aggregation splits the roles. Each silo encrypts its
update under the public key (:mod:`shoal.secure.ckks`) and signs a
:class:`ContributionReceipt`: run, round, silo and the sha256 of its
ciphertext. The coordinator checks each ciphertext against its receipt
(:func:`verify_contribution`), adds the ciphertexts, and sends the key holder
the encrypted sum with the receipts. The key holder, which is not the
coordinator, returns the plaintext sum.

Threat model. The coordinator is honest but curious: it follows the
protocol, and would read any individual update it could. It never holds the
secret key, and the key holder never receives an individual ciphertext, only
an aggregate with signed receipts. The key holder cannot prove that the
aggregate is the sum of exactly the receipted ciphertexts: a coordinator
that sent one silo's ciphertext as "the aggregate", or that colluded with
the key holder, is out of scope. Two rules bound what a curious coordinator
learns anyway:

- a decryption needs receipts from at least ``min_contributors`` distinct
  registered silos, all for this run and round, all with valid signatures;
- each (run, round) is decrypted at most once, ever. Decrypted rounds are
  appended to a journal (fsync'd before the plaintext is returned), so a
  restarted key holder still refuses; otherwise a coordinator could ask for
  the sums of overlapping subsets of silos and subtract them.

CKKS leaks through decryption: given a ciphertext and its exact decrypted
value, one can solve for the secret key (Li and Micciancio, EUROCRYPT 2021),
and the coordinator holds both. The key holder therefore adds Gaussian noise
from the OS CSPRNG to every decrypted value ("noise flooding"), by default
with standard deviation 2^-16 (about 1.5e-5), some 2^9 times the CKKS error
of a ten-silo sum at the default 2^40 scale, so the exact error the attack
needs is hidden. Raise ``global_scale_bits`` and the noise together for a
wider margin. The noise is sized for that scale, so the key holder decrypts
only what adding the silos' ciphertexts gives (:func:`check_sum_form`: their
scale, their level, two polynomials): a ciphertext encrypted at scale 2 would
come back with its error 2^39 times less hidden. A ciphertext crafted by
hand in that form cannot be told from a sum, and is decrypted: a coordinator
that sends one is not honest, and out of scope (above).

Folder layout (``KeyHolder.init``)::

    manifest.json       parameters, silos and their Ed25519 keys, min_contributors
    public.context      what silos and the coordinator get
    secret.context      mode 0600; never leaves this folder
    decryptions.jsonl   one line per decrypted (run, round); append-only, fsync'd
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ConfigError, ProtocolError, RunError, SecurityError
from shoal.secure.ckks import (
    CkksParameters,
    EncryptedVector,
    FrameReader,
    decrypt_vector,
    generate_keys,
    length_prefixed,
    load_context,
    read_ciphertexts,
)

RECEIPT_CONTEXT = b"shoal.v1/he-contribution-receipt\x00"
"""Domain separation: a receipt signature is valid for nothing else (a request, another scheme)."""

MANIFEST = "manifest.json"
PUBLIC_CONTEXT = "public.context"
SECRET_CONTEXT = "secret.context"
JOURNAL = "decryptions.jsonl"
LOCK = "keyholder.lock"
MANIFEST_FORMAT = "shoal.keyholder/1"
DEFAULT_DECRYPTION_NOISE_STD = 2.0**-16

_RECEIPT_MAGIC = b"SHOALRCPT\x01"
_MAX_ID_BYTES = 256
_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_ROUND = struct.Struct(">q")


def _check_identifier(value: str, what: str) -> None:
    if not isinstance(value, str) or not 0 < len(value.encode()) <= _MAX_ID_BYTES:
        raise ProtocolError(f"{what} must be 1 to {_MAX_ID_BYTES} bytes, got {value!r}")


def _check_round(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ProtocolError(f"round must be an integer >= 0, got {value!r}")


# --- receipts ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContributionReceipt:
    """A silo's signed statement: "in this run and round I contributed the ciphertext with this
    sha256"."""

    run_id: str
    round: int
    silo_id: str
    ciphertext_sha256: str
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_identifier(self.run_id, "run id")
        _check_identifier(self.silo_id, "silo id")
        _check_round(self.round)
        check_sha256_hex(self.ciphertext_sha256, "ciphertext_sha256")
        if not isinstance(self.signature, bytes) or len(self.signature) != _SIGNATURE_BYTES:
            raise ProtocolError(f"an Ed25519 signature has {_SIGNATURE_BYTES} bytes")

    def to_bytes(self) -> bytes:
        """A length-prefixed encoding, for the wire and for storage."""
        return b"".join(
            (
                _RECEIPT_MAGIC,
                length_prefixed(self.run_id.encode()),
                _ROUND.pack(self.round),
                length_prefixed(self.silo_id.encode()),
                bytes.fromhex(self.ciphertext_sha256),
                self.signature,
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ContributionReceipt:
        """Parse :meth:`to_bytes`; malformed input raises ``ProtocolError``."""
        reader = FrameReader(data, "a contribution receipt")
        reader.expect(_RECEIPT_MAGIC)
        run_id = _decode(reader.field(max_bytes=_MAX_ID_BYTES), "run id")
        (round_number,) = reader.unpack(_ROUND)
        silo_id = _decode(reader.field(max_bytes=_MAX_ID_BYTES), "silo id")
        digest = reader.take(32).hex()
        signature = reader.take(_SIGNATURE_BYTES)
        reader.finish()
        return cls(run_id, round_number, silo_id, digest, signature)


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8") from exc


def receipt_message(*, run_id: str, round: int, silo_id: str, ciphertext_sha256: str) -> bytes:
    """The exact bytes a receipt signature covers: context, then length-prefixed fields."""
    check_sha256_hex(ciphertext_sha256, "ciphertext_sha256")
    return b"".join(
        (
            RECEIPT_CONTEXT,
            length_prefixed(run_id.encode()),
            _ROUND.pack(round),
            length_prefixed(silo_id.encode()),
            bytes.fromhex(ciphertext_sha256),
        )
    )


def sign_receipt(
    private_key: bytes, *, run_id: str, round: int, silo_id: str, ciphertext_sha256: str
) -> ContributionReceipt:
    """A silo's receipt for its ciphertext, signed with its raw 32-byte Ed25519 private key."""
    if len(private_key) != _KEY_BYTES:
        raise SecurityError(
            f"an Ed25519 private key has {_KEY_BYTES} bytes, got {len(private_key)}"
        )
    _check_identifier(run_id, "run id")
    _check_identifier(silo_id, "silo id")
    _check_round(round)
    message = receipt_message(
        run_id=run_id, round=round, silo_id=silo_id, ciphertext_sha256=ciphertext_sha256
    )
    signature = Ed25519PrivateKey.from_private_bytes(private_key).sign(message)
    return ContributionReceipt(run_id, round, silo_id, ciphertext_sha256, signature)


def verify_receipt(public_key: bytes, receipt: ContributionReceipt) -> None:
    """Raise ``SecurityError`` unless ``receipt`` was signed by the holder of ``public_key``."""
    message = receipt_message(
        run_id=receipt.run_id,
        round=receipt.round,
        silo_id=receipt.silo_id,
        ciphertext_sha256=receipt.ciphertext_sha256,
    )
    try:
        _load_public(public_key).verify(receipt.signature, message)
    except InvalidSignature as exc:
        raise SecurityError(f"bad signature on the receipt of silo {receipt.silo_id!r}") from exc


def verify_contribution(
    public_key: bytes,
    receipt: ContributionReceipt,
    ciphertext: EncryptedVector,
    *,
    run_id: str,
    round: int,
) -> None:
    """The coordinator's check of one silo's upload: receipt for this round, signed, and the
    ciphertext is the one signed (a ciphertext altered in transit fails here).
    """
    if (receipt.run_id, receipt.round) != (run_id, round):
        raise SecurityError(
            f"the receipt of {receipt.silo_id!r} is for run {receipt.run_id!r} round "
            f"{receipt.round}, not run {run_id!r} round {round}"
        )
    verify_receipt(public_key, receipt)
    if ciphertext.sha256() != receipt.ciphertext_sha256:
        raise SecurityError(
            f"the ciphertext from {receipt.silo_id!r} does not match the sha256 it signed "
            "(altered after signing)"
        )


def _load_public(public_key: bytes) -> Ed25519PublicKey:
    if not isinstance(public_key, bytes) or len(public_key) != _KEY_BYTES:
        raise SecurityError(f"an Ed25519 public key has {_KEY_BYTES} bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError as exc:
        raise SecurityError(f"not a usable Ed25519 public key: {exc}") from exc


def check_receipts(
    silos: Mapping[str, bytes],
    *,
    run_id: str,
    round: int,
    receipts: Sequence[ContributionReceipt],
    min_contributors: int,
) -> tuple[str, ...]:
    """The contributing silos, once every receipt is acceptable; else ``SecurityError``.

    Each receipt must be for ``run_id`` and ``round``, come from a silo in
    ``silos`` (id to Ed25519 public key), carry a valid signature, and name
    a silo no other receipt names; there must be ``min_contributors`` of them.
    """
    seen: set[str] = set()
    for receipt in receipts:
        if (receipt.run_id, receipt.round) != (run_id, round):
            raise SecurityError(
                f"a receipt of {receipt.silo_id!r} is for run {receipt.run_id!r} round "
                f"{receipt.round}, not run {run_id!r} round {round}"
            )
        if receipt.silo_id not in silos:
            raise SecurityError(f"{receipt.silo_id!r} is not a registered silo")
        if receipt.silo_id in seen:
            raise SecurityError(f"two receipts from silo {receipt.silo_id!r}")
        verify_receipt(silos[receipt.silo_id], receipt)
        seen.add(receipt.silo_id)
    if len(seen) < min_contributors:
        raise SecurityError(
            f"an aggregate needs receipts from at least {min_contributors} distinct silos, "
            f"got {len(seen)}"
        )
    return tuple(sorted(seen))


# --- policy and folder -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyHolderPolicy:
    """What a key holder enforces: the parameters, the silos, the threshold, the flooding noise."""

    params: CkksParameters
    min_contributors: int
    silos: Mapping[str, bytes]
    decryption_noise_std: float = DEFAULT_DECRYPTION_NOISE_STD

    def __post_init__(self) -> None:
        for silo_id, public_key in self.silos.items():
            try:
                _check_identifier(silo_id, "silo id")
                _load_public(public_key)
            except (ProtocolError, SecurityError) as exc:
                raise ConfigError(f"silo {silo_id!r}: {exc}") from exc
        if not 2 <= self.min_contributors <= len(self.silos):
            raise ConfigError(
                f"min_contributors must be between 2 (an aggregate of one silo is that silo's "
                f"update) and the {len(self.silos)} registered silos, got {self.min_contributors}"
            )
        if not (math.isfinite(self.decryption_noise_std) and self.decryption_noise_std >= 0):
            raise ConfigError(
                f"decryption_noise_std must be finite and >= 0, got {self.decryption_noise_std}"
            )
        object.__setattr__(self, "silos", MappingProxyType(dict(self.silos)))

    def to_json(self, *, public_context_sha256: str) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "poly_modulus_degree": self.params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.params.coeff_mod_bit_sizes),
            "global_scale_bits": self.params.global_scale_bits,
            "min_contributors": self.min_contributors,
            "decryption_noise_std": self.decryption_noise_std,
            "silos": {silo_id: key.hex() for silo_id, key in sorted(self.silos.items())},
            "public_context_sha256": public_context_sha256,
        }

    @classmethod
    def from_json(cls, data: Any) -> tuple[KeyHolderPolicy, str]:
        """The policy and the public context's sha256 of a manifest; ``RunError`` if malformed."""
        try:
            if data["format"] != MANIFEST_FORMAT:
                raise RunError(f"manifest format {data['format']!r} is not {MANIFEST_FORMAT!r}")
            params = CkksParameters(
                poly_modulus_degree=int(data["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in data["coeff_mod_bit_sizes"]),
                global_scale_bits=int(data["global_scale_bits"]),
            )
            silos = {str(name): bytes.fromhex(key) for name, key in data["silos"].items()}
            policy = cls(
                params=params,
                min_contributors=int(data["min_contributors"]),
                silos=silos,
                decryption_noise_std=float(data["decryption_noise_std"]),
            )
            digest = str(data["public_context_sha256"])
            check_sha256_hex(digest, "public_context_sha256")
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError, ProtocolError) as e:
            raise RunError(f"the key holder's manifest is malformed: {e!r}") from e
        return policy, digest


@dataclass(frozen=True, slots=True)
class DecryptionRecord:
    """One line of the journal: a (run, round) that was decrypted, and from which silos."""

    run_id: str
    round: int
    silos: tuple[str, ...]
    aggregate_sha256: str
    length: int
    decrypted_at: str


class KeyHolder:
    """The key holder of one consortium, kept in a folder (see the module docstring).

    Thread-safe, and safe against a second process on the same folder: the
    check "not decrypted yet" and the journal append happen under a lock.
    """

    def __init__(
        self, directory: Path, policy: KeyHolderPolicy, public: bytes, secret: bytes
    ) -> None:
        self.directory = directory
        self.policy = policy
        self._public = public
        self._secret = secret
        self._lock = threading.Lock()

    @property
    def min_contributors(self) -> int:
        return self.policy.min_contributors

    @property
    def silos(self) -> Mapping[str, bytes]:
        return self.policy.silos

    @classmethod
    def init(
        cls,
        directory: str | Path,
        *,
        params: CkksParameters | None = None,
        min_contributors: int,
        silos: Mapping[str, bytes],
        decryption_noise_std: float = DEFAULT_DECRYPTION_NOISE_STD,
    ) -> KeyHolder:
        """Generate the consortium's keys into a new key-holder folder; refuses to overwrite."""
        policy = KeyHolderPolicy(
            params=params or CkksParameters(),
            min_contributors=min_contributors,
            silos=silos,
            decryption_noise_std=decryption_noise_std,
        )
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        existing = [n for n in (MANIFEST, PUBLIC_CONTEXT, SECRET_CONTEXT) if (folder / n).exists()]
        if existing:
            raise SecurityError(
                f"{folder} already holds {', '.join(existing)}: refusing to overwrite"
            )
        keys = generate_keys(policy.params)
        digest = hashlib.sha256(keys.public_context).hexdigest()
        _write_new(folder / SECRET_CONTEXT, keys.secret_context, mode=0o600)
        _write_new(folder / PUBLIC_CONTEXT, keys.public_context, mode=0o644)
        manifest = json.dumps(policy.to_json(public_context_sha256=digest), indent=2) + "\n"
        _write_new(folder / MANIFEST, manifest.encode(), mode=0o644)  # last: marks it complete
        _fsync_directory(folder)
        return cls(folder, policy, keys.public_context, keys.secret_context)

    @classmethod
    def open(cls, directory: str | Path) -> KeyHolder:
        """Open a folder made by :meth:`init`, checking its files; ``RunError`` if incomplete."""
        folder = Path(directory)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            public = (folder / PUBLIC_CONTEXT).read_bytes()
            secret_path = folder / SECRET_CONTEXT
            mode = secret_path.stat().st_mode
            secret = secret_path.read_bytes()
        except (OSError, ValueError) as exc:
            raise RunError(f"{folder} is not a key-holder folder: {exc}") from exc
        if mode & 0o077:
            raise SecurityError(
                f"{secret_path} is readable by others (mode {mode & 0o777:o}): chmod 600 it"
            )
        policy, digest = KeyHolderPolicy.from_json(manifest)
        if hashlib.sha256(public).hexdigest() != digest:
            raise RunError(f"{folder / PUBLIC_CONTEXT} does not match the manifest's sha256")
        holder = cls(folder, policy, public, secret)
        holder.decrypted_rounds()  # a corrupt journal is found now, not at the first decryption
        return holder

    def public_context(self) -> bytes:
        """The serialized public context: what silos encrypt with and the coordinator adds with."""
        return self._public

    def public_context_sha256(self) -> str:
        """What silos compare, out of band, with the context they are handed."""
        return hashlib.sha256(self._public).hexdigest()

    def decrypted_rounds(self) -> list[DecryptionRecord]:
        """Every decryption so far, oldest first, read from the journal."""
        return _read_journal(self.directory / JOURNAL)

    def check_request(
        self, *, run_id: str, round: int, receipts: Sequence[ContributionReceipt]
    ) -> tuple[str, ...]:
        """The contributing silos, or the refusal :meth:`decrypt_aggregate` would raise for
        these receipts; cheap (no ciphertext is read), so a server calls it first.
        """
        _check_identifier(run_id, "run id")
        _check_round(round)
        silos = check_receipts(
            self.policy.silos,
            run_id=run_id,
            round=round,
            receipts=receipts,
            min_contributors=self.policy.min_contributors,
        )
        self._refuse_if_decrypted(run_id, round)  # again under the lock, before decrypting
        return silos

    def decrypt_aggregate(
        self,
        *,
        run_id: str,
        round: int,
        aggregate: EncryptedVector,
        receipts: Sequence[ContributionReceipt],
    ) -> npt.NDArray[np.float64]:
        """The plaintext sum of one round, once (see the module docstring for the rules).

        Raises ``SecurityError`` when the receipts do not allow it or this
        (run, round) was decrypted before; ``ProtocolError`` or
        ``SecurityError`` when the aggregate is malformed.
        """
        silos = self.check_request(run_id=run_id, round=round, receipts=receipts)
        check_sum_form(self._public, self.policy.params, aggregate)
        with self._exclusive():
            self._refuse_if_decrypted(run_id, round)
            values = decrypt_vector(self._secret, aggregate)
            if self.policy.decryption_noise_std > 0:
                values += self.policy.decryption_noise_std * csprng_standard_normal(len(values))
            record = DecryptionRecord(
                run_id=run_id,
                round=round,
                silos=silos,
                aggregate_sha256=aggregate.sha256(),
                length=aggregate.length,
                decrypted_at=datetime.now(UTC).isoformat(),
            )
            _append_journal(self.directory / JOURNAL, record)
        return values

    def _refuse_if_decrypted(self, run_id: str, round: int) -> None:
        if any((r.run_id, r.round) == (run_id, round) for r in self.decrypted_rounds()):
            raise SecurityError(
                f"run {run_id!r} round {round} was decrypted already: one decryption per "
                "round (a second, over other silos, would reveal their difference)"
            )

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            descriptor = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                yield
            finally:
                os.close(descriptor)  # releases the flock


def check_sum_form(
    public_context: bytes, params: CkksParameters, aggregate: EncryptedVector
) -> None:
    """Refuse an aggregate that adding the silos' fresh ciphertexts cannot have given.

    Such a sum has one ciphertext per ``slot_count`` values, each of two
    polynomials at the first level of the modulus chain, at scale
    2^global_scale_bits exactly, the scale the flooding noise is sized for.
    A wrong layout raises ``ProtocolError``, any other form ``SecurityError``;
    neither allocates the vector (2^40 values in one ciphertext is a refusal).
    """
    expected = -(-aggregate.length // params.slot_count)
    if len(aggregate.chunks) != expected:
        raise ProtocolError(
            f"a vector of {aggregate.length} values takes {expected} ciphertexts of "
            f"{params.slot_count} slots, got {len(aggregate.chunks)}"
        )
    context = load_context(public_context)
    chain = context.seal_context().data
    first_level = chain.first_context_data().chain_index()
    for index, vector in enumerate(read_ciphertexts(context, aggregate)):
        problem = _form_problem(vector.data.ciphertext(), chain, params, first_level=first_level)
        if problem:
            raise SecurityError(
                f"ciphertext {index} {problem}: an aggregate of the silos' ciphertexts is "
                "refused in any other form (the flooding noise is sized for that one)"
            )


def _form_problem(
    ciphertexts: Sequence[Any], chain: Any, params: CkksParameters, *, first_level: int
) -> str | None:
    """What differs from a sum of fresh ciphertexts (TenSEAL's SEAL bindings), if anything."""
    if len(ciphertexts) != 1:
        return f"holds {len(ciphertexts)} SEAL ciphertexts, not 1"
    (ciphertext,) = ciphertexts
    if ciphertext.scale != 2.0**params.global_scale_bits:
        mantissa, exponent = math.frexp(ciphertext.scale)
        shown = f"2^{exponent - 1}" if mantissa == 0.5 else f"{ciphertext.scale:.6g}"
        return f"has scale {shown}, not the consortium's 2^{params.global_scale_bits}"
    level = chain.get_context_data(ciphertext.parms_id()).chain_index()
    if level != first_level:
        return f"is at chain index {level}, not the first level's {first_level}"
    if ciphertext.size() != 2:
        return f"has {ciphertext.size()} polynomials, not 2"
    return None


def csprng_standard_normal(count: int) -> npt.NDArray[np.float64]:
    """``count`` standard normal draws (Box-Muller) from the OS CSPRNG, never a seeded PRNG."""
    raw = np.frombuffer(os.urandom(16 * count), dtype="<u8").reshape(count, 2) >> np.uint64(11)
    radius_uniform = (raw[:, 0].astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]: log is finite
    angle_uniform = raw[:, 1].astype(np.float64) * 2.0**-53
    result: npt.NDArray[np.float64] = np.sqrt(-2.0 * np.log(radius_uniform)) * np.cos(
        2.0 * np.pi * angle_uniform
    )
    return result


# --- files -------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (a secret is never briefly world-readable)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)  # the umask may have narrowed it


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_journal(path: Path) -> list[DecryptionRecord]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    # A last line without its newline was torn by a crash during the append; its
    # plaintext was never returned (the append is fsync'd before that), so it is skipped.
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            data = json.loads(line)
            records.append(
                DecryptionRecord(
                    run_id=str(data["run_id"]),
                    round=int(data["round"]),
                    silos=tuple(str(s) for s in data["silos"]),
                    aggregate_sha256=str(data["aggregate_sha256"]),
                    length=int(data["length"]),
                    decrypted_at=str(data["decrypted_at"]),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{path} line {number} is corrupt ({exc!r}): refusing to go on") from exc
    return records


def _append_journal(path: Path, record: DecryptionRecord) -> None:
    line = json.dumps(
        {
            "run_id": record.run_id,
            "round": record.round,
            "silos": list(record.silos),
            "aggregate_sha256": record.aggregate_sha256,
            "length": record.length,
            "decrypted_at": record.decrypted_at,
        }
    )
    created = not path.exists()
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        content = os.pread(descriptor, os.fstat(descriptor).st_size, 0)
        complete = content.rfind(b"\n") + 1
        if complete != len(content):
            os.ftruncate(descriptor, complete)  # a torn last line (see _read_journal) goes
        os.write(descriptor, line.encode() + b"\n")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if created:
        _fsync_directory(path.parent)


@dataclass(frozen=True, slots=True)
class SiloKeys:
    """A silo's receipt keys as a keys file holds them: the private half only in its own copy."""

    public: bytes = field(repr=False)
    private: bytes | None = field(default=None, repr=False)


def read_silo_keys(path: Path) -> dict[str, SiloKeys]:
    """Silo id to its Ed25519 receipt keys, from a JSON object file.

    Each value is a hex public key, or a pair of ``shoal keyholder silo-keys``
    (``{"private": hex, "public": hex}``, the private half optional).
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the silos file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of silo id to hex public key")
    keys: dict[str, SiloKeys] = {}
    for name, value in data.items():
        pair: dict[str, object] = value if isinstance(value, dict) else {"public": value}
        public, private = pair.get("public"), pair.get("private")
        if not isinstance(public, str) or not isinstance(private, str | None):
            raise ConfigError(f"{path}: silo {name!r} has no hex public key")
        try:
            keys[str(name)] = SiloKeys(
                bytes.fromhex(public), None if private is None else bytes.fromhex(private)
            )
        except ValueError:
            raise ConfigError(f"{path}: the key of silo {name!r} is not hex") from None
    return keys
