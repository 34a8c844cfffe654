"""The ``shoal.features`` manifest: round trips, and every hostile binary or manifest refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

wasmtime = pytest.importorskip("wasmtime")

from shoal.core.errors import ConfigError  # noqa: E402
from shoal.features import (  # noqa: E402
    ABI_VERSION,
    MANIFEST_SECTION,
    FeatureManifest,
    read_manifest,
    with_manifest,
)
from shoal.features.manifest import MAX_MANIFEST_BYTES, MAX_SECTIONS  # noqa: E402

HEADER = b"\0asm\x01\0\0\0"
DOCUMENT: dict[str, Any] = {
    "abi": 1,
    "name": "clicks",
    "version": "2.4.0",
    "inputs": ["clicks", "views"],
    "outputs": ["ratio"],
}
MANIFEST = FeatureManifest("clicks", "2.4.0", ("clicks", "views"), ("ratio",))
TYPE_SECTION = b"\x01\x04\x01\x60\x00\x00"  # one type: () -> ()
COLUMN = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fullmatch=True)


def leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def custom(payload: bytes, name: bytes = MANIFEST_SECTION.encode()) -> bytes:
    body = leb128(len(name)) + name + payload
    return b"\0" + leb128(len(body)) + body


def manifest_payload(**changes: Any) -> bytes:
    return json.dumps({**DOCUMENT, **changes}).encode()


def without(key: str) -> bytes:
    return json.dumps({k: v for k, v in DOCUMENT.items() if k != key}).encode()


def test_constants() -> None:
    assert (ABI_VERSION, MANIFEST_SECTION) == (1, "shoal.features")


def test_reads_the_section_a_text_module_declares() -> None:
    payload = manifest_payload().decode().replace('"', '\\"')
    wasm = bytes(wasmtime.wat2wasm(f'(module (@custom "shoal.features" "{payload}"))'))
    assert read_manifest(wasm) == MANIFEST


def test_to_json_is_canonical() -> None:
    assert MANIFEST.to_json() == (
        b'{"abi":1,"inputs":["clicks","views"],"name":"clicks","outputs":["ratio"],'
        b'"version":"2.4.0"}'
    )
    assert FeatureManifest.from_json(MANIFEST.to_json()) == MANIFEST


def test_lists_become_tuples() -> None:
    manifest = FeatureManifest("clicks", "2.4.0", ["clicks", "views"], ["ratio"])  # type: ignore[arg-type]
    assert manifest == MANIFEST
    assert isinstance(manifest.inputs, tuple)


def test_with_manifest_replaces_every_section_and_keeps_the_others() -> None:
    other = custom(b"\x01\x02", name=b"name")
    wasm = HEADER + custom(manifest_payload(name="old")) + TYPE_SECTION + other
    wasm += custom(manifest_payload(name="older"))
    replaced = with_manifest(wasm, MANIFEST)
    assert read_manifest(replaced) == MANIFEST
    assert replaced == HEADER + TYPE_SECTION + other + custom(MANIFEST.to_json())
    wasmtime.Module(wasmtime.Engine(), replaced)  # still a valid module


def test_with_manifest_refuses_what_is_not_wasm() -> None:
    with pytest.raises(ConfigError, match="not a WebAssembly binary"):
        with_manifest(b"(module)", MANIFEST)


@given(
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
    version=st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True),
    inputs=st.lists(COLUMN, min_size=1, max_size=20, unique=True),
    outputs=st.lists(COLUMN, min_size=1, max_size=20, unique=True),
)
def test_round_trip(name: str, version: str, inputs: list[str], outputs: list[str]) -> None:
    manifest = FeatureManifest(name, version, tuple(inputs), tuple(outputs))
    assert read_manifest(with_manifest(HEADER + TYPE_SECTION, manifest)) == manifest


def test_no_section() -> None:
    with pytest.raises(ConfigError, match=r"no 'shoal\.features' custom section"):
        read_manifest(HEADER + TYPE_SECTION + custom(b"x", name=b"shoal.feature"))


def test_two_sections() -> None:
    section = custom(manifest_payload())
    with pytest.raises(ConfigError, match=r"has 2 'shoal\.features' custom sections"):
        read_manifest(HEADER + section + TYPE_SECTION + section)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{", "not UTF-8 JSON"),
        (b'{"abi": 1,}', "not UTF-8 JSON"),
        (b"\xff\xfe{}", "not UTF-8 JSON"),
        (b"[1]", "JSON list, not object"),
        (b'"abi"', "JSON str, not object"),
        (manifest_payload(extra=1), "unknown keys: 'extra'"),
        (manifest_payload(Name="x"), "unknown keys: 'Name'"),
        (without("outputs"), "lacks the keys: 'outputs'"),
        (without("abi"), "lacks the keys: 'abi'"),
        (manifest_payload()[:-1] + b', "abi": 1}', "repeated"),
        (manifest_payload(abi=2), "ABI 2: this Shoal runs ABI 1"),
        (manifest_payload(abi=0), "ABI 0"),
        (manifest_payload(abi=True), "ABI True"),
        (manifest_payload(abi=1.0), "ABI 1.0"),
        (manifest_payload(abi="1"), "ABI '1'"),
        (manifest_payload().replace(b'"abi": 1', b'"abi": NaN'), "NaN is not JSON"),
        (manifest_payload(name=""), "name '' is not"),
        (manifest_payload(name="-clicks"), "name '-clicks' is not"),
        (manifest_payload(name="click rate"), "name 'click rate' is not"),
        (manifest_payload(name="a" * 65), "name 'aaa"),
        (manifest_payload(name=7), "name 7 is not"),
        (manifest_payload(version=""), "version '' is not"),
        (manifest_payload(version="2.4 beta"), "version '2.4 beta' is not"),
        (manifest_payload(version="1" * 65), "version '111"),
        (manifest_payload(version="2.4\n"), "version"),
        (manifest_payload(version=2.4), "version 2.4 is not"),
        (manifest_payload(inputs=[]), "has 0 inputs: 1 to 1,024"),
        (manifest_payload(inputs=[f"c{i}" for i in range(1025)]), "1025 inputs: 1 to 1,024"),
        (manifest_payload(outputs=[f"c{i}" for i in range(4097)]), "4097 outputs: 1 to 4,096"),
        (manifest_payload(inputs="clicks"), "inputs is a str, not a list"),
        (manifest_payload(outputs={"ratio": 1}), "outputs is a dict, not a list"),
        (manifest_payload(inputs=["a", "b", "a"]), "inputs name 'a' is repeated"),
        (manifest_payload(outputs=["ratio", "ratio"]), "outputs name 'ratio' is repeated"),
        (manifest_payload(inputs=["1st"]), "inputs name '1st' is not"),
        (manifest_payload(inputs=["click-rate"]), "inputs name 'click-rate' is not"),
        (manifest_payload(outputs=[""]), "outputs name '' is not"),
        (manifest_payload(outputs=["r" * 65]), "outputs name 'rrr"),
        (manifest_payload(outputs=[None]), "outputs name None is not"),
        (manifest_payload(inputs=["caf\u00e9"]), "inputs name 'caf\u00e9' is not"),
    ],
)
def test_refuses_a_bad_manifest(payload: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        read_manifest(HEADER + custom(payload))
    assert "\n" not in str(caught.value)


def test_refuses_a_payload_over_64_kib() -> None:
    payload = manifest_payload()[:-1] + b" " * MAX_MANIFEST_BYTES + b"}"
    with pytest.raises(ConfigError, match="over 65536 bytes"):
        read_manifest(HEADER + custom(payload))


def test_refuses_a_manifest_too_big_to_carry() -> None:
    outputs = tuple(f"{'o' * 60}{i:04d}" for i in range(4096))
    with pytest.raises(ConfigError, match="over 65536 bytes as JSON"):
        FeatureManifest("clicks", "1.0", ("a",), outputs)


def test_refuses_deep_nesting_in_one_line() -> None:
    payload = b'{"abi": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    with pytest.raises(ConfigError):
        read_manifest(HEADER + custom(payload[:MAX_MANIFEST_BYTES]))


@pytest.mark.parametrize(
    ("wasm", "message"),
    [
        (b"", "of 0 bytes is truncated"),
        (HEADER[:7], "of 7 bytes is truncated"),
        (b"\0asn\x01\0\0\0", "does not start with"),
        (b"(module)", "does not start with"),
        (b"\0asm\x02\0\0\0", "version 02000000 is not 1"),
        (HEADER + b"\x01", "section at byte 8: its size runs past the end"),
        (HEADER + b"\x01\x85", "section at byte 8: its size runs past the end"),
        (HEADER + b"\x01\x80\x80\x80\x80\x80\x00", "LEB128 longer than 5 bytes"),
        (HEADER + b"\x01\xff\xff\xff\xff\x7f", "does not fit in 32 bits"),
        (HEADER + b"\x01\x05abc", "section at byte 8 of 5 bytes runs past the end"),
        (HEADER + TYPE_SECTION + b"\x0a\xff\xff\xff\xff\x0f", "runs past the end"),
        (HEADER + b"\0\x03\x05abc", "custom section name at byte 8 runs past its section"),
        (HEADER + b"\0\x00" + TYPE_SECTION, "custom section name at byte 8: its size runs past"),
        (HEADER + b"\0\x03\x02\xc3\x28", "custom section name at byte 8 is not UTF-8"),
        (HEADER + b"\0\x01\x81" + TYPE_SECTION, "custom section name at byte 8: its size runs"),
    ],
)
def test_refuses_hostile_bytes(wasm: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        read_manifest(wasm)
    assert "\n" not in str(caught.value)


def test_a_section_may_end_exactly_at_the_end() -> None:
    wasm = HEADER + custom(manifest_payload())
    assert read_manifest(wasm) == MANIFEST
    with pytest.raises(ConfigError, match="runs past the end"):
        read_manifest(wasm[:-1])


def test_an_overlong_but_bounded_leb128_is_read() -> None:
    payload = manifest_payload()
    body = b"\x8e\x80\x80\x80\x00" + MANIFEST_SECTION.encode() + payload  # 14 in five bytes
    assert read_manifest(HEADER + b"\0" + leb128(len(body)) + body) == MANIFEST


def test_refuses_millions_of_sections_quickly() -> None:
    sections = custom(b"", name=b"name") * (MAX_SECTIONS - 1) + custom(manifest_payload())
    assert read_manifest(HEADER + sections) == MANIFEST
    with pytest.raises(ConfigError, match="over 1,024 sections"):
        read_manifest(HEADER + b"\x0b\x00" * (8 * 2**20))
