"""The attestation gate and the built-in manifest verifier: every problem, and verifiers by name."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.core import ConfigError, ProtocolError
from shoal.governance import (
    AttestationGate,
    AttestationRefused,
    AttestedBuild,
    Binding,
    Evidence,
    ManifestAttester,
    ManifestVerifier,
    Problem,
    Verifier,
    load_release_public_key,
    load_verifier,
)
from shoal.governance.attestation import MAX_EVIDENCE_BYTES, verifiers_for
from shoal.registry import AllowedBuilds, Database, open_database
from support.attestation import Release


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Release]:
    made = Release.make(tmp_path / "release")
    yield made
    made.close()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    database = open_database(None, folder=tmp_path / "registry")
    yield database
    database.close()


def binding(client_id: str = "c1", nonce: bytes = b"n" * 16) -> Binding:
    return Binding(client_id, b"k" * 32, "run-1", nonce)


def gate_for(release: Release, database: Database) -> AttestationGate:
    verifier = ManifestVerifier([load_release_public_key(release.public_key)])
    return AttestationGate([verifier], AllowedBuilds(database))


def refusal(gate: AttestationGate, evidence: Evidence | None, bound: Binding) -> AttestationRefused:
    with pytest.raises(AttestationRefused) as caught:
        gate.check(evidence, bound)
    return caught.value


def test_an_allowed_build_passes_and_each_problem_is_named(
    release: Release, database: Database
) -> None:
    gate = gate_for(release, database)
    builds = AllowedBuilds(database)
    manifest = release.manifest(label="v1")
    attester = release.attester(manifest)
    bound = binding()

    def evidence(made_for: Binding = bound, of: ManifestAttester = attester) -> Evidence:
        return Evidence("manifest", of.evidence(made_for.challenge()))

    assert refusal(gate, None, bound).problem is Problem.MISSING
    assert refusal(gate, Evidence("play-integrity", b"x"), bound).problem is Problem.UNKNOWN_KIND
    assert refusal(gate, Evidence("manifest", b"{}"), bound).problem is Problem.MALFORMED
    assert refusal(gate, evidence(), bound).problem is Problem.NOT_ALLOWED
    builds.allow(build_id=manifest.manifest_id, kind="manifest", by="ana", reason="QA")
    assert gate.check(evidence(), bound) == AttestedBuild(
        "manifest", manifest.manifest_id, manifest.description
    )
    # made for another nonce, another client
    assert refusal(gate, evidence(), binding(nonce=b"m" * 16)).problem is Problem.UNBOUND
    assert refusal(gate, evidence(), binding(client_id="c2")).problem is Problem.UNBOUND
    untrusted = release.attester(release.manifest(key="untrusted"))
    assert refusal(gate, evidence(of=untrusted), bound).problem is Problem.UNTRUSTED_KEY
    builds.revoke(manifest.manifest_id, by="ana", reason="bad build")
    revoked = refusal(gate, evidence(), bound)
    assert revoked.problem is Problem.REVOKED
    assert str(revoked).startswith("revoked: ") and "bad build" in str(revoked)


def test_a_modified_install_cannot_present_its_manifest_as_matching(
    release: Release, database: Database
) -> None:
    gate = gate_for(release, database)
    manifest = release.manifest()
    AllowedBuilds(database).allow(
        build_id=manifest.manifest_id, kind="manifest", by="a", reason="r"
    )
    attester = release.attester(manifest)
    gate.check(Evidence("manifest", attester.evidence(binding().challenge())), binding())
    release.app_file.write_text(release.app_file.read_text() + "\nEXFILTRATE = True\n")
    modified = refusal(
        gate, Evidence("manifest", attester.evidence(binding().challenge())), binding()
    )
    assert modified.problem is Problem.MODIFIED
    assert f"the app's code ({release.app})" in modified.detail


def test_a_re_signed_statement_or_an_edited_signature_is_refused(
    release: Release, database: Database
) -> None:
    gate = gate_for(release, database)
    manifest = release.manifest()
    data = json.loads(release.attester(manifest).evidence(binding().challenge()))
    data["manifest"]["statement"]["label"] = "promoted"  # the trusted key never signed this
    tampered = Evidence("manifest", json.dumps(data).encode())
    assert refusal(gate, tampered, binding()).problem is Problem.BAD_SIGNATURE
    data = json.loads(release.attester(manifest).evidence(binding().challenge()))
    data["measured"]["app"] = "not hex"
    assert refusal(gate, Evidence("manifest", json.dumps(data).encode()), binding()).problem is (
        Problem.MALFORMED
    )


def test_evidence_is_a_bounded_kind_and_bytes() -> None:
    with pytest.raises(ProtocolError, match="kind"):
        Evidence("Play Integrity", b"x")
    with pytest.raises(ProtocolError, match="1 to 65536 bytes"):
        Evidence("manifest", b"")
    with pytest.raises(ProtocolError, match="1 to 65536 bytes"):
        Evidence("manifest", b"x" * (MAX_EVIDENCE_BYTES + 1))


def test_the_binding_challenge_changes_with_every_field() -> None:
    base = Binding("c1", b"k" * 32, "run", b"n" * 16)
    variants = [
        Binding("c2", b"k" * 32, "run", b"n" * 16),
        Binding("c1", b"j" * 32, "run", b"n" * 16),
        Binding("c1", b"k" * 32, "run2", b"n" * 16),
        Binding("c1", b"k" * 32, "run", b"m" * 16),
        Binding("c1r", b"k" * 32, "un", b"n" * 16),  # lengths are prefixed: no shifting
    ]
    challenges = {base.challenge(), *(variant.challenge() for variant in variants)}
    assert len(challenges) == 1 + len(variants)


# --- verifiers of other kinds, named in the config ------------------------------------------------


class TeeQuoteVerifier:
    """A stand-in for a hardware verifier: it admits data equal to the challenge."""

    kind = "tee-quote"

    def verify(self, data: bytes, binding: Binding) -> AttestedBuild:
        if data != binding.challenge():
            raise AttestationRefused(Problem.UNBOUND, "the quote's report data is not ours")
        return AttestedBuild(self.kind, "enclave-measurement-1")


class CrashingVerifier:
    kind = "tee-quote"

    def verify(self, data: bytes, binding: Binding) -> AttestedBuild:
        raise RuntimeError("the vendor library fell over")


@pytest.fixture
def plugins() -> Iterator[str]:
    module = types.ModuleType("attestation_plugins_for_tests")
    module.TeeQuoteVerifier = TeeQuoteVerifier  # type: ignore[attr-defined]
    module.instance = TeeQuoteVerifier()  # type: ignore[attr-defined]
    module.factory = lambda: TeeQuoteVerifier()  # type: ignore[attr-defined]
    module.crashing = CrashingVerifier()  # type: ignore[attr-defined]
    module.not_a_verifier = 42  # type: ignore[attr-defined]
    module.failing_factory = lambda: 1 / 0  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module.__name__
    del sys.modules[module.__name__]


def test_a_verifier_is_named_as_a_class_an_instance_or_a_factory(plugins: str) -> None:
    for name in ("TeeQuoteVerifier", "instance", "factory"):
        verifier = load_verifier(f"{plugins}:{name}", kind="tee-quote")
        assert isinstance(verifier, Verifier) and verifier.kind == "tee-quote"
    for target, message in [
        ("no_colon", "package.module:object"),
        ("no_such_module_xyz:thing", "cannot import"),
        (f"{plugins}:missing", "no 'missing'"),
        (f"{plugins}:not_a_verifier", "not a verifier"),
        (f"{plugins}:failing_factory", "making the verifier failed"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_verifier(target, kind="tee-quote")
    with pytest.raises(ConfigError, match="verifies 'tee-quote' evidence, not 'sgx'"):
        load_verifier(f"{plugins}:instance", kind="sgx")


def test_a_plugged_in_kind_goes_through_the_same_gate_and_allow_list(
    plugins: str, database: Database
) -> None:
    verifiers = verifiers_for(
        ["tee-quote"], release_keys=[], plugins={"tee-quote": f"{plugins}:instance"}
    )
    gate = AttestationGate(verifiers, AllowedBuilds(database))
    quote = Evidence("tee-quote", binding().challenge())
    assert refusal(gate, quote, binding()).problem is Problem.NOT_ALLOWED
    AllowedBuilds(database).allow(
        build_id="enclave-measurement-1", kind="tee-quote", by="ana", reason="audited enclave"
    )
    assert gate.check(quote, binding()).build_id == "enclave-measurement-1"
    assert refusal(gate, quote, binding(nonce=b"x" * 16)).problem is Problem.UNBOUND
    # a kind this gate has no verifier for
    assert refusal(gate, Evidence("manifest", b"{}"), binding()).problem is Problem.UNKNOWN_KIND
    crashing = AttestationGate([CrashingVerifier()], AllowedBuilds(database))
    failed = refusal(crashing, quote, binding())
    assert failed.problem is Problem.MALFORMED and "fell over" in failed.detail


def test_a_gate_needs_verifiers_of_distinct_kinds(database: Database) -> None:
    with pytest.raises(ConfigError, match="at least one verifier"):
        AttestationGate([], AllowedBuilds(database))
    with pytest.raises(ConfigError, match="two verifiers"):
        AttestationGate([TeeQuoteVerifier(), TeeQuoteVerifier()], AllowedBuilds(database))
    with pytest.raises(ConfigError, match="at least one trusted release key"):
        ManifestVerifier([])
    with pytest.raises(ConfigError, match="no verifier for 'sgx'"):
        verifiers_for(["sgx"], release_keys=[], plugins={})


def test_the_gate_remembers_each_clients_latest_refusal_until_a_check_passes(
    release: Release, database: Database
) -> None:
    gate = gate_for(release, database)
    manifest = release.manifest()
    AllowedBuilds(database).allow(
        build_id=manifest.manifest_id, kind="manifest", by="a", reason="r"
    )
    attester = release.attester(manifest)
    assert gate.refused() == {}
    refusal(gate, None, binding("c1"))
    refusal(gate, None, binding("c2"))
    assert {client: refused.problem for client, refused in gate.refused().items()} == {
        "c1": Problem.MISSING,
        "c2": Problem.MISSING,
    }
    gate.check(Evidence("manifest", attester.evidence(binding("c1").challenge())), binding("c1"))
    assert set(gate.refused()) == {"c2"}


def test_a_refusal_it_need_not_remember_is_not_remembered(
    release: Release, database: Database
) -> None:
    gate = gate_for(release, database)
    with pytest.raises(AttestationRefused):
        gate.check(None, binding("made-up-id"), remember=False)
    assert gate.refused() == {}
