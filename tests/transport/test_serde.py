"""Protobuf <-> typed messages: round trips, malformed messages, request digests and signatures."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.client.api import EvaluateConfig, FitConfig
from shoal.core.errors import IntegrityError, ProtocolError, SecurityError
from shoal.registry import VersionSignature
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    Advertisement,
    ClientMessage,
    ConsistencyRequest,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PeerKeys,
    PublicKeys,
    ServerRequest,
    SessionConfig,
    ShareKeysRequest,
    SharesSent,
    SurvivorsSigned,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import Quantization
from shoal.secure.serde import encode_message
from shoal.tasks import ModelVersion, Phase, RejectReason, RejectSubmission
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.chunks import ChunkAssembler, assemble_chunks
from shoal.transport.messages import (
    Credentials,
    DeviceState,
    EnrollmentRequest,
    EnrollReply,
    EvaluationReport,
    FailureReport,
    HeartbeatReply,
    ModelRef,
    ModelRequest,
    RejectCode,
    Rejected,
    RetryAfter,
    SecureMessageHeader,
    SecureTask,
    Task,
    UpdateHeader,
    Verdict,
    one_line,
)
from shoal.transport.signing import generate_client_key

SHA = st.binary(max_size=8).map(lambda data: hashlib.sha256(data).hexdigest())
TEXT = st.text(max_size=40)
NAME = st.text(min_size=1, max_size=40)
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
SECONDS = st.floats(min_value=0, max_value=1e9, allow_nan=False)
COUNT = st.integers(min_value=0, max_value=2**63 - 1)
ROUND = st.integers(min_value=0, max_value=2**63 - 1)
PRINTABLE = st.text(  # a metric's name, a device's texts: printable, as on the wire
    st.characters(categories=["L", "N", "P", "S"], include_characters=" "), min_size=1, max_size=40
)
LINE = st.text(  # a coordinator's text as a client keeps it: one printable line
    st.characters(categories=["L", "N", "P", "S"], include_characters=" "), max_size=40
)
METRICS = st.dictionaries(PRINTABLE, FINITE, max_size=4)
EXTRAS = st.dictionaries(
    TEXT,
    st.one_of(st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), FINITE, TEXT),
    max_size=4,
)

device_states = st.builds(
    DeviceState,
    device_class=PRINTABLE,
    battery_level=st.none() | st.floats(min_value=0, max_value=1),  # None: unknown, not 0
    charging=st.none() | st.booleans(),
    wifi=st.none() | st.booleans(),
    app_version=PRINTABLE,
    runtime_version=PRINTABLE,
    model_architecture_version=PRINTABLE,
    feature_extractor_version=st.none() | PRINTABLE,
    ram_gb=st.none() | st.floats(min_value=0, max_value=1e6),
    idle=st.none() | st.booleans(),  # None: unknown, never "busy"
)
model_refs = st.builds(ModelRef, NAME, SHA, COUNT)
reject_codes = st.sampled_from(RejectCode)
verdicts = st.one_of(st.builds(Verdict.accept, LINE), st.builds(Verdict.reject, reject_codes, LINE))


@st.composite
def tasks(draw: st.DrawFn) -> Task:
    round_number = draw(ROUND)
    phase = draw(st.sampled_from(Phase))
    config: FitConfig | EvaluateConfig
    if phase is Phase.FIT:
        config = FitConfig(
            round=round_number,
            epochs=draw(st.floats(min_value=1e-3, max_value=1e3)),
            batch_size=draw(st.integers(min_value=0, max_value=2**32 - 1)),
            learning_rate=draw(st.floats(min_value=1e-9, max_value=10)),
            proximal_mu=draw(st.floats(min_value=0, max_value=10)),
            seed=draw(st.integers(min_value=0, max_value=2**64 - 1)),
            extras=draw(EXTRAS),
        )
    else:
        batch = draw(st.integers(min_value=0, max_value=2**32 - 1))
        config = EvaluateConfig(round_number, batch, draw(EXTRAS))
    run_id = draw(NAME)
    signed = st.builds(  # on the wire, a version's signature is for the task's run
        VersionSignature, st.just(run_id), NAME, st.binary(min_size=64, max_size=64)
    )
    versions = st.builds(ModelVersion, NAME, COUNT, ROUND, st.none() | signed)
    model = dataclasses.replace(draw(model_refs), version=draw(st.none() | versions))
    return Task(round_number, run_id, phase, model, config, draw(SECONDS))


def round_trip(encode: Any, decode: Any, value: Any) -> Any:
    """Encode, go through the wire bytes, decode."""
    message = encode(value)
    return decode(type(message).FromString(message.SerializeToString()))


@given(device_states)
def test_device_state_round_trips(state: DeviceState) -> None:
    assert round_trip(serde.encode_check_in_request, serde.decode_check_in_request, state) == state
    assert round_trip(serde.encode_heartbeat_request, serde.decode_heartbeat_request, state) == (
        state
    )


@given(device_states, st.binary(min_size=32, max_size=32), NAME)
def test_enroll_request_round_trips(state: DeviceState, key: bytes, token: str) -> None:
    request = EnrollmentRequest(state, key, token)
    assert round_trip(serde.encode_enroll_request, serde.decode_enroll_request, request) == request


@given(NAME, st.one_of(st.none(), st.floats(min_value=1, max_value=1e12)), LINE)
def test_enroll_reply_round_trips(client_id: str, expires_at: float | None, detail: str) -> None:
    accepted = EnrollReply(Verdict.accept(detail), Credentials(client_id, expires_at))
    refused = EnrollReply(Verdict.reject(RejectCode.BAD_TOKEN, detail))
    for reply in (accepted, refused):
        decoded = round_trip(serde.encode_enroll_response, serde.decode_enroll_response, reply)
        assert decoded == reply


@given(tasks())
def test_task_round_trips(task: Task) -> None:
    assert round_trip(serde.encode_task, serde.decode_task, task) == task
    decoded = round_trip(serde.encode_check_in_response, serde.decode_check_in_response, task)
    assert decoded == task


@given(st.one_of(st.builds(RetryAfter, SECONDS, LINE), st.builds(Rejected, reject_codes, LINE)))
def test_other_check_in_outcomes_round_trip(outcome: RetryAfter | Rejected) -> None:
    decoded = round_trip(serde.encode_check_in_response, serde.decode_check_in_response, outcome)
    assert decoded == outcome


@given(st.text(max_size=300))
def test_a_coordinators_texts_reach_the_client_as_one_printable_line(text: str) -> None:
    """A newline or an escape sequence would forge a line of the client's log, or drive its
    terminal; the empty text stays empty."""
    answers = [
        serde.decode_check_in_response(
            pb.CheckInResponse(retry_after=pb.RetryAfter(seconds=1, reason=text))
        ).reason,
        serde.decode_check_in_response(
            pb.CheckInResponse(rejected=pb.Rejected(code=pb.REJECT_CODE_SUSPENDED, detail=text))
        ).detail,
        serde.decode_verdict(pb.Verdict(accepted=True, detail=text)).detail,
        serde.decode_verdict(
            pb.Verdict(accepted=False, code=pb.REJECT_CODE_LATE, detail=text)
        ).detail,
    ]
    for answer in answers:
        assert answer == one_line(text)
        assert answer.isprintable() and len(answer) <= 256


@given(verdicts)
def test_verdicts_round_trip_in_every_response(verdict: Verdict) -> None:
    for encode, decode in [
        (serde.encode_submit_update_response, serde.decode_submit_update_response),
        (serde.encode_report_evaluation_response, serde.decode_report_evaluation_response),
        (serde.encode_report_failure_response, serde.decode_report_failure_response),
    ]:
        assert round_trip(encode, decode, verdict) == verdict
    reply = HeartbeatReply(verdict, 30.0)
    assert (
        round_trip(serde.encode_heartbeat_response, serde.decode_heartbeat_response, reply) == reply
    )


@given(st.builds(ModelRequest, NAME, COUNT))
def test_model_request_round_trips(request: ModelRequest) -> None:
    decoded = round_trip(
        serde.encode_fetch_model_request, serde.decode_fetch_model_request, request
    )
    assert decoded == request


@given(st.builds(UpdateHeader, ROUND, NAME, COUNT, SHA, COUNT, SHA, METRICS))
def test_update_header_round_trips(header: UpdateHeader) -> None:
    assert round_trip(serde.encode_update_header, serde.decode_update_header, header) == header


@given(st.builds(EvaluationReport, ROUND, NAME, st.floats(), COUNT, SHA, METRICS))
def test_evaluation_report_round_trips(report: EvaluationReport) -> None:
    decoded = round_trip(serde.encode_evaluation_report, serde.decode_evaluation_report, report)
    # a NaN loss travels as NaN: refusing it is the coordinator's call (INVALID_UPDATE)
    assert dataclasses.replace(decoded, loss=0.0) == dataclasses.replace(report, loss=0.0)
    assert np.isnan(decoded.loss) == np.isnan(report.loss)


@given(ROUND, NAME, st.text(max_size=600))
def test_a_failure_report_round_trips_as_one_printable_line(
    round_number: int, run: str, reason: str
) -> None:
    report = FailureReport.summarizing(round_number, run, reason)
    assert report.reason.isprintable() and len(report.reason) <= 256
    decoded = round_trip(serde.encode_failure_report, serde.decode_failure_report, report)
    assert decoded == report


def test_a_failure_report_refuses_control_characters_and_a_foreign_signature() -> None:
    with pytest.raises(ProtocolError, match="printable"):
        FailureReport(1, "run", "line one\nforged log line")
    with pytest.raises(ProtocolError, match="longer than"):
        FailureReport(1, "run", "x" * 257)
    assert FailureReport.summarizing(1, "run", "a\nb").reason == "a b"
    private, _ = generate_client_key()
    request = serde.encode_failure_report(FailureReport(2, "run", "crashed"))
    serde.sign_message(request, private, client_id="c", run_id="run", round=1, timestamp=1.0)
    with pytest.raises(ProtocolError, match="signed for run"):
        serde.decode_failure_report(request)


def test_every_reject_code_has_a_wire_value_and_back() -> None:
    wire_names = {value.name for value in pb.RejectCode.DESCRIPTOR.values[1:]}
    assert wire_names == {f"REJECT_CODE_{code.name}" for code in RejectCode}
    for code in RejectCode:
        assert serde.decode_reject_code(serde.encode_reject_code(code)) is code


def test_every_coordinator_reason_has_a_code() -> None:
    for reason in RejectReason:
        rejection = RejectSubmission("c", 1, reason, "why")
        assert serde.verdict_of(rejection) == Verdict.reject(RejectCode(reason.value), "why")
    assert serde.verdict_of(None) == Verdict.accept()


def test_numpy_scalars_travel_as_extras() -> None:
    config = FitConfig(round=1, extras={"a": np.int64(3), "b": np.float32(0.5), "c": np.True_})
    task = Task(1, "run", Phase.FIT, ModelRef("v1", "0" * 64, 10), config, 5.0)
    assert serde.decode_task(serde.encode_task(task)).config.extras == {
        "a": 3,
        "b": 0.5,
        "c": True,
    }


@pytest.mark.parametrize(
    "extras", [{"x": [1, 2]}, {"x": None}, {"x": 2**63}, {"x": b"raw"}, {1: "key"}]
)
def test_extras_that_cannot_travel_are_refused(extras: dict[Any, Any]) -> None:
    config = FitConfig(round=1, extras=extras)
    task = Task(1, "run", Phase.FIT, ModelRef("v1", "0" * 64, 10), config, 5.0)
    with pytest.raises(ProtocolError, match="extras"):
        serde.encode_task(task)


def test_a_negative_seed_cannot_be_encoded() -> None:
    task = Task(1, "run", Phase.FIT, ModelRef("v", "0" * 64, 1), FitConfig(round=1, seed=-1), 1.0)
    with pytest.raises(ProtocolError, match="fit config"):
        serde.encode_task(task)


# --- malformed messages --------------------------------------------------------------


def good_task_message() -> pb.Task:
    task = Task(2, "run", Phase.FIT, ModelRef("v1", "a" * 64, 100), FitConfig(round=2), 30.0)
    return serde.encode_task(task)


def test_a_model_signature_is_read_as_made_for_the_task_run() -> None:
    """The run is not sent twice: a signature moved into another run's task is for that run."""
    signed = VersionSignature("run-a", "k" * 16, b"s" * 64)
    model = ModelRef("v", "a" * 64, 1, ModelVersion("global", 3, 2, signed))
    task = Task(4, "run-b", Phase.FIT, model, FitConfig(round=4), 1.0)
    decoded = round_trip(serde.encode_task, serde.decode_task, task)
    assert decoded.model.version.signed == VersionSignature("run-b", "k" * 16, b"s" * 64)


