"""Release manifests: what a tree digest covers, the signed statement, release keys on disk."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import shoal
from shoal.core import ConfigError, ProtocolError, SecurityError
from shoal.governance import (
    CodeMeasurer,
    ManifestStatement,
    SignedManifest,
    TreeDigest,
    generate_release_key,
    key_fingerprint,
    load_release_private_key,
    load_release_public_key,
    release_statement,
    sign_manifest,
)
from shoal.governance.manifest import app_code_root, measure_tree, shoal_code_root
from support.attestation import Release


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Release]:
    made = Release.make(tmp_path / "release")
    yield made
    made.close()


def test_a_tree_digest_covers_paths_and_contents_but_not_compiled_files(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "model.py").write_text("W = 1\n")
    first = measure_tree(package)
    assert first.files == 2
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0" * 8)
    (package / "stray.pyc").write_bytes(b"\1")
    assert measure_tree(package) == first  # rebuilt on every machine: never measured
    (package / "sub" / "model.py").write_text("W = 2\n")
    changed = measure_tree(package)
    assert changed.sha256 != first.sha256
    (package / "sub" / "model.py").write_text("W = 1\n")
    (package / "sub" / "model.py").rename(package / "model.py")  # same bytes, another path
    assert measure_tree(package).sha256 not in (first.sha256, changed.sha256)
    (package / "data.json").write_text("{}")  # any other file counts
    assert measure_tree(package).files == 3


def test_linked_code_is_measured_and_a_link_loop_walked_once(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "helper.py").write_text("H = 1\n")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers").symlink_to(outside, target_is_directory=True)
    (package / "loop").symlink_to(package, target_is_directory=True)
    before = measure_tree(package)
    assert before.files == 2  # __init__.py and helpers/helper.py; the loop adds nothing
    (outside / "helper.py").write_text("H = 2\n")  # linked code changed: the digest says so
    assert measure_tree(package).sha256 != before.sha256


def test_an_empty_folder_and_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert measure_tree(tmp_path / "empty").files == 0
    with pytest.raises(ConfigError, match="neither a file nor a folder"):
        measure_tree(tmp_path / "missing")


def test_the_measurer_hashes_again_only_what_changed(tmp_path: Path) -> None:
    code = tmp_path / "app.py"
    code.write_text("A = 1\n")
    measurer = CodeMeasurer()
    before = measurer.measure_tree(code)
    assert measurer.measure_tree(code) == before
    code.write_text("A = 2\n")  # same size: the modification time tells
    stat = code.stat()
    os.utime(code, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert measurer.measure_tree(code) != before
    assert measurer.measure_tree(code) == measure_tree(code)


def test_the_app_component_is_its_module_file_or_its_whole_package(
    tmp_path: Path, release: Release
) -> None:
    assert app_code_root(release.app) == release.app_file.resolve()
    package = release.folder / f"{release.module}_pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("")
    (package / "models" / "client.py").write_text("def client_fn(context): ...\n")
    assert app_code_root(f"{release.module}_pkg.models.client:client_fn") == package.resolve()
    assert app_code_root("shoal.apps.builtin:client_app") == shoal_code_root()
    with pytest.raises(ConfigError, match="cannot find the app module"):
        app_code_root("no_such_module_at_all:client_fn")
    with pytest.raises(ConfigError, match="MODULE:FUNCTION"):
        app_code_root("no-colon")
    (release.folder / f"{release.module}_ns").mkdir()  # a namespace package: no __init__.py
    with pytest.raises(ConfigError, match="namespace package"):
        app_code_root(f"{release.module}_ns.client:fn")


def test_a_signed_manifest_round_trips_and_verifies(release: Release) -> None:
    manifest = release.manifest(label="v1")
    statement = manifest.statement
    assert statement.app == release.app
    assert statement.shoal_version == shoal.__version__
    assert statement.components["shoal"] == measure_tree(shoal_code_root())
    assert statement.components["app"] == TreeDigest(measure_tree(release.app_file).sha256, 1)
    manifest.verify()
    again = SignedManifest.from_json(json.loads(manifest.to_json()))
    assert again == manifest and again.manifest_id == manifest.manifest_id
    assert manifest.key_fingerprint == key_fingerprint(load_release_public_key(release.public_key))
    assert "v1" in manifest.description and release.app in manifest.description
    # the id names the statement: a new label is a new build
    assert release.manifest(label="v2").manifest_id != manifest.manifest_id


def test_an_altered_statement_or_a_swapped_key_does_not_verify(release: Release) -> None:
    manifest = release.manifest()
    document = manifest.as_json()
    document["statement"]["components"]["app"]["sha256"] = "0" * 64  # vouch for other code
    with pytest.raises(SecurityError, match="does not verify"):
        SignedManifest.from_json(document).verify()
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(SecurityError, match="does not verify"):
        SignedManifest(manifest.statement, other, manifest.signature).verify()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("signature"), "exactly"),
        (lambda d: d.update(format="other/1"), "not a shoal.attestation-manifest/1"),
        (lambda d: d.update(release_key="zz"), "hex"),
        (lambda d: d.update(release_key="00" * 31), "32 bytes"),
        (lambda d: d.update(signature="00" * 63), "64 bytes"),
        (lambda d: d["statement"]["components"].pop("shoal"), "exactly"),
        (lambda d: d["statement"]["components"]["app"].update(files=True), "file count"),
        (lambda d: d["statement"]["components"]["app"].update(files=0), "no file"),
        (lambda d: d["statement"]["components"]["app"].update(sha256="AB" * 32), "sha256"),
        (lambda d: d["statement"].update(label="\n"), "printable"),
        (lambda d: d["statement"].update(app=7), "text"),
        (lambda d: d.update(statement=[]), "exactly"),
    ],
)
def test_a_malformed_manifest_is_a_protocol_error(
    release: Release, change: object, message: str
) -> None:
    document = release.manifest().as_json()
    change(document)  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=message):
        SignedManifest.from_json(document)


def test_reading_a_manifest_file_names_the_file(tmp_path: Path, release: Release) -> None:
    path = tmp_path / "client.manifest.json"
    manifest = release.manifest()
    path.write_text(manifest.to_json())
    assert SignedManifest.read(path) == manifest
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"client\.manifest\.json is not a signed Shoal manifest"):
        SignedManifest.read(path)
    path.write_bytes(b" " * 20_000)
    with pytest.raises(ConfigError, match="over 16384 bytes"):
        SignedManifest.read(path)
    with pytest.raises(ConfigError, match="cannot read the manifest"):
        SignedManifest.read(tmp_path / "absent.json")


def test_release_keys_are_pem_private_only_to_their_owner_and_never_overwritten(
    tmp_path: Path,
) -> None:
    raw = generate_release_key(tmp_path / "r.key", tmp_path / "r.pub")
    assert (tmp_path / "r.key").stat().st_mode & 0o777 == 0o600
    assert load_release_public_key(tmp_path / "r.pub") == raw
    private = load_release_private_key(tmp_path / "r.key")
    assert private.public_key().public_bytes_raw() == raw
    with pytest.raises(ConfigError, match="never overwritten"):
        generate_release_key(tmp_path / "r.key", tmp_path / "other.pub")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_release_public_key(tmp_path / "r.key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_release_private_key(tmp_path / "r.pub")
    with pytest.raises(ConfigError, match="cannot read the release private key"):
        load_release_private_key(tmp_path / "missing.key")


def test_an_openssl_ed25519_key_signs_and_another_algorithm_is_refused(
    tmp_path: Path, release: Release
) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    try:
        openssl("genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "o.key"))
        openssl("pkey", "-in", str(tmp_path / "o.key"), "-pubout", "-out", str(tmp_path / "o.pub"))
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", str(tmp_path / "ec.key"))  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no openssl command here")
    manifest = sign_manifest(
        release_statement(release.app), load_release_private_key(tmp_path / "o.key")
    )
    manifest.verify()
    assert manifest.release_key == load_release_public_key(tmp_path / "o.pub")
    with pytest.raises(ConfigError, match="not an Ed25519 release key"):
        load_release_private_key(tmp_path / "ec.key")


def test_a_statement_measures_exactly_the_two_components(release: Release) -> None:
    statement = release_statement(release.app)
    with pytest.raises(ProtocolError, match="components app, shoal"):
        ManifestStatement(
            statement.app, {"app": statement.components["app"]}, "0.1.0", statement.created_at
        )
    assert statement.canonical() == statement.canonical()
    assert json.loads(statement.canonical()) == statement.as_json()
