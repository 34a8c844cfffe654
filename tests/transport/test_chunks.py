"""Chunked payloads: splitting, reassembly, and every way a stream of chunks can be wrong."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import example, given
from hypothesis import strategies as st

from shoal.core.errors import IntegrityError, ProtocolError
from shoal.core.parameters import Parameters
from shoal.transport.chunks import (
    ChunkAssembler,
    PayloadTooLarge,
    assemble_chunks,
    chunk_payload,
    decode_parameters,
)
from shoal.transport.messages import Chunk


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=300))
def test_chunks_reassemble_to_the_payload(data: bytes, chunk_size: int) -> None:
    chunks = list(chunk_payload(data, chunk_size))
    assert all(len(chunk.data) <= chunk_size for chunk in chunks)
    assert len(chunks) == max(1, -(-len(data) // chunk_size))
    assert assemble_chunks(chunks, max_bytes=len(data)) == data


def test_an_empty_payload_is_one_empty_chunk() -> None:
    (chunk,) = chunk_payload(b"", 16)
    assert chunk == Chunk(0, 0, hashlib.sha256(b"").hexdigest(), b"")
    assert assemble_chunks([chunk], max_bytes=0) == b""


@pytest.mark.parametrize("size", [16, 32, 48])
def test_exact_multiples_of_the_chunk_size_have_no_empty_tail(size: int) -> None:
    data = bytes(range(size))
    chunks = list(chunk_payload(data, 16))
    assert [len(chunk.data) for chunk in chunks] == [16] * (size // 16)
    assert assemble_chunks(chunks, max_bytes=size) == data


def test_a_resumed_transfer_continues_from_its_prefix() -> None:
    data = bytes(range(100))
    assembler = ChunkAssembler(max_bytes=100, prefix=data[:37])
    for chunk in chunk_payload(data, 10, start=37):
        assembler.add(chunk)
    assert assembler.finish() == data
    with pytest.raises(ProtocolError, match="resume"):
        list(chunk_payload(data, 10, start=101))


def test_the_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        list(chunk_payload(b"abc", 0))


def chunks_of(data: bytes, size: int = 4) -> list[Chunk]:
    return list(chunk_payload(data, size))


DATA = bytes(range(20))


def test_a_missing_chunk_is_refused() -> None:
    chunks = chunks_of(DATA)
    with pytest.raises(ProtocolError, match="missing chunk"):
        assemble_chunks([chunks[0], chunks[2]], max_bytes=100)


def test_a_duplicate_chunk_is_refused() -> None:
    chunks = chunks_of(DATA)
    with pytest.raises(ProtocolError, match="duplicate"):
        assemble_chunks([chunks[0], chunks[1], chunks[1]], max_bytes=100)


def test_out_of_order_chunks_are_refused() -> None:
    chunks = chunks_of(DATA)
    with pytest.raises(ProtocolError, match="missing chunk"):
        assemble_chunks([chunks[1], chunks[0]], max_bytes=100)
    with pytest.raises(ProtocolError, match="missing chunk"):
        assemble_chunks([chunks[0], chunks[2], chunks[1]], max_bytes=100)


def test_a_truncated_stream_is_refused() -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        assemble_chunks(chunks_of(DATA)[:-1], max_bytes=100)
    with pytest.raises(ProtocolError, match="no chunk"):
        assemble_chunks([], max_bytes=100)


def test_a_chunk_after_the_end_is_refused() -> None:
    chunks = chunks_of(DATA)
    tail = Chunk(20, 20, chunks[0].sha256, b"")
    with pytest.raises(ProtocolError, match="complete"):
        assemble_chunks([*chunks, tail], max_bytes=100)
    empty = chunks_of(b"")
    with pytest.raises(ProtocolError, match="complete"):
        assemble_chunks(empty + empty, max_bytes=100)


def test_an_empty_chunk_in_the_middle_is_refused() -> None:
    chunks = chunks_of(DATA)
    with pytest.raises(ProtocolError, match="empty chunk"):
        assemble_chunks([chunks[0], dataclasses.replace(chunks[1], data=b"")], max_bytes=100)


def test_a_payload_over_the_limit_is_refused_before_any_data_is_kept() -> None:
    assembler = ChunkAssembler(max_bytes=19)
    with pytest.raises(PayloadTooLarge, match="exceeds the limit of 19"):
        assembler.add(chunks_of(DATA)[0])
    assert assembler.received == 0
    assert issubclass(PayloadTooLarge, ProtocolError)


def test_a_chunk_cannot_run_past_the_size_it_declares() -> None:
    with pytest.raises(ProtocolError, match="runs past"):
        Chunk(16, 20, hashlib.sha256(DATA).hexdigest(), b"12345")


def test_chunks_that_disagree_on_the_payload_are_refused() -> None:
    chunks = chunks_of(DATA)
    other = dataclasses.replace(chunks[1], total_size=24)
    with pytest.raises(ProtocolError, match="another payload"):
        assemble_chunks([chunks[0], other], max_bytes=100)


def test_bytes_that_do_not_hash_as_declared_are_refused() -> None:
    chunks = chunks_of(DATA)
    corrupted = dataclasses.replace(chunks[2], data=b"\xff" * 4)
    with pytest.raises(IntegrityError, match="hashes to"):
        assemble_chunks([chunks[0], chunks[1], corrupted, *chunks[3:]], max_bytes=100)


def test_the_expected_hash_and_size_are_enforced() -> None:
    chunks = chunks_of(DATA)
    with pytest.raises(IntegrityError, match="expected"):
        assemble_chunks(chunks, max_bytes=100, expected_sha256="0" * 64)
    with pytest.raises(ProtocolError, match="expected 21"):
        assemble_chunks(chunks, max_bytes=100, expected_size=21)
    digest = hashlib.sha256(DATA).hexdigest()
    assert assemble_chunks(chunks, max_bytes=20, expected_sha256=digest, expected_size=20) == DATA


# --- safetensors payloads -------------------------------------------------------------


def model() -> Parameters:
    return Parameters.from_arrays([np.arange(6.0).reshape(2, 3), np.ones(2)], names=["w", "b"])


def test_a_payload_decodes_to_its_float32_vector() -> None:
    params = model()
    vector = decode_parameters(params.to_bytes()).vector
    assert vector.dtype == np.float32
    np.testing.assert_array_equal(vector, params.vector)
    assert decode_parameters(params.to_bytes(), expected_sha256=params.sha256()).layout == (
        params.layout
    )


def test_an_empty_model_decodes() -> None:
    empty = Parameters.from_arrays([])
    assert decode_parameters(empty.to_bytes()).vector.size == 0


def test_a_payload_for_another_model_fails_its_hash() -> None:
    with pytest.raises(IntegrityError):
        decode_parameters(model().to_bytes(), expected_sha256="0" * 64)


def safetensors_with_header(header: object) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 7,
        b"not safetensors at all",
        struct.pack("<Q", 10**9) + b"{}",
        safetensors_with_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
        safetensors_with_header({"__metadata__": {"shoal.layout": "[[1, 2"}}),
    ],
)
def test_malformed_bytes_are_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed parameters payload"):
        decode_parameters(data)


def with_layout(layout: str, values: int = 4) -> bytes:
    """A safetensors payload of one float32 tensor ``w`` whose Shoal layout says ``layout``."""
    return safetensors.numpy.save(
        {"w": np.zeros(values, np.float32)}, metadata={"format": "shoal", "shoal.layout": layout}
    )


@pytest.mark.parametrize(
    "layout",
    [
        '[["w",[1e400],"float32"]]',  # an infinite dimension: int() overflowed
        '[["w",[4.0],"float32"]]',
        '[["w",[true],"float32"]]',
        '[["w",["4"],"float32"]]',
        '[["w",[-4],"float32"]]',
        '[["w",[4],"float32","extra"]]',
        '[["w",4,"float32"]]',
        '[[7,[4],"float32"]]',
        '{"w":[4]}',
        "[" * 100_000 + "]" * 100_000,  # nesting deeper than the parser's recursion
        '[["w",[4],"no-such-dtype"]]',
    ],
)
def test_a_hostile_layout_is_a_protocol_error(layout: str) -> None:
    """What an uploader writes in a payload's layout is refused as malformed, whatever it is:
    before, an infinite dimension raised OverflowError and deep nesting RecursionError, which
    no caller caught."""
    with pytest.raises(ProtocolError, match="malformed parameters payload"):
        decode_parameters(with_layout(layout))


def test_a_tampered_tensor_fails_the_embedded_hash() -> None:
    data = bytearray(model().to_bytes())
    data[-1] ^= 0x40
    with pytest.raises(IntegrityError):
        decode_parameters(bytes(data))


@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_foreign_errors(data: bytes) -> None:
    with pytest.raises((ProtocolError, IntegrityError)):
        decode_parameters(data)


@given(st.integers(min_value=0, max_value=400), st.binary(min_size=1, max_size=8))
@example(393, b",")  # a comma in the layout's dtype: numpy's parser raised a SyntaxError
def test_corrupting_a_valid_payload_gives_a_shoal_error(position: int, noise: bytes) -> None:
    data = bytearray(model().to_bytes())
    position %= len(data)
    data[position : position + len(noise)] = noise
    with contextlib.suppress(ProtocolError, IntegrityError):  # anything else escapes
        decode_parameters(bytes(data))


def test_an_upload_is_hashed_once_on_each_side(monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.transport import serde
    from shoal.transport.messages import UpdateHeader

    real, content = hashlib.sha256, Parameters.sha256
    hashed: list[int] = []

    def counting(data: bytes = b"") -> Any:
        hashed.append(len(data))
        return real(data)

    def counting_content(self: Parameters) -> str:
        hashed.append(self.vector.nbytes)
        return content(self)

    update = Parameters.from_arrays([np.arange(50_000, dtype=np.float32)])
    payload = update.to_bytes(content_sha256=False)
    monkeypatch.setattr(hashlib, "sha256", counting)
    monkeypatch.setattr(Parameters, "sha256", counting_content)
    # the sender: the payload's digest goes into the header, the chunks reuse it
    digest = hashlib.sha256(payload).hexdigest()
    header = serde.encode_update_header(UpdateHeader(1, "run", 5, digest, len(payload), "b" * 64))
    parts = list(serde.update_parts(header, payload, chunk_size=4096))
    assert [size for size in hashed if size >= 50_000] == [len(payload)]
    hashed.clear()
    # the receiver: the assembled bytes are checked against the header, then decoded
    assembler = ChunkAssembler(max_bytes=2**20, expected_sha256=digest)
    for part in parts[1:]:
        assembler.add(serde.chunk_of(part))
    vector = decode_parameters(assembler.finish()).vector
    assert [size for size in hashed if size >= 50_000] == [len(payload)]
    np.testing.assert_array_equal(vector, update.vector)