def test_an_unsigned_version_and_an_unnamed_one_decode_as_such() -> None:
    unsigned = ModelRef("v", "a" * 64, 1, ModelVersion("global", 3, 2, None))
    for model in (unsigned, ModelRef("v", "a" * 64, 1)):
        task = Task(4, "run", Phase.FIT, model, FitConfig(round=4), 1.0)
        assert round_trip(serde.encode_task, serde.decode_task, task).model == model


def test_a_task_without_config_or_model_is_malformed() -> None:
    message = good_task_message()
    message.ClearField("config")
    with pytest.raises(ProtocolError, match="neither"):
        serde.decode_task(message)
    message = good_task_message()
    message.ClearField("model")
    with pytest.raises(ProtocolError, match="model"):
        serde.decode_task(message)


def test_a_task_whose_phase_and_config_disagree_is_malformed() -> None:
    message = good_task_message()
    message.phase = pb.PHASE_EVALUATE
    with pytest.raises(ProtocolError, match="EvaluateConfig"):
        serde.decode_task(message)
    message.phase = pb.PHASE_UNSPECIFIED
    with pytest.raises(ProtocolError, match="unknown phase"):
        serde.decode_task(message)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("epochs", 0.0, "epochs"),
        ("learning_rate", -1.0, "learning_rate"),
        ("epochs", float("nan"), "epochs"),
        ("epochs", 1e9, "above the limit of 10,000"),
        ("learning_rate", float("inf"), "learning_rate"),
        ("learning_rate", float("nan"), "learning_rate"),
        ("proximal_mu", float("nan"), "proximal_mu"),
        ("proximal_mu", float("inf"), "proximal_mu"),
    ],
)
def test_a_fit_config_out_of_range_is_malformed(field: str, value: float, match: str) -> None:
    message = good_task_message()
    setattr(message.fit, field, value)
    with pytest.raises(ProtocolError, match=match):
        serde.decode_task(message)


