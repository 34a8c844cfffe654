"""A malicious or broken coordinator over real gRPC, against a real client runtime.

The coordinator here is a scripted fake served on 127.0.0.1: it answers
each check-in from a list, streams whatever model bytes it likes and words
its refusals as it likes. The client is the runtime ``shoal client run``
runs, over the real gRPC link. Each attack was reproduced before its fix:

- A fit task of ``epochs = 1e9`` reached the client's ``fit`` (a built-in
  client then trains for good); so did a learning rate of inf or NaN and a
  NaN proximal term.
- A "retry after 10**9 s" kept the client asleep for 31 years, even once the
  coordinator was fixed.
- A task that announced a model of 240 bytes and streamed 16 MiB had all of
  it kept in memory (up to 2 GiB) before the sha256 refused it.
- A SecAgg+ session of 19,000 neighbours (Sybil identities the coordinator
  signed for itself, in one 3.9 MB check-in answer) took the client 23 s and
  1.4 GB to share its secrets, every round.
- A retry reason, a refusal's detail, a gRPC status detail and a model's key
  id went into the client's log and console as sent: a newline forged a log
  line, an escape sequence drove the terminal.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.runtime import (
    MAX_RETRY_AFTER_S,
    Backoff,
    ClientRuntime,
    load_or_create_enrollment,
)
from shoal.core import Parameters
from shoal.core.limits import MAX_LOCAL_EPOCHS
from shoal.core.sharing import MAX_NEIGHBOURS, minimum_threshold
from shoal.governance.model_signing import ModelSigner, PinnedKey, generate_signing_key
from shoal.secure.messages import AdvertiseKeysRequest, SessionConfig
from shoal.secure.quantization import Quantization
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.chunks import chunk_payload
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.messages import SecureTask
from shoal.transport.rpc import add_bytes_servicer
from shoal.transport.signing import generate_client_key

pytestmark = pytest.mark.timeout(60)

RUN = "run-hostile-coordinator"
MODEL = Parameters.from_arrays([np.zeros(4, np.float32)], names=["w"])
FINISHED = pb.CheckInResponse(run_finished=pb.RunFinished(reason="done"))
FORGED = "\nWARNING shoal.client: round 9 fit: 10 examples, 0.01 s\x1b[2J\x1b]0;owned\x07"
"""A line a hostile coordinator would add to the client's log, and escape sequences that clear
the client's terminal and retitle it."""

Fetch = Callable[[pb.FetchModelRequest, Any], AsyncIterator[pb.Chunk]]


class Recording(Client):
    """A client that trains on nothing and records every config it is asked to fit with."""

    def __init__(self) -> None:
        self.fits: list[FitConfig] = []

    def get_parameters(self) -> Parameters:
        return MODEL

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        self.fits.append(config)
        return FitResult(parameters.with_vector(parameters.vector + 1), 10)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return EvaluateResult(0.5, 10)


async def _honest_model(request: pb.FetchModelRequest, context: Any) -> AsyncIterator[pb.Chunk]:
    for chunk in chunk_payload(MODEL.to_bytes()):
        yield serde.encode_chunk(chunk)


