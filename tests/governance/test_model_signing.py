"""Model signatures: the encoding is unambiguous, every changed fact breaks the signature, and
key files are made and read safely."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.errors import ConfigError, SecurityError
from shoal.governance import (
    ModelSigner,
    PinnedKey,
    generate_signing_key,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    version_message,
    write_public_key,
)
from shoal.registry import VersionSignature
from shoal.transport.signing import SIGNING_CONTEXT

SHA = "ab" * 32
FACTS: dict[str, Any] = {"name": "global", "version": 3, "round": 2, "sha256": SHA}
KEY = generate_signing_key()
SIGNER = ModelSigner(KEY, run_id="run-1")
PINNED = PinnedKey.of(KEY.public_key())

texts = st.text(max_size=8)
numbers = st.integers(min_value=0, max_value=2**40)
shas = st.binary(min_size=32, max_size=32).map(bytes.hex)
facts = st.tuples(texts, texts, numbers, numbers, shas)
Facts = tuple[str, str, int, int, str]


@given(facts, facts)
def test_different_facts_never_share_an_encoding(a: Facts, b: Facts) -> None:
    def encode(f: Facts) -> bytes:
        return version_message(run_id=f[0], name=f[1], version=f[2], round=f[3], sha256=f[4])

    assert (encode(a) == encode(b)) == (a == b)


@given(facts, st.none() | shas, facts, st.none() | shas)
def test_a_feature_module_is_part_of_the_encoding(
    a: Facts, a_features: str | None, b: Facts, b_features: str | None
) -> None:
    def encode(f: Facts, features: str | None) -> bytes:
        return version_message(
            run_id=f[0], name=f[1], version=f[2], round=f[3], sha256=f[4], features=features
        )

    same = encode(a, a_features) == encode(b, b_features)
    assert same == ((a, a_features) == (b, b_features))


def test_a_version_without_a_feature_module_keeps_the_message_it_always_had() -> None:
    """Versions signed before feature modules existed verify as they did: no module, no tail."""
    message = version_message(run_id="r", **FACTS)
    assert message.endswith(bytes.fromhex(SHA))
    assert version_message(run_id="r", **FACTS, features="cd" * 32).startswith(message)


def test_the_feature_module_signed_with_a_version_is_the_only_one_that_verifies() -> None:
    """A task whose version names another module than the one signed (a coordinator or a
    peer that swaps it), or none, or a module where none was signed: refused."""
    module = "cd" * 32
    signed = SIGNER(**FACTS, features=module)
    PINNED.verify(signed, **FACTS, features=module)
    for claimed in (None, "ef" * 32):
        with pytest.raises(SecurityError, match="does not match its signature"):
            PINNED.verify(signed, **FACTS, features=claimed)
    with pytest.raises(SecurityError, match="does not match its signature"):
        PINNED.verify(SIGNER(**FACTS), **FACTS, features=module)


@given(facts, st.none() | shas, st.none() | shas, facts, st.none() | shas, st.none() | shas)
def test_a_scaler_is_part_of_the_encoding(
    a: Facts,
    a_features: str | None,
    a_scaler: str | None,
    b: Facts,
    b_features: str | None,
    b_scaler: str | None,
) -> None:
    """The module and the scaler each have their marker: a module's sha256 never reads as a
    scaler's, nor the other way round."""

    def encode(f: Facts, features: str | None, scaler: str | None) -> bytes:
        return version_message(
            run_id=f[0],
            name=f[1],
            version=f[2],
            round=f[3],
            sha256=f[4],
            features=features,
            preprocessing=scaler,
        )

    same = encode(a, a_features, a_scaler) == encode(b, b_features, b_scaler)
    assert same == ((a, a_features, a_scaler) == (b, b_features, b_scaler))