def test_empty_oneofs_and_unknown_codes_are_malformed() -> None:
    with pytest.raises(ProtocolError, match="no outcome"):
        serde.decode_check_in_response(pb.CheckInResponse())
    with pytest.raises(ProtocolError, match="unknown reject code"):
        serde.decode_verdict(pb.Verdict(accepted=False, code=pb.REJECT_CODE_UNSPECIFIED))
    with pytest.raises(ProtocolError, match="unknown reject code"):
        serde.decode_verdict(pb.Verdict(accepted=False, code=999))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="accepted verdict"):
        serde.decode_verdict(pb.Verdict(accepted=True, code=pb.REJECT_CODE_LATE))
    message = good_task_message()
    message.fit.extras["x"].CopyFrom(pb.Scalar())
    with pytest.raises(ProtocolError, match="no value"):
        serde.decode_task(message)


@pytest.mark.parametrize(
    ("message", "decode"),
    [
        (pb.CheckInRequest(), serde.decode_check_in_request),
        (pb.HeartbeatRequest(), serde.decode_heartbeat_request),
        (pb.EnrollRequest(), serde.decode_enroll_request),
        (pb.SubmitUpdateResponse(), serde.decode_submit_update_response),
        (pb.EnrollResponse(), serde.decode_enroll_response),
    ],
)
def test_a_missing_required_message_is_malformed(message: Any, decode: Any) -> None:
    with pytest.raises(ProtocolError, match="lacks"):
        decode(message)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"battery_level": 1.5}, "battery"),
        ({"battery_level": float("nan")}, "battery"),
        ({"device_class": ""}, "device_class"),
        ({"app_version": "x" * 1000}, "app_version"),
        ({"ram_gb": -1.0}, "ram_gb"),
    ],
)
def test_an_impossible_device_state_is_malformed(changes: dict[str, Any], match: str) -> None:
    message = serde.encode_device_state(DeviceState())
    for name, value in changes.items():
        setattr(message, name, value)
    with pytest.raises(ProtocolError, match=match):
        serde.decode_device_state(message)


