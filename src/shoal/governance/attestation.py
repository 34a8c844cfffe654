"""Client attestation: evidence of what code a client runs, checked by a verifier per kind.

A client that attests sends, with its enrollment and each check-in, an
:class:`Evidence`: a ``kind`` and bytes that only the verifier of that kind
reads. The coordinator's :class:`AttestationGate` hands them to its
:class:`Verifier` for the kind, which says which build the client runs (an
:class:`AttestedBuild`), and admits the client only when that build is on
the operator's allow-list (``shoal attest allow|list|revoke``, kept in the
registry) and not revoked. Every no is an :class:`AttestationRefused` that
names its :class:`Problem` and says why in one line.

**Binding.** Evidence is made for one request: its :class:`Binding` (the
client's id and public key, the run, and the request's own nonce) yields a
challenge that the evidence must carry, and the request's Ed25519 signature
covers the evidence. Evidence recorded from one request is refused in any
other (another nonce, another client), and a replayed request is refused
before its evidence is read.

**The built-in kind, ``manifest``** (:class:`ManifestVerifier`,
:class:`ManifestAttester`): the client sends the release manifest that
shipped with it (:mod:`shoal.governance.manifest`) and the digests of the
code it finds installed, measured afresh. The coordinator checks that a
trusted release key signed the manifest, that what was measured is what
the manifest says, and that the manifest is allowed. What that proves: an
honest install that was modified, misconfigured, or built from code the
operator never released is refused with the reason. What it cannot prove:
the measurements are the client's own word, so a fully adversarial device
that runs modified code can still send a valid manifest with its digests.
Only evidence rooted in hardware the client cannot forge closes that gap.

**Other kinds** plug in by name. A verifier is any object with a ``kind``
and ``verify(data, binding) -> AttestedBuild`` that raises
:class:`AttestationRefused`; the coordinator's config names it as
``module:object`` (an instance, or a callable without arguments that
returns one)::

    [coordinator]
    attestation = ["manifest", "play-integrity"]
    attestation_verifiers = { "play-integrity" = "my_org.integrity:PlayIntegrityVerifier" }

An Android Play Integrity verifier would decode the integrity token its
data carries, check with Google that it is genuine, that its ``nonce`` is
``binding.challenge()`` (base64), and that the app's signing certificate
and device verdicts are the expected ones, and return the app's certificate
digest and version code as the build. On the client, an :class:`Attester`
of the same kind makes the data from the challenge (there, by asking the
Play Integrity API for a token with that nonce).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import importlib
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ConfigError, ProtocolError, SecurityError
from shoal.governance.manifest import COMPONENTS, CodeMeasurer, SignedManifest, key_fingerprint
from shoal.registry.attestations import AllowedBuilds, BuildState

MANIFEST_KIND = "manifest"
MAX_EVIDENCE_BYTES = 64 * 1024
KIND_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_KIND = re.compile(KIND_PATTERN)
BINDING_CONTEXT = b"shoal.v1/attestation-binding\x00"


class Problem(enum.Enum):
    """Why a client's attestation was refused."""

    MISSING = "missing"  # attestation is required and the request carries none
    UNKNOWN_KIND = "unknown_kind"  # a kind this coordinator does not accept
    MALFORMED = "malformed"  # the evidence does not parse as its kind
    UNBOUND = "unbound"  # made for another request or another client
    UNTRUSTED_KEY = "untrusted_key"  # signed by a key this coordinator does not trust
    BAD_SIGNATURE = "bad_signature"  # altered after it was signed
    MODIFIED = "modified"  # the code the client runs is not what its evidence vouches for
    NOT_ALLOWED = "not_allowed"  # a genuine build the operator has not allowed
    REVOKED = "revoked"  # a build the operator revoked


class AttestationRefused(SecurityError):
    """A client's evidence does not admit it: ``problem``, then the reason in one line."""

    def __init__(self, problem: Problem, detail: str) -> None:
        super().__init__(f"{problem.value}: {detail}")
        self.problem = problem
        self.detail = detail


def check_kind(kind: str, *, error: type[Exception] = ProtocolError) -> str:
    """``kind`` when it is an evidence kind's name (lowercase, 1 to 64 characters)."""
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise error(
            f"an attestation kind is 1 to 64 of a-z, 0-9, '.', '_', '-' "
            f"(starting with a letter or digit), got {str(kind)[:70]!r}"
        )
    return kind


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a client presents: the kind of its evidence and the bytes that kind's verifier reads."""

    kind: str
    data: bytes

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if not 0 < len(self.data) <= MAX_EVIDENCE_BYTES:
            raise ProtocolError(
                f"attestation evidence has 1 to {MAX_EVIDENCE_BYTES} bytes, got {len(self.data)}"
            )


@dataclass(frozen=True, slots=True)
class Binding:
    """The request a piece of evidence is made for: client, key, run and the request's nonce."""

    client_id: str
    public_key: bytes
    run_id: str
    nonce: bytes

    def challenge(self) -> bytes:
        """The 32 bytes evidence must carry: a hash of every field, each length-prefixed."""
        digest = hashlib.sha256(BINDING_CONTEXT)
        for part in (self.client_id.encode(), self.public_key, self.run_id.encode(), self.nonce):
            digest.update(struct.pack(">I", len(part)) + part)
        return digest.digest()


