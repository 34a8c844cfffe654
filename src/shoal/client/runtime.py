"""The client runtime: enroll once, then check in, train, upload, and come back, forever.

The runtime owns the loop a device runs: it keeps its enrollment (id and
Ed25519 key) in a state folder so that a restart of the device or of the
coordinator loses nothing, checks in with its device state (asked fresh of
``device_state`` at enrollment and at every check-in; should that fail, the
last versions it reported with every other fact unknown), honours the
coordinator's "retry after N seconds" (up to an hour), backs off exponentially with jitter
on network errors (capped at a few seconds, so that it is back soon after a
coordinator restarts), downloads and verifies the global model only when it
changed, trains in a worker thread, and uploads the result. The transport is
a :class:`CoordinatorLink`: gRPC in deployments, a direct call in tests.

In a secure round (SecAgg+) the runtime keeps one :class:`SecAggClient`
per round, started by the round's advertise-keys request: it answers the
key, consistency and unmask stages, and after training it masks the update
and sends only the masked input. It signs with its enrolled Ed25519 key,
the one its requests are signed with. The plaintext update never leaves
the device; a request it must refuse (stale, tampered, a forged survivor
set) is reported as a failure.

With the coordinator's model-signing key pinned (``coordinator_key``), the
runtime trains and evaluates only a model whose version the coordinator
signed: the signature must verify against the pinned key over the task's
run, the version's name, number and round, and the weights' sha256. It
checks before the download, and the link checks that the weights it
downloads hash to that sha256 (a download that does not is refused too); a
model it refuses (unsigned, signed by another key, tampered, or
signed for another version, round or run) is never trained on, and the
refusal is reported to the coordinator with its reason. Without a pinned key
it warns that models are not verified.
With an :class:`~shoal.governance.Attester` (the release manifest that
shipped with the client, say) every enrollment and check-in carries
evidence of the code the device runs, measured afresh for that request; a
coordinator that requires attestation refuses the client otherwise.

Under user-level DP the fit task's extras carry the clip norm: the update
is clipped on the device (and under local DP noised) before it leaves, in
a secure round before it is masked; every client then weighs the same, and
under distributed DP it adds its share of the noise after quantization.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, TypeVar

from shoal.client.api import Client, EvaluateConfig, FitConfig
from shoal.client.features import FeatureSource
from shoal.client.handler import run_evaluate, run_fit, secure_contribution
from shoal.client.link import (
    CheckIn,
    CoordinatorLink,
    Enroll,
    Enrollment,
    FetchFeatures,
    FetchModel,
    ReportFailure,
    Request,
    SubmitEvaluation,
    SubmitSecure,
    SubmitUpdate,
)
from shoal.core.device import DeviceState
from shoal.core.errors import (
    BusyError,
    ClientError,
    ConfigError,
    FeatureError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
    RunError,
    SecurityError,
    TransportError,
)
from shoal.core.folders import writable_folder
from shoal.core.identifiers import check_client_id
from shoal.core.limits import MAX_RETRY_AFTER_S
from shoal.core.parameters import Parameters, Vector
from shoal.features import FeatureModule, read_manifest
from shoal.governance.attestation import Attester
from shoal.governance.model_signing import PinnedKey
from shoal.preprocessing import SCALER_KEY
from shoal.preprocessing.scaler import sha256_text
from shoal.privacy.client import PrivacyFloor
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.homomorphic import EncryptionRequest, SiloCredentials
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    ServerRequest,
    StaleMessage,
    SurvivorsSigned,
)
from shoal.secure.serde import FitRequest, SecureReply
from shoal.tasks import (
    TRAIN_TIME_METRIC,
    Offer,
    Phase,
    RejectSubmission,
    RetryLater,
    RunFinished,
    SecureOffer,
    TaskOffer,
)

log = logging.getLogger("shoal.client")

T = TypeVar("T")
Upload = Awaitable[RejectSubmission | None]
Submission = SubmitUpdate | SubmitEvaluation | SubmitSecure


class _Stopped(Exception):
    """Raised inside the runtime once ``stop()`` was called, to unwind a retry loop."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential backoff ("full jitter"): a uniform draw below a growing cap.

    The cap is short (5 s): after a coordinator restarts, every client is back
    within about that long, so the first round is not delayed by the length of
    the outage (with a 30 s cap it waited up to 26 s more after a 10 minute
    outage). While the coordinator is away, a client probes it about as often
    as it checks in when all is well. Retries of one call start from
    ``base_s`` again once a call gets through.
    """

    base_s: float = 0.2
    cap_s: float = 5.0

    def __post_init__(self) -> None:
        if not (0 < self.base_s <= self.cap_s and math.isfinite(self.cap_s)):
            raise ConfigError(
                f"a backoff needs 0 < base_s <= cap_s, got {self.base_s}, {self.cap_s}"
            )

    def delay(self, attempt: int, rng: random.Random) -> float:
        growth = 2.0 ** min(attempt, 64)  # an outage of days never overflows a float
        return rng.uniform(0.0, min(self.cap_s, self.base_s * growth))


def load_or_create_enrollment(
    state_dir: Path,
    make_key: Callable[[], tuple[bytes, bytes]],
    *,
    client_id: str | None = None,
) -> Enrollment:
    """The enrollment kept in ``state_dir``, created (and kept) on first use.

    A new enrollment takes ``client_id`` (a silo's name) or a random id; a
    kept one must match ``client_id`` when it is given.
    """
    if client_id is not None:
        check_client_id(client_id, error=ConfigError)
    path = state_dir / "enrollment.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            kept = Enrollment(
                str(data["client_id"]),
                bytes.fromhex(data["private_key"]),
                bytes.fromhex(data["public_key"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunError(
                f"{path} is not a readable enrollment ({type(exc).__name__}: {exc}): "
                "restore it, or use a new state folder to enroll again"
            ) from exc
        if client_id is not None and client_id != kept.client_id:
            raise ConfigError(
                f"{path} holds the enrollment of {kept.client_id!r}, not {client_id!r}: "
                "use another state folder for another identity"
            )
        return kept
    private, public = make_key()
    enrollment = Enrollment(client_id or f"client-{os.urandom(8).hex()}", private, public)
    writable_folder(state_dir, what="client state folder")
    partial = path.with_name(path.name + ".partial")
    record = asdict(enrollment) | {"private_key": private.hex(), "public_key": public.hex()}
    partial.write_text(json.dumps(record))
    partial.chmod(0o600)
    partial.replace(path)
    return enrollment


MAX_SIGNED_ROUNDS = 100_000
"""The secure rounds whose survivor sets a client remembers signing (and refuses to take part
in again): the latest, a few megabytes at most, where every round of a long-lived process was
kept."""

UNREADABLE_RETRY_S = 30.0
"""How long a client waits to check in again after an answer it could not read (a task out of
bounds, a message of another protocol): a coordinator's bug made every client of a fleet exit,
and under a supervisor restart into the same answer; it now waits, and goes on once the
coordinator is fixed. A task whose model it refused, offered again (its report never reached the
round: a man in the middle's task of another run), is waited out as long."""


class RunPin(NamedTuple):
    """The run and model a client trains: the signed versions it accepts are theirs."""

    run_id: str
    model: str


class ClientRuntime:
    """Runs one client against a coordinator until ``stop()`` or ``max_tasks`` tasks."""

    def __init__(
        self,
        client: Client | FeatureSource,
        link: CoordinatorLink,
        enrollment: Enrollment,
        *,
        device_state: Callable[[], DeviceState] = DeviceState,
        backoff: Backoff | None = None,
        seed: int | None = None,
        silo: SiloCredentials | None = None,
        on_event: Callable[[str], None] | None = None,
        privacy_floor: PrivacyFloor | None = None,
        coordinator_key: PinnedKey | None = None,
        trains_for: RunPin | None = None,
        attester: Attester | None = None,
        unreadable_retry_s: float = UNREADABLE_RETRY_S,
        features: FeatureModule | None = None,
    ) -> None:
        # a FeatureSource: the app, built once the run's feature module is fetched and checked
        self._source = client if isinstance(client, FeatureSource) else None
        self._client = None if isinstance(client, FeatureSource) else client
        self.features = features  # the module its client computes features with (None: none)
        if isinstance(client, FeatureSource) and client.prebuilt is not None:
            self.features, self._client = client.prebuilt
        # before a task names the run's module: the version its manifest says, read (never
        # compiled or run) from the module the coordinator says is the run's
        self._announced: str | None = None
        self.unreadable_retry_s = unreadable_retry_s
        self.coordinator_key = coordinator_key  # None: models are not verified (warned once)
        # the run and model whose signed versions it trains on: its job's, else the first
        # task's (a version the same key signed for another run is refused)
        self.trains_for = trains_for
        self.attester = attester  # evidence of the code it runs, for each enrollment and check-in
        self.privacy_floor = privacy_floor  # the DP its own job requires, whatever a task says
        self.silo = silo  # a silo of a homomorphic consortium: its context and receipt key
        self.link = link
        self.enrollment = enrollment
        self.device_state = device_state
        self.backoff = backoff or Backoff()
        self._rng = random.Random(seed)
        self._model: tuple[str, Parameters] | None = None
        self._secure: SecAggClient | None = None  # this client's side of the current secure round
        # (run, round): survivor sets signed, the latest MAX_SIGNED_ROUNDS (oldest first)
        self._signed_rounds: dict[tuple[str, int], None] = {}
        self._stopping = asyncio.Event()
        self.tasks_done = 0
        self.finished: RunFinished | None = None  # the coordinator said the run is over
        self._on_event = on_event  # one line per enrollment, task and failure (the CLI prints)
        self._last_state: DeviceState | None = None
        self._waiting: str | None = None  # the last reason the coordinator gave for a wait
        self._unreadable: str | None = None  # the last answer this client could not read
        self._refused: tuple[int, str] | None = None  # the last (round, model) it refused
        self._residual: Vector | None = None  # what its last top-k upload left out

    def stop(self) -> None:
        self._stopping.set()

    @property
    def client(self) -> Client:
        """The client that trains (a :class:`FeatureSource`'s, once built)."""
        if self._client is None:
            raise ClientError("the client is built once the run's feature module is known")
        return self._client

    async def _announce_features(self) -> None:
        """A client with no module yet reports the version of the run's (the versioning
        matrix's ``feature_extractor``: a requirement on it would otherwise keep it out until
        a task it is never offered). Only the manifest is read: the module is not compiled,
        nor trusted for anything else; a task names the one the client computes with. A client
        that pins a module asks for that one only (the coordinator has it, or not)."""
        assert self._source is not None
        pinned = self._source.pinned
        try:
            data = await self._retrying(lambda: self._send(FetchFeatures(pinned)))
        except NotFoundError:  # the run's is not the pinned one: nothing to announce
            return
        if data is None:
            return
        try:
            self._announced = read_manifest(data).version
        except ConfigError as exc:  # not a module the client would take anyway
            log.warning("the run's feature module has no readable manifest: %s", exc)

    async def _use_features(self, sha256: str | None) -> None:
        """Have the client compute with the feature module ``sha256`` (None: none), the one a
        task names (signed with its model version when the coordinator's key is pinned): with
        a :class:`FeatureSource`, fetched by that sha256, checked, and the client built with
        it. A client built without a source refuses any other (``SecurityError``: its
        features are not the model's)."""
        current = None if self.features is None else self.features.sha256
        source = self._source
        if source is None:
            if sha256 != current:
                raise SecurityError(
                    f"feature skew: the task's model is trained on the features of "
                    f"{_named(sha256)}, and this client computes {_named(current)}"
                )
            return
        if self._client is not None and sha256 == current:
            return
        refused = source.refuses(sha256)
        if refused is not None:  # not even downloaded
            raise SecurityError(refused)
        data = None
        if sha256 is not None:
            data = await self._retrying(lambda: self._send(FetchFeatures(sha256)))
        module = source.module(data, expected=sha256)
        if module is not None:
            self._event(
                f"feature module {module.name} {module.version} (sha256 {module.sha256[:16]}...)"
            )
        try:
            built = source.build(module)
        except Exception as exc:  # the app, with the task's module: this task fails, not the client
            raise ClientError(f"the client app failed: {type(exc).__name__}: {exc}") from exc
        self.features, self._client = module, built

    async def run(self, *, max_tasks: int | None = None) -> None:
        """Enroll, then serve tasks until the run finishes, ``stop()`` or ``max_tasks``.

        Network errors are retried with backoff, never fatal; so is a check-in's answer
        this client cannot read (a coordinator's bug, or a hostile one): it is told once,
        and the client checks in again ``unreadable_retry_s`` later.
        """
        try:
            await self._serve_until_stopped(max_tasks)
        except _Stopped:
            return

    async def _serve_until_stopped(self, max_tasks: int | None) -> None:
        if self.coordinator_key is None:
            log.warning(
                "no coordinator key is pinned: global models are NOT verified "
                "(a tampered or forged model would be trained on)"
            )
        await self._retrying(lambda: self._send(Enroll(self._device(), self.attester)))
        self._event(f"enrolled as {self.enrollment.client_id}")
        if self._source is not None and self._client is None:
            await self._announce_features()
        while not self._stopping.is_set() and (max_tasks is None or self.tasks_done < max_tasks):
            try:
                answer = await self._retrying(
                    lambda: self._send(CheckIn(self._device(), self.attester))
                )
            except ProtocolError as exc:  # a whole fleet down for a coordinator's bad answer
                self._cannot_read(str(exc))
                await self._pause(self.unreadable_retry_s * self._rng.uniform(0.8, 1.2))
                continue
            self._unreadable = None
            if isinstance(answer, RunFinished):
                self.finished = answer
                self._event(f"the run has finished: {answer.reason}")
                return
            if isinstance(answer, RetryLater):
                self._told(answer.reason)
                await self._pause(_retry_delay(answer.seconds) * self._rng.uniform(0.8, 1.2))
                continue
            self._told(None)
            await self._serve(answer)

    def _device(self) -> DeviceState:
        """The device's state now; if the provider fails, what is still known of it. Its
        feature extractor's version, unless the provider says, is the feature module's (the
        versioning matrix's ``feature_extractor`` component)."""
        try:
            state = self.device_state()
        except Exception as exc:  # the user's provider: the client keeps serving
            log.warning("the device state could not be read: %s", exc)
            if self._last_state is None:
                raise
            return _versions_only(self._last_state)
        version = self._announced if self.features is None else self.features.version
        if version is not None and state.feature_extractor_version is None:
            state = replace(state, feature_extractor_version=version)
        self._last_state = state
        return state

    def _cannot_read(self, problem: str) -> None:
        """Say, once per problem, that the coordinator's answer was refused unread."""
        if problem != self._unreadable:
            log.warning("the coordinator's answer cannot be used: %s", problem)
            self._event(f"the coordinator's answer cannot be used: {problem}")
        self._unreadable = problem

    def _told(self, reason: str | None) -> None:
        """Show why the coordinator keeps the client waiting, once per reason."""
        if reason != self._waiting and reason is not None and reason.startswith(_NOT_NOW):
            self._event(reason)
        self._waiting = reason

    async def _serve(self, offer: Offer) -> None:
        if isinstance(offer, SecureOffer):
            await self._serve_stage(offer)
            return
        try:
            if self.privacy_floor is not None and isinstance(offer.config, FitConfig):
                self.privacy_floor.check(offer.config.extras)  # before a byte of training
            protected = None if offer.secure is None else self._protected(offer.secure)
        except (StaleMessage, ClientError) as exc:  # training would be wasted: say so at once
            await self._give_up(offer, str(exc))
            return
        try:
            model = await self._model_for(offer)
        except NotFoundError as exc:  # the round moved on while we were downloading
            log.info("task of round %d is stale: %s", offer.round, exc)
            return
        except (SecurityError, IntegrityError, ProtocolError) as exc:  # never trained on
            refused = (offer.round, offer.model_sha256)
            if refused == self._refused:  # offered again: the report never reached its round
                await self._pause(self.unreadable_retry_s)
                return
            self._refused = refused
            await self._give_up(offer, f"model refused: {exc}")  # the coordinator learns why
            return
        except ClientError as exc:  # its app could not be built with the task's feature module
            await self._give_up(offer, _reported(exc))
            return
        started = time.perf_counter()
        try:
            outcome, examples = await asyncio.to_thread(self._work, offer, model, protected)
        except Exception as exc:  # the user's model failed: tell the coordinator, keep going
            await self._give_up(offer, _reported(exc))
            return
        seconds = time.perf_counter() - started
        self._event(
            f"round {offer.round} {offer.phase.value}: {examples} examples, {seconds:.2f} s"
        )
        await self._upload(offer.round, lambda: self._send(outcome))
        self.tasks_done += 1

    def _send(self, request: Request[T]) -> Awaitable[T]:
        return self.link.handle(self.enrollment, request)

    def _event(self, line: str) -> None:
        if self._on_event is not None:
            self._on_event(line)

    async def _serve_stage(self, offer: SecureOffer) -> None:
        """Answer a key or unmask stage of a secure round (not a task: it is not counted)."""
        try:
            session = self._session(offer.request)
            reply = session.handle(offer.request)
        except (ProtocolError, SecurityError) as exc:  # stale, out of order, or tampered
            await self._give_up(offer, f"secure aggregation refused: {exc}")
            return
        if isinstance(reply, SurvivorsSigned) and session.session is not None:
            self._signed_rounds[(session.session.run_id, reply.round)] = None
            if len(self._signed_rounds) > MAX_SIGNED_ROUNDS:  # one a secure round, for good
                del self._signed_rounds[next(iter(self._signed_rounds))]
        await self._upload(offer.round, lambda: self._send(SubmitSecure(reply)))

    def _protected(self, request: FitRequest) -> _Protected:
        """How this client answers a secure fit request; ``ClientError`` if it cannot."""
        if isinstance(request, EncryptionRequest):
            if self.silo is None:
                raise ClientError(
                    "the round aggregates homomorphically, and this client holds no silo "
                    "credentials (a public context and a receipt key)"
                )
            if self.silo.silo_id != self.enrollment.client_id:
                raise ClientError(
                    f"the receipt key is silo {self.silo.silo_id!r}'s, "
                    f"this client is {self.enrollment.client_id!r}"
                )
            return _Protected(request, silo=self.silo)
        return _Protected(request, session=self._session(request))

    def _session(self, request: ServerRequest) -> SecAggClient:
        """The secure round's client; an advertise-keys request starts a new one."""
        if isinstance(request, AdvertiseKeysRequest):
            if (request.session.run_id, request.round) in self._signed_rounds:
                raise ProtocolError(
                    f"this client already signed the survivor set of round {request.round}: "
                    "it takes part in a round once (a replayed round could show it two sets)"
                )
            identity = IdentityKey.from_private(self.enrollment.private_key)
            self._secure = SecAggClient(round=request.round, identity=identity)  # OS randomness
        if self._secure is None or self._secure.round != request.round:
            raise StaleMessage(
                f"a {request.stage.label} request of round {request.round} reached a client "
                "that is not in that round's secure session"
            )
        return self._secure

    async def _give_up(self, offer: Offer, reason: str) -> None:
        log.warning("task of round %d failed: %s", offer.round, reason)
        self._event(f"round {offer.round} failed: {reason}")
        await self._retrying(lambda: self._send(ReportFailure(offer, reason)))

    async def _upload(self, round_number: int, upload: Callable[[], Upload]) -> None:
        rejection = await self._retrying(upload)
        if rejection is not None:
            reason = f"{rejection.reason.value}: {rejection.detail}"
            log.warning("round %d rejected our result: %s", round_number, reason)
            self._event(f"round {round_number} rejected our result: {reason}")

    def _work(
        self, offer: TaskOffer, model: Parameters, protected: _Protected | None
    ) -> tuple[Submission, int]:
        """Run the task in a worker thread; returns the submission to upload and the examples."""
        if offer.phase is Phase.FIT:
            if not isinstance(offer.config, FitConfig):
                raise ClientError("a training task came without a FitConfig")
            started = time.perf_counter()
            fit = run_fit(self.client, model, offer.config, residual=self._residual)
            metrics = {**fit.metrics, TRAIN_TIME_METRIC: time.perf_counter() - started}
            if protected is not None:  # a secure round: only the masked or encrypted input leaves
                reply = protected.reply(secure_contribution(fit, offer.config))
                return SubmitSecure(reply, self._features_sha256()), fit.num_examples
            update = model.with_vector(fit.update)
            if fit.payload is not None:  # compressed: it goes up, whatever the answer
                self._residual = fit.residual
            upload = SubmitUpdate(
                offer,
                update,
                fit.num_examples,
                metrics,
                payload=fit.payload,
                codec=fit.codec,
                features_sha256=self._features_sha256(),
            )
            return upload, fit.num_examples
        config = (
            offer.config
            if isinstance(offer.config, EvaluateConfig)
            else EvaluateConfig(offer.round)
        )
        started = time.perf_counter()
        evaluation = run_evaluate(self.client, model, config)
        metrics = {**evaluation.metrics, TRAIN_TIME_METRIC: time.perf_counter() - started}
        submission = SubmitEvaluation(
            offer,
            evaluation.loss,
            evaluation.num_examples,
            metrics,
            features_sha256=self._features_sha256(),
        )
        return submission, evaluation.num_examples

    async def _model_for(self, offer: TaskOffer) -> Parameters:
        """The global model of the task: the cached one, or a download verified by its sha256,
        and by the coordinator's signature when its key is pinned (``SecurityError`` if not)."""
        self._verify(offer)  # a refused model is not even downloaded
        await self._use_features(None if offer.model is None else offer.model.features_sha256)
        if self._model is None or self._model[0] != offer.model_sha256:
            # the link checks that the weights hash to the sha256 asked for: the signed one
            fetch = FetchModel(offer.model_sha256, offer.model_size_bytes)
            model = await self._retrying(lambda: self._send(fetch))
            self._model = (offer.model_sha256, model)
        return self._model[1]

    def _verify(self, offer: TaskOffer) -> None:
        """The pinned key's signature over the task's model version, its weights' sha256, and
        the scaler the task carries (``[preprocessing]``): a scaler changed on the way, or
        carried by a task whose version was signed without one, is refused."""
        if self.coordinator_key is None:
            return
        version = offer.model
        if version is None:
            raise SecurityError("the task names no signed model version (an unsigned model)")
        self.coordinator_key.verify(
            version.signed,
            name=version.name,
            version=version.version,
            round=version.round,
            sha256=offer.model_sha256,
            features=version.features_sha256,
            preprocessing=version.preprocessing_sha256,
        )
        assert version.signed is not None  # verify refuses an unsigned version
        carried = offer.config.extras.get(SCALER_KEY)
        scaler = sha256_text(carried) if isinstance(carried, str) else None
        if (carried is not None and scaler is None) or scaler != version.preprocessing_sha256:
            shown = "none" if carried is None else (scaler or "not text")[:16]
            signed = (version.preprocessing_sha256 or "none")[:16]
            raise SecurityError(
                f"the task's scaler ({shown}) is not the one signed with version "
                f"{version.version} of {version.name!r} ({signed}): changed on the way"
            )
        offered = RunPin(version.signed.run_id, version.name)
        if self.trains_for is None:
            self.trains_for = offered  # the first signed task's run: this process's run
        elif offered != self.trains_for:
            raise SecurityError(
                f"the task's model is {offered.model!r} of run {offered.run_id!r}, signed by "
                f"the pinned key for that run; this client trains {self.trains_for.model!r} "
                f"of run {self.trains_for.run_id!r}"
            )

    def _features_sha256(self) -> str | None:
        return None if self.features is None else self.features.sha256

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                answer = await call()
            except TransportError as exc:
                if self._stopping.is_set():
                    raise _Stopped from exc
                delay = self.backoff.delay(attempt, self._rng)
                state = "refusing calls for now" if isinstance(exc, BusyError) else "unreachable"
                log.info("coordinator %s (%s); retrying in %.2fs", state, exc, delay)
                attempt += 1
                # said, where a wrong address or a refused handshake looked like a hang
                if _told_after(attempt):
                    self._event(f"coordinator {state} after {attempt} tries ({exc}); retrying")
                await self._pause(delay)
                continue
            if attempt >= UNREACHABLE_TOLD_AFTER:
                self._event("the coordinator answers again")
            return answer

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return


_NOT_NOW = ("not eligible", "incompatible")  # a wait the user should hear of

UNREACHABLE_TOLD_AFTER = 3
"""Failed tries of one call before the client says the coordinator is unreachable (then again
after twice as many, and so on): a few are a restart, more a wrong address or certificate."""


def _told_after(attempt: int) -> bool:
    """Whether ``attempt`` failed tries of one call are told (3, 6, 12, 24, ...)."""
    ratio, rest = divmod(attempt, UNREACHABLE_TOLD_AFTER)
    return rest == 0 and ratio > 0 and ratio & (ratio - 1) == 0


def _retry_delay(seconds: float) -> float:
    """The coordinator's "retry after", at most :data:`MAX_RETRY_AFTER_S`."""
    if seconds > MAX_RETRY_AFTER_S:
        log.warning(
            "the coordinator asked to wait %.3g s; checking in again in %.0f s",
            seconds,
            MAX_RETRY_AFTER_S,
        )
        return MAX_RETRY_AFTER_S
    return seconds


def _reported(exc: BaseException) -> str:
    """What the coordinator is told of a task that failed: the error, but not a feature
    module's (its code, its outputs or a record index are what the coordinator's module
    computed from the records: a channel around secure aggregation and DP), which stays in
    this client's log."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, FeatureError):
            log.warning("the feature module failed: %s", cause)
            return "the feature module failed on this client's records (see the client's log)"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def _named(sha256: str | None) -> str:
    return "no feature module" if sha256 is None else f"the feature module {sha256[:16]}..."


def _versions_only(state: DeviceState) -> DeviceState:
    """``state`` with every fact of the moment unknown: what it runs, and nothing invented."""
    return replace(state, battery_level=None, charging=None, wifi=None, idle=None, ram_gb=None)


@dataclass(frozen=True, slots=True)
class _Protected:
    """A secure round's fit request and what answers it: this round's SecAgg+ session, or the
    silo's CKKS credentials."""

    request: FitRequest
    session: SecAggClient | None = None
    silo: SiloCredentials | None = None

    def reply(self, contribution: Contribution) -> SecureReply:
        """The masked or encrypted input that stands for the update: all that leaves the device."""
        if isinstance(self.request, EncryptionRequest):
            assert self.silo is not None
            return self.silo.answer(
                self.request,
                contribution.update,
                num_examples=contribution.num_examples,
                loss=contribution.loss,
                uniform_weight=contribution.uniform_weight,
            )
        assert self.session is not None
        return self.session.handle(self.request, contribution)