def test_bad_hashes_and_keys_are_malformed() -> None:
    header = serde.encode_update_header(UpdateHeader(1, "run", 5, "a" * 64, 10, "b" * 64))
    header.payload_sha256 = "not-a-hash"
    with pytest.raises(ProtocolError, match="payload sha256"):
        serde.decode_update_header(header)
    request = pb.EnrollRequest(
        device=serde.encode_device_state(DeviceState()), public_key=b"short", enrollment_token="t"
    )
    with pytest.raises(ProtocolError, match="32 bytes"):
        serde.decode_enroll_request(request)


def test_garbage_bytes_do_not_parse_as_a_message() -> None:
    with pytest.raises(ProtocolError, match="3 bytes that do not parse as a protobuf CheckInReq"):
        serde.parse(pb.CheckInRequest, b"\xff\xff\xff")
    with pytest.raises(ProtocolError, match="must arrive as bytes"):
        serde.parse(pb.CheckInRequest, pb.CheckInRequest())  # type: ignore[arg-type]


def test_parse_reads_what_was_sent_and_an_empty_request_lacks_its_auth() -> None:
    message = serde.encode_check_in_request(DeviceState(battery_level=0.5))
    assert serde.parse(pb.CheckInRequest, message.SerializeToString()) == message
    with pytest.raises(ProtocolError, match="lacks its 'auth' field"):
        serde.decode_auth(serde.parse(pb.CheckInRequest, b""))


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_a_protocol_error(data: bytes) -> None:
    for message_type in (pb.EnrollRequest, pb.UpdatePart, pb.SecureMessagePart):
        try:
            parsed = serde.parse(message_type, data)
        except ProtocolError:
            continue
        assert isinstance(parsed, message_type)