class Scripted:
    """A coordinator that answers check-ins from ``answers``, then "the run has finished"."""

    def __init__(
        self,
        answers: list[pb.CheckInResponse],
        *,
        fetch: Fetch = _honest_model,
        verdict: pb.Verdict | None = None,
        features: bytes | None = None,
    ) -> None:
        self.answers = list(answers)
        self.fetch = fetch
        self.features = features  # the feature module it serves (None: the run has none)
        self.verdict = verdict or pb.Verdict(accepted=True)
        self.calls: list[str] = []
        self.failures: list[str] = []
        self.extractors: list[str] = []  # the feature extractor version of each check-in

    async def Enroll(self, request: bytes, context: Any) -> pb.EnrollResponse:  # noqa: N802
        self.calls.append("Enroll")
        credentials = pb.ClientCredentials(client_id="anyone")
        return pb.EnrollResponse(verdict=pb.Verdict(accepted=True), credentials=credentials)

    async def CheckIn(self, request: bytes, context: Any) -> pb.CheckInResponse:  # noqa: N802
        self.calls.append("CheckIn")
        self.extractors.append(
            pb.CheckInRequest.FromString(request).device.feature_extractor_version
        )
        return self.answers.pop(0) if self.answers else FINISHED

    async def FetchModel(  # noqa: N802
        self, request: bytes, context: Any
    ) -> AsyncIterator[pb.Chunk]:
        self.calls.append("FetchModel")
        async for chunk in self.fetch(pb.FetchModelRequest.FromString(request), context):
            yield chunk

    async def FetchFeatures(  # noqa: N802
        self, request: bytes, context: Any
    ) -> AsyncIterator[pb.Chunk]:
        self.calls.append("FetchFeatures")
        if self.features is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no_features: the run has none")
            return
        for chunk in chunk_payload(self.features):
            yield serde.encode_chunk(chunk)

    async def SubmitUpdate(  # noqa: N802
        self, request: AsyncIterator[bytes], context: Any
    ) -> pb.SubmitUpdateResponse:
        self.calls.append("SubmitUpdate")
        async for _ in request:
            pass
        return pb.SubmitUpdateResponse(verdict=self.verdict)

    async def SubmitSecureMessage(  # noqa: N802
        self, request: AsyncIterator[bytes], context: Any
    ) -> pb.SubmitSecureMessageResponse:
        self.calls.append("SubmitSecureMessage")
        async for _ in request:
            pass
        return pb.SubmitSecureMessageResponse(verdict=pb.Verdict(accepted=True))

    async def ReportEvaluation(  # noqa: N802
        self, request: bytes, context: Any
    ) -> pb.ReportEvaluationResponse:
        return pb.ReportEvaluationResponse(verdict=pb.Verdict(accepted=True))

    async def Heartbeat(self, request: bytes, context: Any) -> pb.HeartbeatResponse:  # noqa: N802
        return pb.HeartbeatResponse(verdict=pb.Verdict(accepted=True), next_heartbeat_in_s=1)

    async def ReportFailure(  # noqa: N802
        self, request: bytes, context: Any
    ) -> pb.ReportFailureResponse:
        self.failures.append(pb.ReportFailureRequest.FromString(request).reason)
        return pb.ReportFailureResponse(verdict=pb.Verdict(accepted=True))


