"""Hostile peers of a served key holder over real gRPC: strangers, and a coordinator that cheats.

Each attack was reproduced against ``serve_keyholder`` before its fix:

- A request of 20 MB whose aggregate held four million one-byte "ciphertexts"
  took 3.2 s of CPU and 355 MB to parse, all before its receipts, which a
  stranger does not have, were looked at; 100,000 receipts (12 MB) took 0.75 s,
  though no consortium has more silos than it registered.
- An aggregate of 2^33 values in one ciphertext, sent with the round's
  receipts, reached ``np.empty`` (64 GiB): gRPC UNKNOWN, a traceback in the
  log, nothing counted.
- An aggregate encrypted at scale 2 (one call: ``ts.ckks_vector(public, zeros,
  scale=2)``) was decrypted with the same 2^-16 flooding noise: its CKKS error
  came back some 2^39 times less hidden than at the consortium's scale 2^40,
  the exact error that the key-recovery attack needs. A ciphertext at a lower
  level of the modulus chain, or of three polynomials, was decrypted too.
- A run id with a line break (the silos sign whatever run id the coordinator
  names) forged a second line in the key holder's log.
- A malformed ``PublicContext`` request was refused without a log line or a
  count, unlike a malformed ``Decrypt``.
- A stranger's calls were not bounded: gRPC takes as many streams per
  connection as a peer opens, each holding up to 512 MiB before anything reads
  it, and a silent connection was kept for 120 s.

What held, and is kept by the last tests: garbage is one rate-limited log line
per refusal, never a traceback; duplicated receipts, receipts of another
round and receipts of unregistered silos are refused; concurrent identical
requests decrypt once.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import numpy as np
import pytest

from shoal.secure.ckks import EncryptedVector, encrypt_vector, load_context, sum_encrypted
from shoal.secure.keyholder import ContributionReceipt, KeyHolder, sign_receipt
from shoal.transport.keyholder_service import (
    DECRYPT_METHOD,
    MAX_KEYHOLDER_CALLS,
    PUBLIC_CONTEXT_METHOD,
    KeyHolderServer,
    encode_decrypt_request,
    serve_keyholder,
)
from shoal.transport.signing import generate_client_key

ts = pytest.importorskip("tenseal")
sealapi = pytest.importorskip("tenseal.sealapi")

pytestmark = pytest.mark.timeout(120)

RUN = "run-hostile"
SILO_KEYS = {f"silo-{index}": generate_client_key() for index in range(3)}
SCALE = 2.0**40  # the consortium's (CkksParameters' default global_scale_bits)
Method = grpc.UnaryUnaryMultiCallable  # bytes in, bytes out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KeyHolderServer]:
    public_keys = {silo: public for silo, (_, public) in SILO_KEYS.items()}
    KeyHolder.init(tmp_path / "keyholder", min_contributors=2, silos=public_keys)
    with serve_keyholder(tmp_path / "keyholder", insecure=True) as running:
        yield running


@pytest.fixture
def channel(server: KeyHolderServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 2**31 - 1)]
    with grpc.insecure_channel(server.address, options=options) as opened:
        yield opened


def methods(channel: grpc.Channel) -> tuple[Method[bytes, bytes], Method[bytes, bytes]]:
    return channel.unary_unary(DECRYPT_METHOD), channel.unary_unary(PUBLIC_CONTEXT_METHOD)


def refusal(method: Method[bytes, bytes], request: bytes) -> tuple[grpc.StatusCode, str]:
    """The status and details of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=60)
    assert isinstance(caught.value, grpc.Call)
    return caught.value.code(), caught.value.details() or ""


def receipts_for(
    aggregate: EncryptedVector, *, round: int, run_id: str = RUN
) -> list[ContributionReceipt]:
    """Every silo's receipt for ``round``, as a coordinator holds them (any sha256 will do:
    the key holder never sees the silos' ciphertexts)."""
    return [
        sign_receipt(
            private, run_id=run_id, round=round, silo_id=silo, ciphertext_sha256=aggregate.sha256()
        )
        for silo, (private, _) in SILO_KEYS.items()
    ]


def honest_sum(public: bytes) -> EncryptedVector:
    return sum_encrypted(public, [encrypt_vector(public, np.ones(8)) for _ in SILO_KEYS])


def decrypt_request(aggregate: EncryptedVector, *, round: int, run_id: str = RUN) -> bytes:
    receipts = receipts_for(aggregate, round=round, run_id=run_id)
    return encode_decrypt_request(
        run_id=run_id, round=round, aggregate=aggregate, receipts=receipts
    )


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# --- a stranger: no receipt, no certificate ----------------------------------------------