# --- request digests and signatures -------------------------------------------------


def signed_check_in(private_key: bytes, **fields: Any) -> pb.CheckInRequest:
    message = serde.encode_check_in_request(DeviceState(battery_level=0.5))
    serde.sign_message(
        message,
        private_key,
        client_id=fields.get("client_id", "client-1"),
        run_id="run-1",
        round=-1,
        timestamp=1000.0,
    )
    return message


def test_a_signed_message_verifies_after_the_wire() -> None:
    private, public = generate_client_key()
    message = signed_check_in(private)
    received = pb.CheckInRequest.FromString(message.SerializeToString())
    auth = serde.verify_message(received, public)
    assert auth.client_id == "client-1"
    assert auth.payload_sha256 == serde.request_digest(received)


def test_a_changed_body_fails_verification() -> None:
    private, public = generate_client_key()
    message = signed_check_in(private)
    message.device.charging = not message.device.charging
    with pytest.raises(SecurityError, match="does not match"):
        serde.verify_message(message, public)


def test_the_digest_ignores_auth_and_binds_the_message_type() -> None:
    private, _ = generate_client_key()
    message = signed_check_in(private)
    bare = serde.encode_check_in_request(DeviceState(battery_level=0.5))
    assert serde.request_digest(message) == serde.request_digest(bare)
    assert serde.request_digest(pb.CheckInRequest()) != serde.request_digest(pb.HeartbeatRequest())


def test_a_message_without_auth_is_malformed() -> None:
    _, public = generate_client_key()
    with pytest.raises(ProtocolError, match="auth"):
        serde.verify_message(pb.HeartbeatRequest(), public)


def test_the_body_must_name_the_signed_round_and_run() -> None:
    private, _ = generate_client_key()
    header = serde.encode_update_header(UpdateHeader(4, "run", 5, "a" * 64, 10, "b" * 64))
    serde.sign_message(header, private, client_id="c", run_id="run", round=3, timestamp=1.0)
    with pytest.raises(ProtocolError, match="signed for run"):
        serde.decode_update_header(header)


# --- upload streams ------------------------------------------------------------------