@dataclass(frozen=True, slots=True)
class AttestedBuild:
    """The build a verifier found: its kind, its id on the allow-list, and a line about it."""

    kind: str
    build_id: str
    label: str = ""


@runtime_checkable
class Verifier(Protocol):
    """Checks one kind of evidence on the coordinator (see the module's docstring)."""

    @property
    def kind(self) -> str: ...

    def verify(self, data: bytes, binding: Binding) -> AttestedBuild:
        """The build the evidence proves; :class:`AttestationRefused` when it proves none."""
        ...


@runtime_checkable
class Attester(Protocol):
    """Makes one kind of evidence on the client, for the challenge of the request it goes with."""

    @property
    def kind(self) -> str: ...

    def evidence(self, challenge: bytes) -> bytes: ...


class AttestationGate:
    """The coordinator's check: evidence of an accepted kind, verified, of an allowed build.

    It remembers the clients whose latest check was refused, with why
    (:meth:`refused`), until one passes: the coordinator selects none of
    them and takes no heartbeat from them, so a client refused at a
    check-in (its build revoked, say) is not chosen for a round it cannot
    join. The memory is the process's own: after a restart a client's next
    check-in decides again.
    """

    def __init__(self, verifiers: Iterable[Verifier], allow_list: AllowedBuilds) -> None:
        self.verifiers: dict[str, Verifier] = {}
        for verifier in verifiers:
            kind = check_kind(verifier.kind, error=ConfigError)
            if kind in self.verifiers:
                raise ConfigError(f"two verifiers for the attestation kind {kind!r}")
            self.verifiers[kind] = verifier
        if not self.verifiers:
            raise ConfigError("an attestation gate needs at least one verifier")
        self.allow_list = allow_list
        self._refused: dict[str, AttestationRefused] = {}

    def refused(self) -> dict[str, AttestationRefused]:
        """The clients whose latest check was refused, each with its refusal."""
        return dict(self._refused)

    def check(
        self, evidence: Evidence | None, binding: Binding, *, remember: bool = True
    ) -> AttestedBuild:
        """The client's attested build; :class:`AttestationRefused` says why there is none.

        ``remember=False`` keeps a refusal out of :meth:`refused`: for a
        client not enrolled yet, which no one would select anyway (and
        whose ids cost an attacker nothing to make up).
        """
        try:
            build = self._check(evidence, binding)
        except AttestationRefused as refusal:
            if remember:
                self._refused[binding.client_id] = refusal
            raise
        self._refused.pop(binding.client_id, None)
        return build

    def _check(self, evidence: Evidence | None, binding: Binding) -> AttestedBuild:
        accepted = ", ".join(sorted(self.verifiers))
        if evidence is None:
            raise AttestationRefused(
                Problem.MISSING, f"this coordinator admits attested clients only ({accepted})"
            )
        verifier = self.verifiers.get(evidence.kind)
        if verifier is None:
            raise AttestationRefused(
                Problem.UNKNOWN_KIND,
                f"evidence of kind {evidence.kind!r}; this coordinator accepts {accepted}",
            )
        try:
            build = verifier.verify(evidence.data, binding)
        except AttestationRefused:
            raise
        except Exception as exc:  # a plugged-in verifier's own failure: a refusal, never a crash
            raise AttestationRefused(
                Problem.MALFORMED, f"the {evidence.kind} verifier failed on the evidence: {exc}"
            ) from exc
        entry = self.allow_list.get(build.build_id)
        if entry is None or entry.kind != build.kind:
            raise AttestationRefused(
                Problem.NOT_ALLOWED,
                f"{build.kind} build {build.build_id[:16]} ({build.label}) is not on the "
                "allow-list: an operator allows it with `shoal attest allow`",
            )
        if entry.state is BuildState.REVOKED:
            raise AttestationRefused(
                Problem.REVOKED,
                f"{build.kind} build {build.build_id[:16]} was revoked by {entry.revoked_by} "
                f"at {entry.revoked_at:%Y-%m-%d %H:%M:%S} UTC: {entry.revoked_reason}",
            )
        return build


# --- the built-in kind: a release manifest and what the client measured ------------------------


