"""A feature module's manifest: the ``shoal.features`` custom section of a WebAssembly binary.

A feature module names the feature set it computes, its version, the raw columns it reads
and the features it writes in one custom section (docs/portable-features.md). This module
reads the binary's sections without compiling anything, strictly and within bounds: a
truncated binary, a LEB128 number longer than 5 bytes or running past the end, a section
running past the end, a section name that is not UTF-8, and any manifest that is not exactly
the contract's JSON object are each refused with a :class:`ConfigError` of one line.

>>> manifest = FeatureManifest("clicks", "1.0", inputs=("a", "b"), outputs=("ratio",))
>>> read_manifest(with_manifest(b"\\0asm\\x01\\0\\0\\0", manifest)) == manifest
True
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from shoal.core.errors import ConfigError

ABI_VERSION = 1
"""The ``shoal-features`` ABI this Shoal runs: a manifest's ``abi``."""
MANIFEST_SECTION = "shoal.features"
"""The name of the custom section that holds a feature module's manifest."""
MAX_MANIFEST_BYTES = 64 * 1024
MAX_INPUTS = 1024
MAX_OUTPUTS = 4096
MAX_SECTIONS = 1024
"""The most sections a binary may have: toolchains emit a few dozen at most (one of each kind,
debug and name sections), and walking millions of empty ones takes seconds."""