class Pauses(ClientRuntime):
    """A runtime that records how long it would wait, and waits no time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pauses: list[float] = []

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)


@asynccontextmanager
async def client_of(
    coordinator: Scripted,
    tmp_path: Path,
    *,
    client: Client | None = None,
    runtime: type[ClientRuntime] = ClientRuntime,
    **options: Any,
) -> AsyncIterator[ClientRuntime]:
    """A real client runtime (``options`` to its constructor), over a gRPC link, to
    ``coordinator`` served on 127.0.0.1."""
    server = grpc.aio.server()
    add_bytes_servicer(server, pb.DESCRIPTOR.services_by_name["Coordinator"], coordinator)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = GrpcLink(f"127.0.0.1:{port}", credentials=None, enrollment_token="token")
    enrollment = load_or_create_enrollment(tmp_path / "client", generate_client_key)
    made = runtime(
        client or Recording(), link, enrollment, backoff=Backoff(0.01, 0.05), seed=0, **options
    )
    try:
        yield made
    finally:
        made.stop()
        await link.close()
        await server.stop(None)


def played(coordinator: Scripted, tmp_path: Path, **options: Any) -> ClientRuntime:
    """A real client runtime (``options`` as for :func:`client_of`) run against
    ``coordinator`` until the run ends; the runtime, for what it recorded."""

    async def play() -> ClientRuntime:
        async with client_of(coordinator, tmp_path, **options) as runtime:
            await asyncio.wait_for(runtime.run(), timeout=20)
            return runtime

    return asyncio.run(play())


def task(
    *,
    fit: pb.FitConfig | None = None,
    signer: ModelSigner | None = None,
    key_id: str | None = None,
    features: str | None = None,
) -> pb.CheckInResponse:
    """A fit task of round 1 on :data:`MODEL` (its size and sha256 as announced), its version
    signed by ``signer`` (with the feature module ``features``), under ``key_id`` if given."""
    sha = MODEL.sha256()
    model = pb.ModelRef(version_id=sha, sha256=sha, size_bytes=len(MODEL.to_bytes()))
    if signer is not None:
        signed = signer(name=RUN, version=1, round=0, sha256=sha, features=features)
        model.name, model.version, model.signature = RUN, 1, signed.signature
        model.key_id = signed.key_id if key_id is None else key_id
        model.features_sha256 = features or ""
    message = pb.Task(round=1, run_id=RUN, phase=pb.PHASE_FIT, model=model, deadline_in_s=60)
    message.fit.CopyFrom(fit or pb.FitConfig(epochs=1, batch_size=8, learning_rate=0.1))
    return pb.CheckInResponse(task=message)


def retry(seconds: float, reason: str = "") -> pb.CheckInResponse:
    return pb.CheckInResponse(retry_after=pb.RetryAfter(seconds=seconds, reason=reason))


# --- absurd work -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fit", "named"),
    [
        (pb.FitConfig(epochs=1e9, batch_size=8, learning_rate=0.1), "above the limit of 10,000"),
        (pb.FitConfig(epochs=1, batch_size=8, learning_rate=float("inf")), "learning_rate"),
        (pb.FitConfig(epochs=1, batch_size=8, learning_rate=float("nan")), "learning_rate"),
        (
            pb.FitConfig(epochs=1, batch_size=8, learning_rate=0.1, proximal_mu=float("nan")),
            "proximal_mu",
        ),
    ],
)
def test_a_task_asking_for_absurd_training_is_never_trained_on(
    tmp_path: Path, fit: pb.FitConfig, named: str
) -> None:
    client = Recording()
    events: list[str] = []

    coordinator = Scripted([task(fit=fit), task(fit=fit)])  # then "the run has finished"
    # not fatal: before, the client exited, a fleet with it
    played(coordinator, tmp_path, client=client, unreadable_retry_s=0.01, on_event=events.append)
    assert client.fits == []
    refused = [event for event in events if "answer cannot be used" in event]
    assert len(refused) == 1 and named in refused[0]  # told once for the same answer
    assert events[-1].startswith("the run has finished")


def test_the_most_epochs_a_task_may_ask_are_trained(tmp_path: Path) -> None:
    client = Recording()
    fit = pb.FitConfig(epochs=MAX_LOCAL_EPOCHS, batch_size=0, learning_rate=1e-3, proximal_mu=0)

    played(Scripted([task(fit=fit)]), tmp_path, client=client)
    assert [config.epochs for config in client.fits] == [MAX_LOCAL_EPOCHS]


# --- waiting ---------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [10.0**9, 1e300, MAX_RETRY_AFTER_S + 1])
def test_a_retry_after_of_years_is_an_hour_at_most(
    tmp_path: Path, seconds: float, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shoal.client"):
        runtime = played(Scripted([retry(seconds), task()]), tmp_path, runtime=Pauses)
    assert runtime.finished is not None and runtime.tasks_done == 1
    assert isinstance(runtime, Pauses)
    [pause] = runtime.pauses
    assert 0.8 * MAX_RETRY_AFTER_S <= pause <= 1.2 * MAX_RETRY_AFTER_S  # with its jitter
    assert any("checking in again in 3600 s" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("seconds", [0.0, 2.0, MAX_RETRY_AFTER_S])
def test_a_retry_after_within_the_hour_is_honoured(tmp_path: Path, seconds: float) -> None:
    runtime = played(Scripted([retry(seconds)]), tmp_path, runtime=Pauses)
    assert isinstance(runtime, Pauses)
    [pause] = runtime.pauses
    assert 0.8 * seconds <= pause <= 1.2 * seconds


# --- the model download ----------------------------------------------------------------


def test_a_download_larger_than_announced_is_refused_at_its_first_chunk(tmp_path: Path) -> None:
    sent: list[int] = []
    total = 16 * 2**20

    async def flood(request: pb.FetchModelRequest, context: Any) -> AsyncIterator[pb.Chunk]:
        block = bytes(2**20)
        for offset in range(0, total, len(block)):
            sent.append(offset)
            yield pb.Chunk(offset=offset, total_size=total, sha256="a" * 64, data=block)

    client = Recording()

    coordinator = Scripted([task()], fetch=flood)
    played(coordinator, tmp_path, client=client)
    announced = len(MODEL.to_bytes())
    [failure] = coordinator.failures
    assert failure == f"model refused: chunks declare {total} bytes, expected {announced}"
    assert client.fits == []


def test_the_model_of_the_announced_size_is_trained_on(tmp_path: Path) -> None:
    client = Recording()

    coordinator = Scripted([task()])
    played(coordinator, tmp_path, client=client)
    assert coordinator.failures == [] and len(client.fits) == 1
    assert coordinator.calls.count("SubmitUpdate") == 1


# --- SecAgg+ ---------------------------------------------------------------------------


def _advertise(neighbours: int) -> pb.CheckInResponse:
    """Stage 1 of a session where this client (node 1) has ``neighbours`` neighbours."""
    quantization = Quantization(bits=8, max_weight=100)
    session = SessionConfig(RUN, 1, neighbours + 1, 4, minimum_threshold(neighbours), quantization)
    request = AdvertiseKeysRequest(1, session, 1, frozenset(range(2, neighbours + 2)))
    return pb.CheckInResponse(task=serde.encode_secure_task(SecureTask(1, RUN, request, 60)))


@pytest.mark.parametrize("neighbours", [MAX_NEIGHBOURS + 1, 20_000])
def test_a_session_of_too_many_neighbours_is_refused_before_any_key_leaves(
    tmp_path: Path, neighbours: int
) -> None:
    coordinator = Scripted([_advertise(neighbours)])
    played(coordinator, tmp_path)
    assert "SubmitSecureMessage" not in coordinator.calls
    [failure] = coordinator.failures
    assert failure == (
        f"secure aggregation refused: {neighbours} neighbours are more than the "
        f"{MAX_NEIGHBOURS} a client shares its secrets among"
    )


def test_a_session_of_the_most_neighbours_is_joined(tmp_path: Path) -> None:
    coordinator = Scripted([_advertise(MAX_NEIGHBOURS)])
    played(coordinator, tmp_path)
    assert coordinator.failures == [] and "SubmitSecureMessage" in coordinator.calls


# --- what reaches the client's log and console -------------------------------------------


def test_a_coordinators_words_never_forge_a_line_of_the_clients_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    aborted: list[bool] = []

    async def unavailable_once(
        request: pb.FetchModelRequest, context: Any
    ) -> AsyncIterator[pb.Chunk]:
        if not aborted:
            aborted.append(True)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down" + FORGED)
        async for chunk in _honest_model(request, context):
            yield chunk

    signer = ModelSigner(generate_signing_key(), run_id=RUN)
    rejected = pb.Rejected(code=pb.REJECT_CODE_INCOMPATIBLE, detail="too old" + FORGED)
    coordinator = Scripted(
        [
            retry(0, "not eligible now" + FORGED),
            pb.CheckInResponse(rejected=rejected),
            task(signer=signer, key_id="k" + FORGED),  # a key id the pinned key refuses
            task(signer=signer),  # the download fails once, then the upload is refused
        ],
        fetch=unavailable_once,
        verdict=pb.Verdict(accepted=False, code=pb.REJECT_CODE_LATE, detail="late" + FORGED),
    )
    events: list[str] = []

    pinned = PinnedKey.of(signer.private_key.public_key())
    with caplog.at_level(logging.INFO):
        runtime = played(
            coordinator, tmp_path, runtime=Pauses, on_event=events.append, coordinator_key=pinned
        )
    assert runtime.tasks_done == 1
    lines = events + [record.getMessage() for record in caplog.records]
    for source in ("not eligible now", "too old", "UNAVAILABLE: down", "signed by key", "late"):
        assert any(source in line and "round 9" in line for line in lines), source
    for line in lines:
        assert line.isprintable(), repr(line)


HOSTILE_MODULES = {
    # a module that would reach the host: refused before a byte of it runs
    "imports": (
        '(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))',
        "model refused: .*imports wasi_snapshot_preview1.fd_write",
    ),
    # a module that never returns: stopped by its fuel, the client is not held
    "loops": ("", "the feature module failed"),
}


def hostile_module(kind: str) -> bytes:
    """A feature module with a valid manifest whose ``shoal_extract`` loops forever, or that
    imports a host function."""
    wasmtime = pytest.importorskip("wasmtime")
    from shoal.features import FeatureManifest, with_manifest

    imports, _ = HOSTILE_MODULES[kind]
    body = "(loop $forever (br $forever))" if kind == "loops" else ""
    wat = f"""(module {imports}
      (memory (export "memory") 1)
      (func (export "shoal_alloc") (param i32) (result i32) i32.const 8)
      (func (export "shoal_extract") (param i32 i32 i32) (result i32) {body} i32.const 0))"""
    manifest = FeatureManifest(name="hostile", version="1.0.0", inputs=("x",), outputs=("y",))
    return with_manifest(bytes(wasmtime.wat2wasm(wat)), manifest)


@pytest.mark.parametrize("kind", sorted(HOSTILE_MODULES))
def test_a_hostile_feature_module_is_stopped_and_never_trained_with(
    tmp_path: Path, kind: str
) -> None:
    """A coordinator signs and ships a feature module that imports a host function, or one
    that loops forever: the client refuses the first before running it, stops the second at
    its fuel, never trains, and tells the coordinator its task failed (and why, as far as
    that says nothing of its records); it goes on serving."""
    from shoal.client.features import FeatureSource
    from shoal.features import FeatureLimits, FeatureModule

    built: list[FeatureModule | None] = []

    def build(module: FeatureModule | None) -> Client:
        built.append(module)
        assert module is not None
        module.extract(np.zeros((4, 1)))  # what an app does with its raw records
        return Recording()

    module = hostile_module(kind)
    signer = ModelSigner(generate_signing_key(), run_id=RUN)
    signed = task(signer=signer, features=hashlib.sha256(module).hexdigest())
    coordinator = Scripted([signed], features=module)
    source = FeatureSource(build, limits=FeatureLimits(fuel_per_record=10_000, fuel_base=100_000))
    pinned = PinnedKey.of(signer.private_key.public_key())
    runtime = played(coordinator, tmp_path, client=source, coordinator_key=pinned)  # type: ignore[arg-type]
    assert runtime.tasks_done == 0 and "SubmitUpdate" not in coordinator.calls
    [reason] = coordinator.failures
    assert re.search(HOSTILE_MODULES[kind][1], reason), reason
    assert len(built) == (0 if kind == "imports" else 1)


def test_the_run_module_a_client_announces_is_read_never_compiled_or_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any task, a client without a module asks for the run's to report its version:
    a coordinator that answers with a module no version signs (one that imports the host)
    gets its version reported, and nothing of it compiled, run, or built into the app."""
    from shoal.client.features import FeatureSource
    from shoal.features import FeatureModule

    compiled: list[bytes] = []
    monkeypatch.setattr(FeatureModule, "__init__", lambda self, wasm, **_: compiled.append(wasm))
    built: list[object] = []
    coordinator = Scripted([], features=hostile_module("imports"))
    runtime = played(coordinator, tmp_path, client=FeatureSource(built.append))  # type: ignore[arg-type]
    assert coordinator.calls[:3] == ["Enroll", "FetchFeatures", "CheckIn"]
    assert coordinator.extractors == ["1.0.0"]  # its manifest's version, reported
    assert compiled == [] and built == [] and runtime.features is None