class ManifestVerifier:
    """Verifies ``manifest`` evidence against the release keys this coordinator trusts."""

    kind = MANIFEST_KIND

    def __init__(self, trusted_keys: Iterable[bytes]) -> None:
        self.trusted = {key_fingerprint(key): bytes(key) for key in trusted_keys}
        if not self.trusted:
            raise ConfigError("the manifest verifier needs at least one trusted release key")

    def verify(self, data: bytes, binding: Binding) -> AttestedBuild:
        manifest, measured, challenge = _parse_manifest_evidence(data)
        if not hmac.compare_digest(challenge, binding.challenge()):
            raise AttestationRefused(
                Problem.UNBOUND, "the evidence was made for another request or another client"
            )
        trusted = self.trusted.get(manifest.key_fingerprint)
        if trusted is None or trusted != manifest.release_key:
            raise AttestationRefused(
                Problem.UNTRUSTED_KEY,
                f"manifest {manifest.manifest_id[:16]} is signed by release key "
                f"{manifest.key_fingerprint}, which this coordinator does not trust",
            )
        try:
            manifest.verify()
        except SecurityError as exc:
            raise AttestationRefused(Problem.BAD_SIGNATURE, str(exc)) from exc
        statement = manifest.statement
        for name in COMPONENTS:
            expected = statement.components[name].sha256
            if not hmac.compare_digest(measured[name], expected):
                what = f"the app's code ({statement.app})" if name == "app" else "the Shoal package"
                raise AttestationRefused(
                    Problem.MODIFIED,
                    f"{what} measures {measured[name][:16]}, manifest "
                    f"{manifest.manifest_id[:16]} says {expected[:16]}: "
                    "a modified or unknown build",
                )
        return AttestedBuild(MANIFEST_KIND, manifest.manifest_id, manifest.description)


def _parse_manifest_evidence(data: bytes) -> tuple[SignedManifest, dict[str, str], bytes]:
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or set(document) != {"manifest", "measured", "challenge"}:
            raise ProtocolError("manifest evidence is an object of manifest, measured, challenge")
        manifest = SignedManifest.from_json(document["manifest"])
        measured = document["measured"]
        if not isinstance(measured, dict) or set(measured) != set(COMPONENTS):
            raise ProtocolError(f"measured names the components {', '.join(COMPONENTS)}")
        for name, sha in measured.items():
            if not isinstance(sha, str):
                raise ProtocolError(f"the measured {name} is not a sha256")
            check_sha256_hex(sha, f"the measured {name}")
        challenge = bytes.fromhex(document["challenge"])
    except (ProtocolError, ValueError, TypeError) as exc:
        raise AttestationRefused(Problem.MALFORMED, f"unreadable manifest evidence: {exc}") from exc
    return manifest, measured, challenge


class ManifestAttester:
    """Makes ``manifest`` evidence: the shipped manifest and the digests measured now.

    The digests are measured afresh for each request (a file changed since
    the last one is hashed again), never copied from the manifest: an
    install whose code differs from its manifest says so, and is refused.
    """

    kind = MANIFEST_KIND

    def __init__(
        self, manifest: SignedManifest, *, app_spec: str, measurer: CodeMeasurer | None = None
    ) -> None:
        self.manifest = manifest
        self.app_spec = app_spec
        self.measurer = measurer or CodeMeasurer()

    def measured(self) -> dict[str, str]:
        """The sha256 of each component as installed now."""
        return {name: tree.sha256 for name, tree in self.measurer.measure(self.app_spec).items()}

    def evidence(self, challenge: bytes) -> bytes:
        document = {
            "manifest": self.manifest.as_json(),
            "measured": self.measured(),
            "challenge": challenge.hex(),
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


# --- verifiers named in the config -----------------------------------------------------------


def load_verifier(target: str, *, kind: str) -> Verifier:
    """The verifier named ``module:object`` for ``kind``: an instance, or a factory of one.

    A typo, an object that is no verifier, or one of another kind is a
    ConfigError at start-up, not a refusal of every client later.
    """
    module_name, colon, attribute_path = target.partition(":")
    where = f"coordinator.attestation_verifiers[{kind!r}] = {target!r}"
    if not colon or not module_name or not attribute_path:
        raise ConfigError(f"{where}: a verifier is named 'package.module:object'")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import {module_name!r}: {exc}") from exc
    for attribute in attribute_path.split("."):
        if not hasattr(found, attribute):
            raise ConfigError(f"{where}: no {attribute!r} in it")
        found = getattr(found, attribute)
    if isinstance(found, type) or (not isinstance(found, Verifier) and callable(found)):
        try:
            found = found()
        except Exception as exc:  # the user's factory: one line, at start-up
            raise ConfigError(f"{where}: making the verifier failed: {exc}") from exc
    if not isinstance(found, Verifier):
        raise ConfigError(f"{where}: not a verifier (it needs a kind and a verify method)")
    if found.kind != kind:
        raise ConfigError(f"{where}: it verifies {found.kind!r} evidence, not {kind!r}")
    return found


def verifiers_for(
    kinds: Iterable[str], *, release_keys: Iterable[bytes], plugins: Mapping[str, str]
) -> list[Verifier]:
    """A verifier for each accepted kind: the built-in manifest one, or the plugged-in one."""
    verifiers: list[Verifier] = []
    for kind in kinds:
        if kind in plugins:
            verifiers.append(load_verifier(plugins[kind], kind=kind))
        elif kind == MANIFEST_KIND:
            verifiers.append(ManifestVerifier(release_keys))
        else:
            raise ConfigError(
                f"coordinator.attestation: no verifier for {kind!r}; built in: {MANIFEST_KIND!r}, "
                "others are named in coordinator.attestation_verifiers"
            )
    return verifiers