_MAGIC = b"\0asm"
_VERSION = b"\x01\0\0\0"
_CUSTOM = 0
_MAX_LEB128_BYTES = 5  # a u32
_KEYS = frozenset({"abi", "name", "version", "inputs", "outputs"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION_TEXT = re.compile(r"[\x21-\x7e]{1,64}")  # printable ASCII, no space
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class FeatureManifest:
    """What a feature module computes: its feature set's ``name`` and ``version``, the raw
    columns a record has (``inputs``) and the features it writes (``outputs``), in order."""

    name: str
    version: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"feature manifest name {_show(self.name)} is not 1 to 64 of A-Z a-z 0-9 . _ - "
                "starting with a letter or digit"
            )
        if not isinstance(self.version, str) or not _VERSION_TEXT.fullmatch(self.version):
            raise ConfigError(
                f"feature manifest version {_show(self.version)} is not 1 to 64 printable "
                "ASCII characters without a space"
            )
        object.__setattr__(self, "inputs", _columns(self.inputs, "inputs", most=MAX_INPUTS))
        object.__setattr__(self, "outputs", _columns(self.outputs, "outputs", most=MAX_OUTPUTS))
        if len(self.to_json()) > MAX_MANIFEST_BYTES:
            raise ConfigError(
                f"feature manifest of {self.name!r} is over {MAX_MANIFEST_BYTES} bytes as JSON"
            )

    def to_json(self) -> bytes:
        """The manifest as its canonical JSON payload: sorted keys, no spaces."""
        document = {
            "abi": ABI_VERSION,
            "name": self.name,
            "version": self.version,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> FeatureManifest:
        """The manifest a ``shoal.features`` section's ``payload`` holds; a
        :class:`ConfigError` for anything but the contract's JSON object."""
        if len(payload) > MAX_MANIFEST_BYTES:
            raise ConfigError(
                f"feature manifest of {len(payload)} bytes is over {MAX_MANIFEST_BYTES} bytes"
            )
        try:
            document = json.loads(
                payload.decode("utf-8"),
                object_pairs_hook=_unique_keys,
                parse_constant=_no_constant,
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"feature manifest is not UTF-8 JSON: {first}") from exc
        if not isinstance(document, dict):
            raise ConfigError(f"feature manifest is a JSON {type(document).__name__}, not object")
        _check_keys(document)
        abi = document["abi"]
        if type(abi) is not int or abi != ABI_VERSION:
            raise ConfigError(
                f"feature manifest asks for ABI {_show(abi)}: this Shoal runs ABI {ABI_VERSION}"
            )
        return cls(document["name"], document["version"], document["inputs"], document["outputs"])


def read_manifest(wasm: bytes) -> FeatureManifest:
    """The manifest of the WebAssembly binary ``wasm``, read without compiling it: exactly
    one ``shoal.features`` custom section, else a :class:`ConfigError`."""
    payloads = [payload for name, payload in _custom_sections(wasm) if name == MANIFEST_SECTION]
    if not payloads:
        raise ConfigError(
            f"the WebAssembly module has no {MANIFEST_SECTION!r} custom section "
            "(add one with shoal.features.with_manifest)"
        )
    if len(payloads) > 1:
        raise ConfigError(
            f"the WebAssembly module has {len(payloads)} {MANIFEST_SECTION!r} custom sections: "
            "exactly one is allowed"
        )
    return FeatureManifest.from_json(payloads[0])


def with_manifest(wasm: bytes, manifest: FeatureManifest) -> bytes:
    """``wasm`` with every ``shoal.features`` section removed and one holding ``manifest``
    appended: for toolchains that cannot emit custom sections."""
    kept = [
        wasm[section.start : section.end]
        for section in _sections(wasm)
        if section.name != MANIFEST_SECTION
    ]
    name = MANIFEST_SECTION.encode()
    body = _leb128(len(name)) + name + manifest.to_json()
    return _MAGIC + _VERSION + b"".join(kept) + bytes([_CUSTOM]) + _leb128(len(body)) + body


class _Section(NamedTuple):
    start: int  # its id byte
    end: int
    name: str | None  # a custom section's; None for the others
    payload: int  # where a custom section's payload starts (after its name)


def _custom_sections(wasm: bytes) -> Iterator[tuple[str, bytes]]:
    for section in _sections(wasm):
        if section.name is not None:
            yield section.name, bytes(wasm[section.payload : section.end])


def _sections(wasm: bytes) -> Iterator[_Section]:
    """Each section of ``wasm``, checked to lie inside it."""
    if len(wasm) < len(_MAGIC) + len(_VERSION):
        raise ConfigError(f"a WebAssembly module of {len(wasm)} bytes is truncated")
    if wasm[:4] != _MAGIC:
        raise ConfigError("not a WebAssembly binary: it does not start with '\\0asm'")
    if wasm[4:8] != _VERSION:
        raise ConfigError(f"WebAssembly binary version {wasm[4:8].hex()} is not 1 (01000000)")
    position, count = 8, 0
    while position < len(wasm):
        count += 1
        if count > MAX_SECTIONS:
            raise ConfigError(f"the WebAssembly module has over {MAX_SECTIONS:,} sections")
        size, body = _read_leb128(wasm, position + 1, len(wasm), what=f"section at byte {position}")
        end = body + size
        if end > len(wasm):
            raise ConfigError(
                f"WebAssembly section at byte {position} of {size} bytes runs past the end "
                f"of the {len(wasm)}-byte binary"
            )
        if wasm[position] == _CUSTOM:
            name, payload = _custom_name(wasm, body, end, position)
            yield _Section(position, end, name, payload)
        else:
            yield _Section(position, end, None, end)
        position = end


def _custom_name(wasm: bytes, body: int, end: int, position: int) -> tuple[str, int]:
    """A custom section's name and where its payload starts."""
    what = f"custom section name at byte {position}"
    length, start = _read_leb128(wasm, body, end, what=what)
    if start + length > end:
        raise ConfigError(f"custom section name at byte {position} runs past its section")
    try:
        return bytes(wasm[start : start + length]).decode("utf-8"), start + length
    except UnicodeDecodeError:
        raise ConfigError(f"custom section name at byte {position} is not UTF-8") from None


def _read_leb128(data: bytes, position: int, end: int, *, what: str) -> tuple[int, int]:
    """The unsigned 32-bit LEB128 number at ``position``, which must end before ``end``,
    and where it ends."""
    value = 0
    for index in range(_MAX_LEB128_BYTES):
        if position + index >= end:
            raise ConfigError(f"WebAssembly {what}: its size runs past the end")
        byte = data[position + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if value >= 2**32:
                raise ConfigError(f"WebAssembly {what}: its size does not fit in 32 bits")
            return value, position + index + 1
    raise ConfigError(f"WebAssembly {what}: its size is a LEB128 longer than 5 bytes")


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _columns(names: Any, key: str, *, most: int) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"feature manifest {key} is a {type(names).__name__}, not a list")
    if not 1 <= len(names) <= most:
        raise ConfigError(f"feature manifest has {len(names)} {key}: 1 to {most:,} are allowed")
    for name in names:
        if not isinstance(name, str) or not _COLUMN.fullmatch(name):
            raise ConfigError(
                f"feature manifest {key} name {_show(name)} is not [A-Za-z_][A-Za-z0-9_]{{0,63}}"
            )
    if len(set(names)) != len(names):
        repeated = next(name for index, name in enumerate(names) if name in names[:index])
        raise ConfigError(f"feature manifest {key} name {repeated!r} is repeated")
    return tuple(names)


def _check_keys(document: dict[str, Any]) -> None:
    unknown = sorted(document.keys() - _KEYS)
    if unknown:
        raise ConfigError(f"feature manifest has unknown keys: {', '.join(map(repr, unknown))}")
    missing = sorted(_KEYS - document.keys())
    if missing:
        raise ConfigError(f"feature manifest lacks the keys: {', '.join(map(repr, missing))}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key is repeated in an object")
    return document


def _no_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _show(value: object) -> str:
    """A value from the manifest, shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