def test_an_aggregate_is_not_parsed_before_the_receipts_pass(
    channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []
    original = EncryptedVector.from_bytes.__func__

    def spy(cls: type[EncryptedVector], data: bytes) -> EncryptedVector:
        parsed.append(len(data))
        return original(cls, data)

    monkeypatch.setattr(EncryptedVector, "from_bytes", classmethod(spy))
    count = 2**20  # one-byte "ciphertexts": a microsecond of parsing each
    empty = EncryptedVector(count * 4096, (b"x",) * count)
    stranger = ContributionReceipt(RUN, 1, "stranger", "00" * 32, b"\x00" * 64)
    request = encode_decrypt_request(run_id=RUN, round=1, aggregate=empty, receipts=[stranger] * 2)
    decrypt, _ = methods(channel)
    code, details = refusal(decrypt, request)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert details == "'stranger' is not a registered silo"
    assert parsed == []


def test_more_receipts_than_registered_silos_are_refused_unread(channel: grpc.Channel) -> None:
    decrypt, public_context = methods(channel)
    aggregate = honest_sum(public_context(b"", timeout=30))
    receipts = receipts_for(aggregate, round=1)
    request = encode_decrypt_request(
        run_id=RUN, round=1, aggregate=aggregate, receipts=[*receipts, receipts[0]]
    )
    code, details = refusal(decrypt, request)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert (
        details == "a decrypt request carries at most 3 receipts (one per registered silo), got 4"
    )


def test_a_malformed_public_context_request_is_logged_and_counted(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    _, public_context = methods(channel)
    with caplog.at_level(logging.INFO, logger="shoal.keyholder"):
        code, _ = refusal(public_context, b"x")
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert [r.getMessage() for r in caplog.records] == [
        "PublicContext from 127.0.0.1 refused: invalid_argument "
        "(PublicContext takes an empty request)"
    ]


def test_a_flood_of_garbage_is_a_few_log_lines_and_no_traceback(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    decrypt, public_context = methods(channel)
    honest = decrypt_request(honest_sum(public_context(b"", timeout=30)), round=1)
    garbage = [b"", b"nonsense", honest[:-1], honest + b"\x00", b"\xff" * 64]
    with caplog.at_level(logging.INFO, logger="shoal"):
        for index in range(50):
            code, _ = refusal(decrypt, garbage[index % len(garbage)])
            assert code is grpc.StatusCode.INVALID_ARGUMENT
    no_tracebacks(caplog)
    assert len(caplog.records) <= 6  # five refusals, then one line saying the rest are suppressed


# --- a coordinator that misbehaves: it holds the round's receipts -------------------------


def test_an_aggregate_longer_than_its_ciphertexts_is_one_refusal(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    decrypt, public_context = methods(channel)
    aggregate = honest_sum(public_context(b"", timeout=30))
    stretched = EncryptedVector(2**33, aggregate.chunks)
    with caplog.at_level(logging.INFO, logger="shoal"):
        code, details = refusal(decrypt, decrypt_request(stretched, round=1))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "a vector of 8589934592 values takes 2097152 ciphertexts of 4096 slots, got 1"
    )
    no_tracebacks(caplog)
    decrypt(decrypt_request(aggregate, round=1), timeout=60)  # the round was not burned


def rewrapped(vector: Any, change: Callable[[Any, Any], None]) -> bytes:
    """``vector`` serialized with its SEAL ciphertext changed in place by ``change(evaluator,
    ciphertext)``: what a coordinator with TenSEAL's SEAL bindings can send."""
    (ciphertext,) = vector.data.ciphertext()
    change(sealapi.Evaluator(vector.context().seal_context().data), ciphertext)
    serialized = bytes(vector.serialize())  # fields: 1 the shape, 2 the SEAL ciphertext, 3 scale
    with tempfile.TemporaryDirectory() as folder:
        ciphertext.save(f"{folder}/ciphertext")
        sealed = Path(folder, "ciphertext").read_bytes()
    original = ciphertext_field(serialized)
    return serialized.replace(original, length_delimited(2, sealed))


def length_delimited(field: int, data: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(data)) + data


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def ciphertext_field(serialized: bytes) -> bytes:
    """The whole field 2 (tag, length, SEAL bytes) of a serialized CKKSVector."""
    shape = 2 + serialized[1]  # field 1: tag, a one-byte length, the packed shape
    start, length, offset = shape + 1, 0, 0
    while True:
        byte = serialized[start]
        length |= (byte & 0x7F) << offset
        start, offset = start + 1, offset + 7
        if byte < 0x80:
            return serialized[shape : start + length]


def test_the_flooding_noise_is_not_left_behind_by_another_scale_level_or_size(
    channel: grpc.Channel,
) -> None:
    decrypt, public_context = methods(channel)
    context = load_context(public_context(b"", timeout=30))
    zeros = [0.0] * 8

    def low_level(evaluator: Any, ciphertext: Any) -> None:
        evaluator.mod_switch_to_next_inplace(ciphertext)

    def three_polynomials(evaluator: Any, ciphertext: Any) -> None:
        (other,) = ts.ckks_vector(context, zeros, scale=2.0**20).data.ciphertext()
        evaluator.multiply_inplace(ciphertext, other)  # no relinearization: 3 polynomials

    crafted = {
        "has scale 2^1, not the consortium's 2^40": bytes(
            ts.ckks_vector(context, zeros, scale=2.0).serialize()
        ),
        "has scale 2^20, not the consortium's 2^40": bytes(
            ts.ckks_vector(context, zeros, scale=2.0**20).serialize()
        ),
        "is at chain index 1, not the first level's 2": rewrapped(
            ts.ckks_vector(context, zeros), low_level
        ),
        "has 3 polynomials, not 2": rewrapped(
            ts.ckks_vector(context, zeros, scale=2.0**20), three_polynomials
        ),
    }
    for round, (message, chunk) in enumerate(crafted.items(), start=1):
        code, details = refusal(decrypt, decrypt_request(EncryptedVector(8, (chunk,)), round=round))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert details == (
            f"ciphertext 0 {message}: an aggregate of the silos' ciphertexts is refused "
            "in any other form (the flooding noise is sized for that one)"
        )
    honest = honest_sum(public_context(b"", timeout=30))
    decrypt(decrypt_request(honest, round=1), timeout=60)  # refusals do not burn a round


def test_a_run_id_cannot_forge_a_log_line(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    decrypt, public_context = methods(channel)
    aggregate = honest_sum(public_context(b"", timeout=30))
    run_id = "run-1\nkey holder stopped"
    with caplog.at_level(logging.INFO, logger="shoal.keyholder"):
        decrypt(decrypt_request(aggregate, round=1, run_id=run_id), timeout=60)
    (line,) = [r.getMessage() for r in caplog.records if "decrypted" in r.getMessage()]
    assert "\n" not in line
    assert line.startswith("decrypted run 'run-1\\nkey holder stopped' round 1 for ")


def test_receipt_tricks_are_refused_and_identical_requests_decrypt_once(
    channel: grpc.Channel,
) -> None:
    decrypt, public_context = methods(channel)
    aggregate = honest_sum(public_context(b"", timeout=30))
    receipts = receipts_for(aggregate, round=1)
    stranger_private, _ = generate_client_key()
    forged = sign_receipt(
        stranger_private,
        run_id=RUN,
        round=1,
        silo_id="silo-9",
        ciphertext_sha256=aggregate.sha256(),
    )
    tricks = {
        "two receipts from silo 'silo-0'": [receipts[0], receipts[0]],
        "'silo-9' is not a registered silo": [receipts[0], forged],
        "a receipt of 'silo-0' is for run 'run-hostile' round 1, not run 'run-hostile' round 2": (
            receipts
        ),
    }
    for message, chosen in tricks.items():
        round = 2 if "round 2" in message else 1
        request = encode_decrypt_request(
            run_id=RUN, round=round, aggregate=aggregate, receipts=chosen
        )
        assert refusal(decrypt, request) == (grpc.StatusCode.PERMISSION_DENIED, message)
    request = decrypt_request(aggregate, round=1)
    start = threading.Barrier(4)
    outcomes: list[str] = []

    def attempt() -> None:
        start.wait()
        try:
            decrypt(request, timeout=60)
            outcomes.append("decrypted")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name if isinstance(exc, grpc.Call) else repr(exc))

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["PERMISSION_DENIED"] * 3 + ["decrypted"]


def test_a_strangers_connection_gets_few_calls_and_a_silent_one_is_let_go(
    server: KeyHolderServer,
) -> None:
    """Mutual TLS keeps strangers from calling at all; without it, they are bounded."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as speaking:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        speaking.sendall(conn.data_to_send())
        conn.receive_data(speaking.recv(1 << 16))
        assert conn.remote_settings.max_concurrent_streams == MAX_KEYHOLDER_CALLS == 8
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as silent:
        started = time.monotonic()
        received = b""
        while chunk := silent.recv(1 << 16):
            received += chunk
        assert time.monotonic() - started < 20  # gRPC's own: 120 s
        assert b"handshake" in received.lower()