def test_an_upload_is_its_header_then_its_chunks() -> None:
    payload = bytes(range(256)) * 10
    digest = hashlib.sha256(payload).hexdigest()
    header = serde.encode_update_header(UpdateHeader(1, "run", 5, digest, len(payload), "b" * 64))
    parts = list(serde.update_parts(header, payload, chunk_size=1000))
    assert serde.header_of(parts[0]) == header
    assert assemble_chunks(map(serde.chunk_of, parts[1:]), max_bytes=10**6) == payload
    with pytest.raises(ProtocolError, match="start with its header"):
        serde.header_of(parts[1])
    with pytest.raises(ProtocolError, match="only chunks"):
        serde.chunk_of(parts[0])
    with pytest.raises(ProtocolError, match="only chunks"):
        serde.chunk_of(pb.UpdatePart())


def arrived(parts: list[Any], sha256: str) -> bytes:
    """What a receiver assembles from an upload's chunks, checked against the header's sha256."""
    assembler = ChunkAssembler(max_bytes=2**20, expected_sha256=sha256)
    for part in parts[1:]:
        assembler.add(serde.chunk_of(part))
    return assembler.finish()


def test_an_upload_whose_header_does_not_hash_the_payload_is_refused_on_arrival() -> None:
    header = serde.encode_update_header(UpdateHeader(1, "run", 5, "a" * 64, 3, "b" * 64))
    parts = list(serde.update_parts(header, b"abc"))  # the sender hashed it once, for the header
    with pytest.raises(IntegrityError, match="hashes to"):
        arrived(parts, header.payload_sha256)


# --- secure aggregation --------------------------------------------------------------

SMALL_ROUND = st.integers(min_value=0, max_value=2**40)


def public_keys(seed: bytes) -> PublicKeys:
    cipher = hashlib.sha256(seed).digest()
    return PublicKeys(cipher=cipher, mask=bytes(byte ^ 0xFF for byte in cipher))


def advertised(seed: bytes) -> Advertisement:
    """Signed keys as a client advertises them (the signature's bytes are arbitrary here)."""
    commitment = hashlib.sha256(b"seed" + seed).digest()
    return Advertisement(public_keys(seed), commitment, hashlib.sha512(seed).digest())


@st.composite
def stage_requests(draw: st.DrawFn, round_number: int) -> ServerRequest:
    """A key or unmask request of ``round_number`` (the masked-input one rides on a fit task)."""
    nodes = draw(st.integers(min_value=2, max_value=8))
    others = frozenset(range(2, nodes + 1))
    kind = draw(st.sampled_from(["advertise", "share", "consistency", "unmask"]))
    if kind == "advertise":
        session = SessionConfig(
            run_id=draw(NAME),
            round=round_number,
            num_nodes=nodes,
            vector_length=draw(st.integers(min_value=0, max_value=10**6)),
            threshold=draw(st.integers(min_value=1, max_value=nodes)),
            quantization=Quantization(clip=draw(st.floats(0.01, 10))).fitted(nodes),
        )
        return AdvertiseKeysRequest(round_number, session, 1, others)
    if kind == "share":
        peers = {
            node: PeerKeys(bytes([node]) * 32, advertised(draw(st.binary(max_size=4))))
            for node in others
        }
        return ShareKeysRequest(round_number, peers)
    signers = frozenset(draw(st.sets(st.sampled_from(sorted(others)))))
    if kind == "consistency":
        return ConsistencyRequest(round_number, signers | {1})
    return UnmaskRequest(round_number, {node: bytes([node]) * 64 for node in signers})


@st.composite
def secure_tasks(draw: st.DrawFn) -> SecureTask:
    round_number = draw(SMALL_ROUND)
    request = draw(stage_requests(round_number))
    return SecureTask(round_number, draw(NAME), request, draw(SECONDS))


def masked_input_task(round_number: int = 2, shares: int = 3) -> Task:
    nodes = range(1, shares + 1)
    request = MaskedInputRequest(
        round_number, {n: bytes([n]) * 156 for n in nodes}, {n: bytes([n]) * 64 for n in nodes}
    )
    config = FitConfig(round=round_number)
    return Task(
        round_number, "run", Phase.FIT, ModelRef("v1", "a" * 64, 100), config, 30.0, request
    )