SECRET = (271828182.0, 31415926.0)  # a phone's raw record: an account number, a place


def spying_module() -> bytes:
    """A feature module that fails on purpose with what it read: the first input as its
    failure code, the second scaled into an output too large for float32."""
    wasmtime = pytest.importorskip("wasmtime")
    from shoal.features import FeatureManifest, with_manifest

    wat = """(module (memory (export "memory") 1)
      (func (export "shoal_alloc") (param i32) (result i32) i32.const 1024)
      (func (export "shoal_extract") (param $in i32) (param $out i32) (param $n i32) (result i32)
        (f64.store (local.get $out) (f64.mul (f64.const 1e300) (f64.load offset=8 (local.get $in))))
        (i32.trunc_f64_s (f64.load (local.get $in)))))"""
    manifest = FeatureManifest(name="spy", version="1", inputs=("account", "place"), outputs=("f",))
    return with_manifest(bytes(wasmtime.wat2wasm(wat)), manifest)


def test_what_a_feature_module_computes_never_reaches_the_coordinator_in_a_failure(
    tmp_path: Path,
) -> None:
    """The coordinator signs a module that fails with the values it read (its failure code, an
    output in the error's text): the client reports that its feature module failed, and no
    more. Only its update leaves it, under the protections the round has."""
    from shoal.client.features import FeatureSource
    from shoal.features import FeatureModule

    class Lazy(Recording):  # an app that computes its features when asked to train
        def __init__(self, module: FeatureModule | None) -> None:
            super().__init__()
            self.module = module

        def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
            assert self.module is not None
            self.module.extract(np.array([SECRET]))
            return super().fit(parameters, config)

    spy = spying_module()
    signer = ModelSigner(generate_signing_key(), run_id=RUN)
    digest = FeatureModule.from_bytes(spy).sha256
    coordinator = Scripted([task(signer=signer, features=digest)], features=spy)
    pinned = PinnedKey.of(signer.private_key.public_key())
    played(coordinator, tmp_path, client=FeatureSource(Lazy), coordinator_key=pinned)  # type: ignore[arg-type]
    assert len(coordinator.failures) == 1
    [reason] = coordinator.failures
    assert "feature module failed" in reason
    for value in ("271828182", "31415926", "3.14159"):
        assert value not in reason
