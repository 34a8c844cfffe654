"""Release manifests: the sha256 of the code a client runs, signed by a release key.

A release step (``shoal attest manifest``) measures two components of a
client build and signs a statement of their digests with an Ed25519
release key:

- ``shoal``: every file of the installed Shoal package;
- ``app``: the client app's code (``MODULE:FUNCTION``): the whole top-level
  package its module belongs to, or the module's one file when it is a
  plain module (helpers it imports from elsewhere are not measured: keep
  an app's code in one package).

A component's digest is a tree digest (:func:`measure_tree`): the sha256
of every file's relative path and content sha256, in path order, with
``__pycache__`` folders and compiled ``.pyc`` files left out (they are
rebuilt on every machine). The statement's canonical JSON (sorted keys,
no spaces) is what the key signs; its sha256 is the manifest's id, the
name the coordinator's allow-list knows it by. At run time the client
measures the same components again (:class:`CodeMeasurer`) and sends what
it found beside the manifest: see :mod:`shoal.governance.attestation`.

Release keys are Ed25519 keys in PEM files (PKCS#8 for the private half,
SubjectPublicKeyInfo for the public one), so ``openssl genpkey -algorithm
ed25519`` makes one as well as :func:`generate_release_key` does.

>>> key = load_release_private_key(Path("release.key"))  # doctest: +SKIP
>>> manifest = sign_manifest(release_statement("my_app:client_fn"), key)  # doctest: +SKIP
>>> Path("client.manifest.json").write_text(manifest.to_json())  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import shoal
from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ConfigError, ProtocolError, SecurityError

MANIFEST_FORMAT = "shoal.attestation-manifest/1"
SIGNING_CONTEXT = b"shoal.v1/attestation-manifest\x00"
"""Domain separation: a release key's signature over a manifest is valid for nothing else."""
TREE_CONTEXT = b"shoal.v1/code-tree\x00"
COMPONENTS = ("app", "shoal")
MAX_MANIFEST_BYTES = 16 * 1024
_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_SKIPPED_FOLDERS = frozenset({"__pycache__"})
_SKIPPED_SUFFIXES = (".pyc", ".pyo")
_TEXT = re.compile(r"[\x20-\x7e]{0,256}")


# --- measuring code ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeDigest:
    """The digest of a component's files and how many there are."""

    sha256: str
    files: int