@given(secure_tasks())
def test_a_secure_stage_task_round_trips(task: SecureTask) -> None:
    assert round_trip(serde.encode_secure_task, serde.decode_secure_task, task) == task
    decoded = round_trip(serde.encode_check_in_response, serde.decode_check_in_response, task)
    assert decoded == task
    message = serde.encode_secure_task(task)
    assert message.phase == pb.PHASE_SECURE_AGGREGATION
    assert not message.HasField("model") and message.WhichOneof("config") is None


@pytest.mark.parametrize("shares", [0, 1, 5])
def test_a_fit_task_carries_its_masked_input_request(shares: int) -> None:
    task = masked_input_task(shares=shares)
    assert round_trip(serde.encode_task, serde.decode_task, task) == task
    decoded = round_trip(serde.encode_check_in_response, serde.decode_check_in_response, task)
    assert decoded == task
    assert serde.encode_task(dataclasses.replace(task, secure=None)).secure_request == b""


@given(SMALL_ROUND, NAME, SHA, COUNT)
def test_a_secure_message_header_round_trips(
    round_number: int, run_id: str, sha: str, size: int
) -> None:
    header = SecureMessageHeader(round_number, run_id, sha, size)
    decoded = round_trip(
        serde.encode_secure_message_header, serde.decode_secure_message_header, header
    )
    assert decoded == header


@pytest.mark.parametrize(
    "message",
    [
        KeysAdvertised(3, advertised(b"k")),
        SharesSent(3, {2: b"s" * 156, 5: b"t" * 156}, {2: b"d" * 64, 5: b"e" * 64}),
        SharesSent(3, {}, {}),
        SurvivorsSigned(3, b"g" * 64),
        MaskedInput(3, np.arange(7, dtype=np.uint32)),
        MaskedInput(3, np.zeros(0, np.uint32)),
        UnmaskShares(3, {1: b"a" * 64}, {2: b"b" * 64}),
    ],
)
def test_a_secure_reply_travels_as_a_signed_header_and_chunks(message: ClientMessage) -> None:
    private, public = generate_client_key()
    frame = encode_message(message)
    header = serde.encode_secure_message_header(
        SecureMessageHeader(3, "run", hashlib.sha256(frame).hexdigest(), len(frame))
    )
    serde.sign_message(header, private, client_id="c", run_id="run", round=3, timestamp=1.0)
    parts = [
        pb.SecureMessagePart.FromString(part.SerializeToString())
        for part in serde.secure_message_parts(header, frame, chunk_size=16)
    ]
    received = serde.secure_header_of(parts[0])
    assert serde.verify_message(received, public).round == 3
    assert serde.decode_secure_message_header(received).total_size == len(frame)
    payload = assemble_chunks(map(serde.chunk_of, parts[1:]), max_bytes=10**6)
    decoded = serde.decode_client_message(payload)
    assert type(decoded) is type(message) and encode_message(decoded) == frame
    with pytest.raises(ProtocolError, match="start with its header"):
        serde.secure_header_of(parts[1])
    with pytest.raises(ProtocolError, match="only chunks"):
        serde.chunk_of(parts[0])
    with pytest.raises(IntegrityError, match="hashes to"):
        arrived(list(serde.secure_message_parts(header, frame + b"x")), header.payload_sha256)


def test_requests_and_replies_cannot_pass_for_each_other() -> None:
    reply = encode_message(KeysAdvertised(1, advertised(b"k")))
    request = encode_message(UnmaskRequest(1, {}))
    with pytest.raises(ProtocolError, match="a task carries a client's KeysAdvertised"):
        serde.decode_secure_request(reply)
    with pytest.raises(ProtocolError, match="coordinator's UnmaskRequest"):
        serde.decode_client_message(request)
    for garbage in (b"", b"SSA1", b"SSA1\x05garbage", reply + b"\x00"):
        with pytest.raises(ProtocolError):
            serde.decode_client_message(garbage)