def test_the_scaler_signed_with_a_version_is_the_only_one_that_verifies() -> None:
    scaler = "cd" * 32
    signed = SIGNER(**FACTS, preprocessing=scaler)
    PINNED.verify(signed, **FACTS, preprocessing=scaler)
    assert version_message(run_id="r", **FACTS, preprocessing=scaler).startswith(
        version_message(run_id="r", **FACTS)  # a version without one signs as it always did
    )
    for claimed in (None, "ef" * 32):
        with pytest.raises(SecurityError, match="feature module or scaler"):
            PINNED.verify(signed, **FACTS, preprocessing=claimed)
    with pytest.raises(SecurityError, match="does not match its signature"):
        PINNED.verify(SIGNER(**FACTS), **FACTS, preprocessing=scaler)
    with pytest.raises(SecurityError):  # a module's sha256 is not a scaler's
        PINNED.verify(SIGNER(**FACTS, features=scaler), **FACTS, preprocessing=scaler)


def test_the_message_is_domain_separated_from_request_signatures() -> None:
    message = version_message(run_id="r", **FACTS)
    assert not message.startswith(SIGNING_CONTEXT)
    assert message.startswith(b"shoal.v1/model-version\x00")


def test_a_signed_version_verifies_against_the_pinned_key() -> None:
    signed = SIGNER(**FACTS)
    assert signed.run_id == "run-1" and signed.key_id == PINNED.key_id
    assert len(signed.signature) == 64
    PINNED.verify(signed, **FACTS)


@pytest.mark.parametrize(
    "changed",
    [
        {"name": "other"},
        {"version": 4},
        {"round": 3},
        {"sha256": "cd" * 32},
    ],
)
def test_any_other_fact_breaks_the_signature(changed: dict[str, object]) -> None:
    signed = SIGNER(**FACTS)
    with pytest.raises(SecurityError, match="does not match its signature"):
        PINNED.verify(signed, **(FACTS | changed))


def test_a_signature_for_another_run_does_not_verify() -> None:
    signed = SIGNER(**FACTS)
    moved = VersionSignature("run-2", signed.key_id, signed.signature)
    with pytest.raises(SecurityError, match="run 'run-2'"):
        PINNED.verify(moved, **FACTS)


def test_an_unsigned_version_is_refused() -> None:
    with pytest.raises(SecurityError, match="is not signed"):
        PINNED.verify(None, **FACTS)
    with pytest.raises(SecurityError, match="is not signed"):
        PINNED.verify(VersionSignature("run-1", PINNED.key_id, b""), **FACTS)


def test_another_keys_signature_is_refused_whatever_key_id_it_claims() -> None:
    forged = ModelSigner(generate_signing_key(), run_id="run-1")(**FACTS)
    with pytest.raises(SecurityError, match="not by the pinned key"):
        PINNED.verify(forged, **FACTS)
    claimed = VersionSignature("run-1", PINNED.key_id, forged.signature)
    with pytest.raises(SecurityError, match="does not match its signature"):
        PINNED.verify(claimed, **FACTS)


@pytest.mark.parametrize("length", [1, 63, 65])
def test_a_signature_of_the_wrong_length_is_refused(length: int) -> None:
    short = VersionSignature("run-1", PINNED.key_id, b"\x01" * length)
    with pytest.raises(SecurityError, match="64 bytes"):
        PINNED.verify(short, **FACTS)


def test_a_new_key_file_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "model-signing.key"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_signing_key(path).private_bytes_raw() == key.private_bytes_raw()
    pinned = load_public_key(tmp_path / "model-signing.pub")
    assert pinned.key_id == PinnedKey.of(key.public_key()).key_id


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model-signing.key"
    load_or_create_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_signing_key(path)


def test_bad_key_files_are_one_line_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "none.pem"
    with pytest.raises(ConfigError, match="cannot read"):
        load_signing_key(missing)
    with pytest.raises(ConfigError, match="cannot read"):
        load_public_key(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_signing_key(garbage)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(garbage)


def test_a_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "ec.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        load_public_key(public)


def test_an_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    from shoal.governance import write_signing_key

    path = tmp_path / "k.pem"
    write_signing_key(path, KEY)
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        write_signing_key(path, generate_signing_key())
    write_public_key(tmp_path / "k.pub", KEY.public_key())
    assert load_public_key(tmp_path / "k.pub").key_id == PINNED.key_id