class CodeMeasurer:
    """Measures code trees, re-hashing only the files whose size or times changed.

    A client measures at each enrollment and check-in: with this cache a
    check-in costs a directory walk and a ``stat`` per file, and an edited
    file is hashed again (its modification time or size changed), so the
    next check-in reports it.
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}

    def file_sha256(self, path: str, status: os.stat_result) -> bytes:
        stamp = (status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino)
        cached = self._files.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").digest()
        self._files[path] = (stamp, digest)
        return digest

    def measure_tree(self, root: Path) -> TreeDigest:
        """The tree digest of ``root``: a folder (recursively) or one file."""
        files = _code_files(root)
        digest = hashlib.sha256(TREE_CONTEXT)
        for relative, path, status in files:
            name = relative.encode()
            digest.update(struct.pack(">I", len(name)) + name + self.file_sha256(path, status))
        return TreeDigest(digest.hexdigest(), len(files))

    def measure(self, app_spec: str) -> dict[str, TreeDigest]:
        """Both components of a client build, by name (see :data:`COMPONENTS`)."""
        shoal_root, app_root = shoal_code_root(), app_code_root(app_spec)
        shoal_tree = self.measure_tree(shoal_root)
        app_tree = shoal_tree if app_root == shoal_root else self.measure_tree(app_root)
        return {"app": app_tree, "shoal": shoal_tree}


def measure_tree(root: Path) -> TreeDigest:
    """The tree digest of a folder or a file (see the module's docstring), without a cache."""
    return CodeMeasurer().measure_tree(root)


def _code_files(root: Path) -> list[tuple[str, str, os.stat_result]]:
    """(relative path, path, status) of every file a tree digest covers, in path order."""
    try:
        status = root.stat()
    except OSError as exc:
        raise ConfigError(f"{root} is neither a file nor a folder: nothing to measure") from exc
    if stat.S_ISREG(status.st_mode):
        return [(root.name, str(root), status)]
    if not stat.S_ISDIR(status.st_mode):
        raise ConfigError(f"{root} is neither a file nor a folder: nothing to measure")
    found: list[tuple[str, str, os.stat_result]] = []
    _walk(str(root), root.name, found, seen={(status.st_dev, status.st_ino)})
    found.sort(key=lambda file: file[0])
    return found


def _walk(
    folder: str,
    relative: str,
    found: list[tuple[str, str, os.stat_result]],
    *,
    seen: set[tuple[int, int]],
) -> None:
    """Every file under ``folder``, symbolic links followed (what Python would import), once."""
    with os.scandir(folder) as entries:
        for entry in entries:
            name = f"{relative}/{entry.name}"
            if entry.is_dir():
                status = entry.stat()
                if entry.name in _SKIPPED_FOLDERS or (status.st_dev, status.st_ino) in seen:
                    continue  # a link back up the tree is walked once
                seen.add((status.st_dev, status.st_ino))
                _walk(entry.path, name, found, seen=seen)
            elif entry.is_file() and not entry.name.endswith(_SKIPPED_SUFFIXES):
                found.append((name, entry.path, entry.stat()))


def shoal_code_root() -> Path:
    """The folder of the installed Shoal package (the one this process runs)."""
    return Path(shoal.__file__).resolve().parent


def app_code_root(app_spec: str) -> Path:
    """What the ``app`` component of ``MODULE:FUNCTION`` measures: a package folder or a file.

    The module is found on ``sys.path`` (a loaded one is the one measured);
    put the app's folder on it first, as the client does.
    """
    module_name, separator, attribute = app_spec.partition(":")
    if not separator or not module_name or not attribute:
        raise ConfigError(f"an app is MODULE:FUNCTION, got {app_spec!r}")
    top = module_name.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot find the app module {top!r} to measure: {exc}") from exc
    if spec is None:
        raise ConfigError(f"cannot find the app module {top!r} to measure (is it on the path?)")
    if spec.submodule_search_locations is not None:
        if spec.origin is None or not spec.has_location:
            raise ConfigError(
                f"the app package {top!r} is a namespace package: give it an __init__.py, "
                "so that one folder holds the code that is measured"
            )
        return Path(spec.origin).resolve().parent
    if spec.origin is None or not spec.has_location:
        raise ConfigError(f"the app module {top!r} has no source file to measure")
    return Path(spec.origin).resolve()


# --- the signed statement ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestStatement:
    """What a release key vouches for: an app and the digests of its build's components."""

    app: str
    components: Mapping[str, TreeDigest]
    shoal_version: str
    created_at: str  # ISO 8601, UTC
    label: str = ""

    def __post_init__(self) -> None:
        if set(self.components) != set(COMPONENTS):
            raise ProtocolError(
                f"a manifest measures the components {', '.join(COMPONENTS)}, "
                f"got {', '.join(sorted(self.components)) or 'none'}"
            )
        for name, tree in self.components.items():
            check_sha256_hex(tree.sha256, f"the {name} component's sha256")
            if tree.files < 1:
                raise ProtocolError(f"the {name} component measures no file")
        for what, text in (
            ("app", self.app),
            ("shoal_version", self.shoal_version),
            ("created_at", self.created_at),
            ("label", self.label),
        ):
            if not _TEXT.fullmatch(text):
                raise ProtocolError(
                    f"a manifest's {what} is at most 256 printable ASCII characters"
                )

    def canonical(self) -> bytes:
        """The bytes a release key signs: the statement as sorted, compact JSON."""
        return json.dumps(self.as_json(), sort_keys=True, separators=(",", ":")).encode()

    def as_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "components": {
                name: {"sha256": tree.sha256, "files": tree.files}
                for name, tree in sorted(self.components.items())
            },
            "shoal_version": self.shoal_version,
            "created_at": self.created_at,
            "label": self.label,
        }

    @classmethod
    def from_json(cls, data: object) -> ManifestStatement:
        """The statement of a parsed JSON object; ``ProtocolError`` for any other shape."""
        fields = _object(
            data,
            "a manifest statement",
            keys={"app", "components", "shoal_version", "created_at", "label"},
        )
        components = _object(fields["components"], "the components", keys=set(COMPONENTS))
        trees = {}
        for name, value in components.items():
            tree = _object(value, f"the {name} component", keys={"sha256", "files"})
            sha, files = tree["sha256"], tree["files"]
            if not isinstance(sha, str) or isinstance(files, bool) or not isinstance(files, int):
                raise ProtocolError(f"the {name} component has a bad sha256 or file count")
            trees[name] = TreeDigest(sha, files)
        texts = [fields[key] for key in ("app", "shoal_version", "created_at", "label")]
        if not all(isinstance(text, str) for text in texts):
            raise ProtocolError("a manifest's app, shoal_version, created_at and label are text")
        return cls(texts[0], trees, texts[1], texts[2], texts[3])

    @property
    def manifest_id(self) -> str:
        """The sha256 of the canonical statement: the name the allow-list knows it by."""
        return hashlib.sha256(self.canonical()).hexdigest()