def test_malformed_secure_tasks_are_refused() -> None:
    unmask = UnmaskRequest(2, {})
    stage = serde.encode_secure_task(SecureTask(2, "run", unmask, 5.0))
    with_model = pb.Task()
    with_model.CopyFrom(stage)
    with_model.model.sha256 = "a" * 64
    with pytest.raises(ProtocolError, match="no model and no config"):
        serde.decode_secure_task(with_model)
    empty = pb.Task()
    empty.CopyFrom(stage)
    empty.secure_request = b""
    with pytest.raises(ProtocolError, match="lacks its request"):
        serde.decode_secure_task(empty)
    with pytest.raises(ProtocolError, match="not a fit or evaluate task"):
        serde.decode_task(stage)
    with pytest.raises(ProtocolError, match="not a secure-aggregation task"):
        serde.decode_secure_task(serde.encode_task(masked_input_task()))
    other_round = pb.Task()
    other_round.CopyFrom(stage)
    other_round.round = 3
    with pytest.raises(ProtocolError, match="of round 2"):
        serde.decode_secure_task(other_round)
    masked = serde.encode_task(masked_input_task())
    stage_in_fit = pb.Task()
    stage_in_fit.CopyFrom(masked)
    stage_in_fit.secure_request = stage.secure_request
    with pytest.raises(ProtocolError, match="fit task carries a unmask request"):
        serde.decode_task(stage_in_fit)
    masked_as_stage = pb.Task()
    masked_as_stage.CopyFrom(stage)
    masked_as_stage.secure_request = masked.secure_request
    with pytest.raises(ProtocolError, match="travels with a fit task"):
        serde.decode_secure_task(masked_as_stage)
    masked.secure_request = b"SSA2\x03"
    with pytest.raises(ProtocolError, match="truncated"):
        serde.decode_task(masked)


def test_typed_tasks_refuse_a_request_that_does_not_fit() -> None:
    task = masked_input_task()
    with pytest.raises(ProtocolError, match="of round 5"):
        dataclasses.replace(task, secure=MaskedInputRequest(5, {}, {}))
    evaluate = Task(2, "run", Phase.EVALUATE, task.model, EvaluateConfig(2), 1.0)
    with pytest.raises(ProtocolError, match="only a fit task"):
        dataclasses.replace(evaluate, secure=task.secure)
    with pytest.raises(ProtocolError, match="travels with a fit task"):
        SecureTask(2, "run", MaskedInputRequest(2, {}, {}), 1.0)


def test_a_secure_header_must_name_the_signed_round_and_run() -> None:
    private, _ = generate_client_key()
    header = serde.encode_secure_message_header(SecureMessageHeader(4, "run", "a" * 64, 10))
    serde.sign_message(header, private, client_id="c", run_id="run", round=3, timestamp=1.0)
    with pytest.raises(ProtocolError, match="signed for run"):
        serde.decode_secure_message_header(header)
    assert serde.request_digest(pb.SecureMessageHeader()) != serde.request_digest(pb.UpdateHeader())


def test_the_secure_rpc_has_its_own_verdict_message() -> None:
    for verdict in (Verdict.accept(), Verdict.reject(RejectCode.LATE, "round 1 is over")):
        decoded = round_trip(
            serde.encode_submit_secure_message_response,
            serde.decode_submit_secure_message_response,
            verdict,
        )
        assert decoded == verdict
    with pytest.raises(ProtocolError, match="lacks"):
        serde.decode_submit_secure_message_response(pb.SubmitSecureMessageResponse())


@pytest.mark.parametrize(
    ("response", "label"),
    [
        (serde.encode_submit_update_response(Verdict.accept()), "accepted"),
        (serde.encode_heartbeat_response(HeartbeatReply(Verdict.accept(), 30.0)), "accepted"),
        (
            serde.encode_report_failure_response(Verdict.reject(RejectCode.LATE, "too late")),
            "late",
        ),
        (serde.encode_check_in_response(RetryAfter(1.0, "wait")), "retry_after"),
        (serde.encode_check_in_response(Rejected(RejectCode.SUSPENDED, "no")), "suspended"),
        (pb.CheckInResponse(), "empty"),
        (pb.SubmitUpdateResponse(verdict=pb.Verdict(accepted=False, code=999)), "unknown"),
        (pb.Chunk(), "ok"),  # no verdict: a model's chunk
    ],
)
def test_verdict_labels(response: Any, label: str) -> None:
    assert serde.verdict_label(response) == label
