"""The coordinator's gRPC service: authenticates every request, then hands it to the round driver.

Each RPC follows the same path: parse the bytes that arrived and decode the
message (malformed → MALFORMED: registered with :func:`add_coordinator_service`,
the service gets every request as bytes, so grpc never parses one itself),
then ask :class:`~shoal.coordinator.admission.Admission` to find the client
and verify its Ed25519 signature over the request (UNKNOWN_CLIENT for an id
not enrolled and for a request its key did not sign alike, so that no one
learns which ids are enrolled), then its status (SUSPENDED, told only to its
key's holder),
and refuse a replayed nonce or a stale timestamp (REPLAYED; nonces are kept
per client and key, so a stranger's requests cannot use up a client's),
and, when the job requires attestation, check the evidence an enrollment or
a check-in carries (UNATTESTED, with the problem: missing, modified,
untrusted key, not allowed, revoked...), and only then act. A check-in is
weighed against the round's eligibility policy (``[selection]``, the
versioning matrix, ``[[versions.require]]``): a client failing only
criteria on what it is doing now (not charging, not idle, on a metered
network...) is told to retry later, one failing any other is INCOMPATIBLE,
with the reasons; the driver counts both for the round's row. An update
from a client whose software the policy no longer accepts (its versions
changed, or a requirement was added since it was selected) is refused as
INCOMPATIBLE. Bad input is answered with a code and counted
(``shoal_refused_requests_total`` on ``/metrics``); it never raises out of the service, so
the coordinator keeps serving, and its log lines are limited per peer
(:class:`~shoal.telemetry.refusals.RefusalLog`). Under secure
aggregation, check-ins hand out the SecAgg+ stages and SubmitSecureMessage
takes the clients' replies (a frame that does not decode is MALFORMED); the
plaintext update of a secure round is refused. Every task names the
committed version its model is, with the coordinator's signature on it (read
once per version from the run's HEAD, never signed per request), for clients
that pin the coordinator's key to check.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import grpc

from shoal.config import SelectionSection
from shoal.coordinator.admission import Admission, Refused, malformed
from shoal.coordinator.driver import RoundDriver
from shoal.coordinator.events import Authentication
from shoal.coordinator.guesses import GuessThrottle, Network, guess_source
from shoal.core.compression import decode
from shoal.core.device import DeviceState
from shoal.core.errors import (
    IntegrityError,
    ModelError,
    ProtocolError,
    RegistryError,
    SecurityError,
)
from shoal.core.parameters import Vector
from shoal.features import FeatureModule
from shoal.governance.attestation import AttestationGate
from shoal.registry import (
    TRANSIENT_CRITERIA,
    ClientRecord,
    ClientRegistry,
    Eligibility,
    Heartbeat,
    HeartbeatBuffer,
    ListedToken,
    ModelRecord,
    SelectionCriteria,
    Selector,
)
from shoal.secure.homomorphic import EncryptedUpdate
from shoal.secure.messages import MaskedInput
from shoal.tasks import (
    CheckInAnswer,
    ModelVersion,
    RejectSubmission,
    RetryLater,
    RunFinished,
    SecureOffer,
)
from shoal.telemetry.refusals import RefusalLog
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.chunks import (
    ChunkAssembler,
    PayloadTooLarge,
    chunk_payload,
    decode_parameters,
)
from shoal.transport.messages import (
    CheckInOutcome,
    Credentials,
    EnrollmentRequest,
    EnrollReply,
    HeartbeatReply,
    ModelRef,
    RejectCode,
    Rejected,
    RetryAfter,
    SecureTask,
    Task,
    Verdict,
    one_line,
)
from shoal.transport.rpc import RpcObserver, add_bytes_servicer

log = logging.getLogger("shoal.coordinator")

HEARTBEAT_EVERY_S = 30.0
THROTTLED = "throttled"
DECODES_AT_ONCE = 2
"""Uploads parsed or decoded at once, each in a thread with a dense copy of the model: a
burst of a thousand uploads waits its turn instead of holding a thousand copies."""
"""The reason an enrollment refused untried is counted under (:mod:`shoal.coordinator.guesses`)."""
# What a check-in can change only by re-enrolling (a write); power and network are batched.
_STABLE_FIELDS = (
    "device_class",
    "app_version",
    "runtime_version",
    "model_architecture_version",
    "feature_extractor_version",
)
# Criteria on the software a client runs: checked again when its update arrives.
_SOFTWARE_CRITERIA = frozenset({"app_version", "versions"})


def _no_policy() -> SelectionCriteria:
    return SelectionCriteria.from_section(SelectionSection(), model=None)


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """What the service enforces beyond the protocol.

    An upload whose next part does not arrive within ``upload_idle_s`` is
    dropped (LATE), and so is one whose round closes while it streams: a
    stalled stream would otherwise hold its bytes, and its client's turn to
    upload, until its connection ends.

    ``enrollment_tokens`` are the config's (a bare secret has the default
    uses and lifetime of :class:`ListedToken`); they are redeemed from the
    registry like issued ones, so their uses are counted and they expire.
    ``criteria`` gives the eligibility policy of the current round (the run
    layer's :meth:`~shoal.coordinator.run.Run.selection_criteria`; by
    default, none).
    """

    run_id: str
    enrollment_tokens: Collection[str | ListedToken]
    max_update_bytes: int = 64 * 2**20
    upload_idle_s: float = 60.0  # the longest wait for an upload's next part
    criteria: Callable[[], SelectionCriteria] = _no_policy
    attestation: AttestationGate | None = None  # None: clients need not attest
    # bad enrollment tokens one address may send within the window (see guesses.py), and the
    # proxies whose x-forwarded-for names the address
    enrollment_guesses: int = 10
    enrollment_guess_window_s: float = 60.0
    trusted_proxies: tuple[Network, ...] = ()

    def listed_tokens(self) -> list[ListedToken]:
        return [
            ListedToken(token=token) if isinstance(token, str) else token
            for token in self.enrollment_tokens
        ]


class _Throttled(Exception):
    """An enrollment refused before its token is tried (:mod:`shoal.coordinator.guesses`)."""


class Screened(Exception):
    """An upload the round refused before its bytes were taken in: its rejection answers it."""

    def __init__(self, rejection: RejectSubmission) -> None:
        super().__init__(rejection.detail)
        self.rejection = rejection


class ModelBytes:
    """The driver's current global model as it is served: its safetensors bytes and its
    reference (the committed version, signed), each made once per version, not per request.

    ``versions`` reads the committed HEAD (the run's store); without it the
    model is served unsigned, naming no version.
    """

    def __init__(
        self, driver: RoundDriver, versions: Callable[[], ModelRecord | None] | None = None
    ) -> None:
        self.driver = driver
        self.versions = versions
        self._current: tuple[str, bytes] | None = None
        self._reference: ModelRef | None = None

    def current(self) -> tuple[str, bytes]:
        """(sha256, bytes) of the current model; the sha is the driver's cached one."""
        sha = self.driver.model_sha256()
        if self._current is None or self._current[0] != sha:
            self._current = (sha, self.driver.coordinator.parameters.to_bytes())
        return self._current

    def reference(self) -> ModelRef | None:
        """The current model's reference with its version's signature; None until it is
        committed (the run layer persists a version before anyone is offered it)."""
        sha, data = self.current()
        if self._reference is not None and self._reference.sha256 == sha:
            return self._reference
        version = None
        if self.versions is not None:
            head = self.versions()
            if head is None or head.sha256 != sha:
                return None
            version = ModelVersion(
                head.name,
                head.version,
                head.round,
                head.signed,
                head.features_sha256,
                head.preprocessing_sha256,
            )
        self._reference = ModelRef(sha, sha, len(data), version)
        return self._reference


Context = grpc.aio.ServicerContext[Any, Any]


class CoordinatorService:
    """The eight RPCs of ``shoal.v1.Coordinator`` over a driver and a client registry.

    Each method takes its request as bytes (register it with
    :func:`add_coordinator_service`).
    """

    def __init__(
        self,
        driver: RoundDriver,
        clients: ClientRegistry,
        settings: ServiceSettings,
        *,
        selector: Selector | None = None,
        heartbeats: HeartbeatBuffer | None = None,
        clock: Callable[[], float] = time.time,
        refusal_log: RefusalLog | None = None,
        versions: Callable[[], ModelRecord | None] | None = None,
        features: FeatureModule | None = None,
    ) -> None:
        self.driver = driver
        self.features = features  # the run's feature module, which every client must use
        self.clients = clients
        self.settings = settings
        self.selector = selector or Selector(clients)
        self.clock = clock  # seconds since the epoch: replay windows and sightings
        self.admission = Admission(
            clients,
            run_id=settings.run_id,
            listed_tokens=settings.listed_tokens(),
            clock=clock,
            attestation=settings.attestation,
        )
        # an empty buffer is falsy (it has a length): test for None
        self.heartbeats = (
            HeartbeatBuffer(clients, clock=clock) if heartbeats is None else heartbeats
        )
        self.model_bytes = ModelBytes(driver, versions)  # the run's committed HEAD, signed
        self.refusals: Counter[str] = Counter()
        self.guesses = GuessThrottle(  # on its own clock: a stepped wall clock moves no window
            limit=settings.enrollment_guesses,
            window_s=settings.enrollment_guess_window_s,
            clock=time.monotonic,
        )
        self._uploading: set[str] = set()  # the clients whose update is being taken in
        self._decoding = asyncio.Semaphore(DECODES_AT_ONCE)
        self.refusal_log = refusal_log or RefusalLog(log)

    def _refused(self, rpc: str, refusal: Refused, context: Context) -> Verdict:
        """Count and (rate-limited) log a refusal; the verdict that answers it."""
        self.refusals[refusal.code.value] += 1
        self.refusal_log.refused(
            peer=context.peer(), rpc=rpc, reason=refusal.code.value, detail=refusal.detail
        )
        return Verdict.reject(refusal.code, refusal.detail)

    # --- RPCs ----------------------------------------------------------------------------------

    async def Enroll(self, request: bytes, context: Context) -> pb.EnrollResponse:  # noqa: N802
        source = guess_source(
            context.peer(), context.invocation_metadata() or (), self.settings.trusted_proxies
        )

        def before_token() -> None:  # refused before its token is tried: a right guess waits
            wait_s = self.guesses.wait_s(source)
            if wait_s > 0:
                raise _Throttled(
                    f"too many bad enrollment tokens from {source}: retry in {math.ceil(wait_s)} s"
                )

        try:
            with malformed(ProtocolError, RegistryError):  # NotFoundError cannot arise here
                message = serde.parse(pb.EnrollRequest, request)
                enrollment = serde.decode_enroll_request(message)
                auth = self.admission.authenticate_enrollment(
                    message, enrollment, before_token=before_token
                )
                # before a token is redeemed: unattested code uses up no enrollment
                self.admission.attest(auth, enrollment.public_key, enrollment.evidence)
                # one transaction: an enrollment that fails (the id taken meanwhile, by a
                # coordinator beside this one on the same registry) gives its token use back
                with self.clients.database.write():
                    self.admission.admit(auth.client_id, enrollment.enrollment_token)
                    self._enroll(auth.client_id, enrollment)
        except Refused as refusal:
            if refusal.code is RejectCode.BAD_TOKEN:
                self.guesses.guessed(source)
            verdict = self._refused("Enroll", refusal, context)
            return serde.encode_enroll_response(EnrollReply(verdict))
        except _Throttled as throttled:
            self.refusals[THROTTLED] += 1
            self.refusal_log.refused(
                peer=context.peer(), rpc="Enroll", reason=THROTTLED, detail=str(throttled)
            )
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(throttled))
        return serde.encode_enroll_response(
            EnrollReply(Verdict.accept(), Credentials(auth.client_id))
        )

    def _enroll(self, client_id: str, enrollment: EnrollmentRequest) -> None:
        try:
            self.clients.enroll(
                client_id, enrollment.device, now=self._now(), public_key=enrollment.public_key
            )
        except SecurityError as exc:  # a known client id with another key
            raise Refused(RejectCode.BAD_SIGNATURE, str(exc)) from exc

    async def CheckIn(self, request: bytes, context: Context) -> pb.CheckInResponse:  # noqa: N802
        try:
            with malformed():
                message = serde.parse(pb.CheckInRequest, request)
                auth, known = self.admission.authenticate_client(message)
                device = serde.decode_check_in_request(message)
                # before the sighting: a refused client does not become a candidate
                assert known.public_key is not None  # authenticate_client checked with it
                evidence = serde.decode_evidence(message)
                self.admission.attest(auth, known.public_key, evidence, enrolled=True)
                record = self._refresh(known, device)
                outcome = self._eligible(record) or self._task_or_retry(
                    self.driver.check_in(auth.client_id)
                )
        except Refused as refusal:
            verdict = self._refused("CheckIn", refusal, context)
            outcome = Rejected(refusal.code, verdict.detail)
        return serde.encode_check_in_response(outcome)

    def _eligible(self, record: ClientRecord) -> RetryAfter | None:
        """None when the policy lets the client train now; else why not, as it is told.

        Failing only criteria on what the device is doing now (not charging,
        not idle...) is "retry later"; failing any other (the versioning
        matrix, too old an app, a device class) is INCOMPATIBLE. Either way
        the round counts the client under each criterion it failed.
        """
        unmet = self.selector.unmet(record, self.settings.criteria(), now=self._now())
        eligibility = Eligibility.rejected(list(unmet.values()))
        if eligibility != record.eligibility:  # what operators see in `shoal clients`
            self.clients.record_eligibility(record.client_id, eligibility)
        if not unmet:
            return None
        self.driver.exclude(record.client_id, unmet)
        if unmet.keys() <= TRANSIENT_CRITERIA:
            reason = f"not eligible now: {eligibility.reason}"
            return RetryAfter(self.driver.settings.retry_after_s, reason)
        raise Refused(RejectCode.INCOMPATIBLE, eligibility.reason or "not eligible")

    def _check_software(self, record: ClientRecord, round_number: int) -> None:
        """Refuse the update of a client whose software the policy no longer accepts.

        Its versions may have changed since it was selected, or a requirement
        been added (``shoal versions require``): the round stops waiting for it.
        """
        client_id = record.client_id
        unmet = self.selector.unmet(record, self.settings.criteria(), now=self._now())
        reasons = [reason for name, reason in unmet.items() if name in _SOFTWARE_CRITERIA]
        if not reasons:
            return
        reason = "; ".join(reasons)
        self.driver.report_failure(client_id, round_number, f"incompatible: {reason}")
        raise Refused(RejectCode.INCOMPATIBLE, reason)

    def _refresh(self, record: ClientRecord, device: DeviceState) -> ClientRecord:
        """Record a check-in: batched like a heartbeat, unless what the device runs changed."""
        client_id = record.client_id
        if any(getattr(record.device, name) != getattr(device, name) for name in _STABLE_FIELDS):
            # an app update: re-checked at once
            return self.clients.enroll(client_id, device, now=self._now())
        self._beat(client_id, device)
        return replace(record, device=device)

    def _now(self) -> datetime:
        """The service clock's time, as the registry records sightings."""
        return datetime.fromtimestamp(self.clock(), UTC)

    def _beat(self, client_id: str, device: DeviceState) -> None:
        heartbeat = Heartbeat(
            client_id=client_id,
            seen_at=self._now(),
            battery_level=device.battery_level,
            charging=device.charging,
            wifi=device.wifi,
            idle=device.idle,
            ram_gb=device.ram_gb,
        )
        self.heartbeats.add(heartbeat)

    def _task_or_retry(self, answer: CheckInAnswer) -> CheckInOutcome:
        if isinstance(answer, RunFinished):
            return answer
        if isinstance(answer, RetryLater):
            return RetryAfter(answer.seconds, answer.reason)
        if isinstance(answer, SecureOffer):
            return SecureTask(
                answer.round, self.settings.run_id, answer.request, answer.deadline_in_s
            )
        model = self.model_bytes.reference()
        if model is None or model.sha256 != answer.model_sha256:
            return RetryAfter(1.0, "the model is being updated")
        return Task(
            answer.round,
            self.settings.run_id,
            answer.phase,
            model,
            answer.config,
            answer.deadline_in_s,
            answer.secure,
        )

    async def FetchModel(  # noqa: N802
        self, request: bytes, context: Context
    ) -> AsyncIterator[pb.Chunk]:
        try:
            with malformed():
                message = serde.parse(pb.FetchModelRequest, request)
                self.admission.authenticate(message)
                wanted = serde.decode_fetch_model_request(message)
            sha, data = self.model_bytes.current()
            if wanted.version_id == sha and wanted.offset > len(data):
                detail = f"offset {wanted.offset} is past the end of the model's {len(data)} bytes"
                raise Refused(RejectCode.MALFORMED, detail)
        except Refused as refusal:
            verdict = self._refused("FetchModel", refusal, context)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{refusal.code.value}: {verdict.detail}"
            )
            return
        if wanted.version_id != sha:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "wrong_model_hash: not the current model"
            )
            return
        for chunk in chunk_payload(data, start=wanted.offset):
            yield serde.encode_chunk(chunk)

    async def FetchFeatures(  # noqa: N802
        self, request: bytes, context: Context
    ) -> AsyncIterator[pb.Chunk]:
        module = self.features
        try:
            with malformed():
                message = serde.parse(pb.FetchFeaturesRequest, request)
                self.admission.authenticate(message)
                wanted = serde.decode_fetch_features_request(message)
            if module is not None and wanted.offset > len(module.wasm):
                detail = (
                    f"offset {wanted.offset} is past the end of the feature module's "
                    f"{len(module.wasm)} bytes"
                )
                raise Refused(RejectCode.MALFORMED, detail)
        except Refused as refusal:
            verdict = self._refused("FetchFeatures", refusal, context)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{refusal.code.value}: {verdict.detail}"
            )
            return
        if module is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no_features: the run has none")
            return
        if wanted.sha256 is not None and wanted.sha256 != module.sha256:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "wrong_features_hash: not the run's feature module"
            )
            return
        for chunk in chunk_payload(module.wasm, start=wanted.offset):
            yield serde.encode_chunk(chunk)

    def _check_features(
        self, client_id: str, round_number: int, features_sha256: str | None
    ) -> None:
        """Refuse a result computed with another feature module than the run's (or with one,
        when the run has none): its features are not the model's (feature skew). The client
        fails its round too: asked again, it would compute with the same module."""
        module = self.features
        if features_sha256 == (None if module is None else module.sha256):
            return
        claimed = "no feature module" if features_sha256 is None else f"{features_sha256[:16]}..."
        expected = (
            "none"
            if module is None
            else f"{module.name} {module.version} ({module.sha256[:16]}...)"
        )
        detail = f"feature skew: computed with {claimed}; the run's feature module is {expected}"
        self.driver.report_failure(client_id, round_number, detail)
        raise Refused(RejectCode.INCOMPATIBLE, detail)

    async def SubmitUpdate(  # noqa: N802
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> pb.SubmitUpdateResponse:
        try:
            verdict = await self._submit(request_iterator)
        except Refused as refusal:
            verdict = self._refused("SubmitUpdate", refusal, context)
        except Screened as screened:
            verdict = serde.verdict_of(screened.rejection)
        return serde.encode_submit_update_response(verdict)

    async def _submit(self, stream: AsyncIterator[bytes]) -> Verdict:
        parts = self._paced(stream)
        with malformed(ProtocolError, StopAsyncIteration):
            header_message = serde.header_of(serde.parse(pb.UpdatePart, await anext(parts)))
            auth, record = self.admission.authenticate_client(header_message, this_run=True)
            header = serde.decode_update_header(header_message)
        self._check_software(record, header.round)  # before a byte of the payload
        current_sha, _ = self.model_bytes.current()
        if header.base_model_sha256 != current_sha:
            raise Refused(
                RejectCode.WRONG_MODEL_HASH, "the update is not relative to the current model"
            )
        # before a byte of the payload
        self._check_features(auth.client_id, header.round, header.features_sha256)
        payload = await self._payload(
            parts,
            pb.UpdatePart,
            auth.client_id,
            header.round,
            sha256=header.payload_sha256,
            size=header.total_size,
        )
        # decoded in a thread: a large update's parse or a codec's decode (0.1 s for ten
        # million ternary values) would hold every other call on the event loop meanwhile;
        # a few at once, each holding a dense copy of the model
        async with self._decoding:
            update = await asyncio.to_thread(self._update_vector, header.codec, payload)
        rejection = self.driver.submit_update(  # its signature checked out: VERIFIED
            auth.client_id,
            header.round,
            update,
            header.num_examples,
            dict(header.metrics),
            Authentication.VERIFIED,
            upload_bytes=len(payload),
        )
        return serde.verdict_of(rejection)

    def _update_vector(self, codec: str, payload: bytes) -> Vector:
        """The update an upload's ``payload`` carries: safetensors of the model's tensors, or
        (``codec``) the bytes of the codec the coordinator's tasks ask for, and no other."""
        model = self.driver.coordinator.parameters
        if not codec:
            with malformed(ProtocolError, IntegrityError):
                update = decode_parameters(payload)
            mismatch = update.layout.difference(model.layout)
            if mismatch is not None:  # its values would land in other tensors' places
                raise Refused(RejectCode.INVALID_UPDATE, f"not the model's tensors: {mismatch}")
            return update.vector
        asked = self.driver.coordinator.settings.compression
        if not asked.enabled or codec != asked.spec:
            takes = f"{asked.spec} or safetensors" if asked.enabled else "safetensors only"
            detail = f"the update is encoded {one_line(codec)[:40]!r}; this run takes {takes}"
            raise Refused(RejectCode.INVALID_UPDATE, detail)
        with malformed(ModelError):
            return decode(payload, asked, size=len(model))

    async def _payload(
        self,
        parts: AsyncIterator[bytes],
        part_type: type[serde.UploadPart],
        client_id: str,
        round_number: int,
        *,
        sha256: str,
        size: int,
    ) -> bytes:
        """The verified bytes of an upload's chunks, within the size limit, taken in only
        while what they carry could count (:class:`Screened` otherwise, at the header and
        again after each chunk) and one upload of a client at a time: a stranger to the
        round, a late or a repeated result, or a client's parallel streams would otherwise
        each hold up to ``max_update_bytes`` of memory. ``parts`` come :meth:`_paced`."""
        if size > self.settings.max_update_bytes:
            raise Refused(RejectCode.OVERSIZED, f"{size} bytes is over the limit")
        secure = part_type is pb.SecureMessagePart
        early = self.driver.screen_upload(client_id, round_number, secure=secure)
        if early is not None:
            raise Screened(early)
        if client_id in self._uploading:
            raise Refused(RejectCode.DUPLICATE, "an upload of this client is under way")
        assembler = ChunkAssembler(
            max_bytes=self.settings.max_update_bytes, expected_sha256=sha256, expected_size=size
        )
        self._uploading.add(client_id)
        try:
            with malformed(ProtocolError, IntegrityError):
                async for part in parts:
                    assembler.add(serde.chunk_of(serde.parse(part_type, part)))
                    late = self.driver.screen_upload(client_id, round_number, secure=secure)
                    if late is not None:  # the round closed while it streamed
                        raise Screened(late)
                return assembler.finish()
        except PayloadTooLarge as exc:
            raise Refused(RejectCode.OVERSIZED, str(exc)) from exc
        finally:
            self._uploading.discard(client_id)

    async def _paced(self, parts: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``parts`` as they arrive, each within ``upload_idle_s`` of the one before (of the
        call, for the first): a stream that stalls longer is refused as LATE."""
        idle = self.settings.upload_idle_s
        while True:
            try:
                part = await asyncio.wait_for(anext(parts), idle)
            except StopAsyncIteration:
                return
            except TimeoutError:
                detail = f"no part of the upload arrived for {idle:g} s: it is dropped"
                raise Refused(RejectCode.LATE, detail) from None
            yield part

    async def SubmitSecureMessage(  # noqa: N802
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> pb.SubmitSecureMessageResponse:
        try:
            verdict = await self._submit_secure(request_iterator)
        except Refused as refusal:
            verdict = self._refused("SubmitSecureMessage", refusal, context)
        except Screened as screened:
            verdict = serde.verdict_of(screened.rejection)
        return serde.encode_submit_secure_message_response(verdict)

    async def _submit_secure(self, stream: AsyncIterator[bytes]) -> Verdict:
        parts = self._paced(stream)
        with malformed(ProtocolError, StopAsyncIteration):
            first = serde.parse(pb.SecureMessagePart, await anext(parts))
            header_message = serde.secure_header_of(first)
            auth = self.admission.authenticate(header_message, this_run=True)
            header = serde.decode_secure_message_header(header_message)
        frame = await self._payload(
            parts,
            pb.SecureMessagePart,
            auth.client_id,
            header.round,
            sha256=header.payload_sha256,
            size=header.total_size,
        )
        with malformed():
            message = serde.decode_client_message(frame)
        if message.round != header.round:
            detail = f"a message of round {message.round} under a header of round {header.round}"
            raise Refused(RejectCode.MALFORMED, detail)
        if isinstance(message, MaskedInput | EncryptedUpdate):  # what its features computed
            self._check_features(auth.client_id, header.round, header.features_sha256)
        rejection = self.driver.submit_secure(
            auth.client_id, header.round, message, Authentication.VERIFIED
        )
        return serde.verdict_of(rejection)

    async def ReportEvaluation(  # noqa: N802
        self, request: bytes, context: Context
    ) -> pb.ReportEvaluationResponse:
        try:
            with malformed():
                message = serde.parse(pb.ReportEvaluationRequest, request)
                auth = self.admission.authenticate(message, this_run=True)
                report = serde.decode_evaluation_report(message)
            current_sha, _ = self.model_bytes.current()
            if report.model_sha256 != current_sha:  # as an update's base must be
                detail = "the evaluation is not of the current model"
                raise Refused(RejectCode.WRONG_MODEL_HASH, detail)
            self._check_features(auth.client_id, report.round, report.features_sha256)
            with malformed():
                rejection = self.driver.submit_evaluation(
                    auth.client_id,
                    report.round,
                    report.loss,
                    report.num_examples,
                    dict(report.metrics),
                )
            verdict = serde.verdict_of(rejection)
        except Refused as refusal:
            verdict = self._refused("ReportEvaluation", refusal, context)
        return serde.encode_report_evaluation_response(verdict)

    async def ReportFailure(  # noqa: N802
        self, request: bytes, context: Context
    ) -> pb.ReportFailureResponse:
        try:
            with malformed():
                message = serde.parse(pb.ReportFailureRequest, request)
                auth = self.admission.authenticate(message, this_run=True)
                report = serde.decode_failure_report(message)
                rejection = self.driver.report_failure(auth.client_id, report.round, report.reason)
            verdict = serde.verdict_of(rejection)
        except Refused as refusal:
            verdict = self._refused("ReportFailure", refusal, context)
        return serde.encode_report_failure_response(verdict)

    async def Heartbeat(self, request: bytes, context: Context) -> pb.HeartbeatResponse:  # noqa: N802
        try:
            with malformed(ProtocolError, RegistryError):
                message = serde.parse(pb.HeartbeatRequest, request)
                auth = self.admission.authenticate(message)
                self.admission.check_attested(auth.client_id)  # no sighting of a refused client
                self._beat(auth.client_id, serde.decode_heartbeat_request(message))
            verdict = Verdict.accept()
        except Refused as refusal:
            verdict = self._refused("Heartbeat", refusal, context)
        return serde.encode_heartbeat_response(HeartbeatReply(verdict, HEARTBEAT_EVERY_S))


def add_coordinator_service(
    service: CoordinatorService, server: grpc.aio.Server, *, observe: RpcObserver | None = None
) -> None:
    """Serve ``service`` as ``shoal.v1.Coordinator`` on ``server``, each request as bytes;
    ``observe`` is told of every call (its method, verdict and duration)."""
    coordinator = pb.DESCRIPTOR.services_by_name["Coordinator"]
    add_bytes_servicer(server, coordinator, service, observe=observe)