def _object(data: object, what: str, *, keys: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) != keys:
        raise ProtocolError(f"{what} must be an object with exactly {', '.join(sorted(keys))}")
    return data


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A statement, the release public key that signed it, and the signature."""

    statement: ManifestStatement
    release_key: bytes
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.release_key) != _KEY_BYTES:
            raise ProtocolError(f"a release key has 32 bytes, got {len(self.release_key)}")
        if len(self.signature) != _SIGNATURE_BYTES:
            raise ProtocolError(f"a manifest signature has 64 bytes, got {len(self.signature)}")

    @property
    def manifest_id(self) -> str:
        return self.statement.manifest_id

    @property
    def key_fingerprint(self) -> str:
        return key_fingerprint(self.release_key)

    @property
    def description(self) -> str:
        """A line about the build: its label, app, Shoal version and release key."""
        statement = self.statement
        name = f"{statement.label} " if statement.label else ""
        return (
            f"{name}{statement.app} on shoal {statement.shoal_version}, "
            f"release key {self.key_fingerprint}"
        )

    def verify(self) -> None:
        """``SecurityError`` unless the release key it names signed the statement."""
        try:
            key = Ed25519PublicKey.from_public_bytes(self.release_key)
            key.verify(self.signature, SIGNING_CONTEXT + self.statement.canonical())
        except (InvalidSignature, ValueError) as exc:
            raise SecurityError(
                f"manifest {self.manifest_id[:16]} does not verify under release key "
                f"{self.key_fingerprint}: it was altered or signed by another key"
            ) from exc

    def as_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "statement": self.statement.as_json(),
            "release_key": self.release_key.hex(),
            "signature": self.signature.hex(),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: object) -> SignedManifest:
        """A manifest from its parsed JSON document; ``ProtocolError`` if malformed (unverified)."""
        document = _object(
            data, "a signed manifest", keys={"format", "statement", "release_key", "signature"}
        )
        if document["format"] != MANIFEST_FORMAT:
            raise ProtocolError(f"not a {MANIFEST_FORMAT} document: {document['format']!r}")
        try:
            key, signature = (
                bytes.fromhex(document["release_key"]),
                bytes.fromhex(document["signature"]),
            )
        except (TypeError, ValueError) as exc:
            raise ProtocolError("a manifest's release_key and signature are hex") from exc
        return cls(ManifestStatement.from_json(document["statement"]), key, signature)

    @classmethod
    def read(cls, path: Path) -> SignedManifest:
        """The manifest in a file; a ConfigError names the file when it is not one."""
        text = _read(path, "manifest")
        try:
            if len(text) > MAX_MANIFEST_BYTES:
                raise ProtocolError(f"it is over {MAX_MANIFEST_BYTES} bytes")
            return cls.from_json(json.loads(text))
        except (ProtocolError, ValueError) as exc:
            raise ConfigError(f"{path} is not a signed Shoal manifest: {exc}") from exc


def release_statement(
    app_spec: str, *, label: str = "", measurer: CodeMeasurer | None = None
) -> ManifestStatement:
    """The statement of the build installed here: its app's code and its Shoal package."""
    measured = (measurer or CodeMeasurer()).measure(app_spec)
    return ManifestStatement(
        app=app_spec,
        components=measured,
        shoal_version=shoal.__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        label=label,
    )


def sign_manifest(statement: ManifestStatement, private_key: Ed25519PrivateKey) -> SignedManifest:
    """The statement signed with a release key."""
    signature = private_key.sign(SIGNING_CONTEXT + statement.canonical())
    return SignedManifest(statement, private_key.public_key().public_bytes_raw(), signature)


# --- release keys --------------------------------------------------------------------------


def key_fingerprint(public_key: bytes) -> str:
    """A release key's short name: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def generate_release_key(private_path: Path, public_path: Path) -> bytes:
    """Write a new Ed25519 release key pair as PEM (the private file readable by its owner only).

    Refuses to overwrite an existing file. Returns the raw public key.
    """
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists: a release key is never overwritten")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public = key.public_key()
    public_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public.public_bytes_raw()


def load_release_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file; a ConfigError names the file otherwise."""
    try:
        key = serialization.load_pem_private_key(_read(path, "release private key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 release key")
    return key


def load_release_public_key(path: Path) -> bytes:
    """The raw Ed25519 public key in a PEM file; a ConfigError names the file otherwise."""
    try:
        key = serialization.load_pem_public_key(_read(path, "release public key"))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 release key")
    return key.public_bytes_raw()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
