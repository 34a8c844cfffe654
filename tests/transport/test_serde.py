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
from shoal.coordinator.events import Phase, RejectReason, RejectSubmission
from shoal.core.errors import ProtocolError, SecurityError
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.chunks import assemble_chunks
from shoal.transport.messages import (
    Credentials,
    DeviceState,
    EnrollmentRequest,
    EnrollReply,
    EvaluationReport,
    HeartbeatReply,
    ModelRef,
    ModelRequest,
    RejectCode,
    Rejected,
    RetryAfter,
    Task,
    UpdateHeader,
    Verdict,
)
from shoal.transport.signing import generate_client_key

SHA = st.binary(max_size=8).map(lambda data: hashlib.sha256(data).hexdigest())
TEXT = st.text(max_size=40)
NAME = st.text(min_size=1, max_size=40)
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
SECONDS = st.floats(min_value=0, max_value=1e9, allow_nan=False)
COUNT = st.integers(min_value=0, max_value=2**63 - 1)
ROUND = st.integers(min_value=0, max_value=2**63 - 1)
METRICS = st.dictionaries(TEXT, FINITE, max_size=4)
EXTRAS = st.dictionaries(
    TEXT,
    st.one_of(st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), FINITE, TEXT),
    max_size=4,
)

device_states = st.builds(
    DeviceState,
    device_class=NAME,
    battery_level=st.floats(min_value=0, max_value=1),
    charging=st.booleans(),
    wifi=st.booleans(),
    app_version=NAME,
    runtime_version=NAME,
    model_architecture_version=NAME,
    feature_extractor_version=st.none() | NAME,
    ram_gb=st.floats(min_value=0, max_value=1e6),
)
model_refs = st.builds(ModelRef, NAME, SHA, COUNT)
reject_codes = st.sampled_from(RejectCode)
verdicts = st.one_of(st.builds(Verdict.accept, TEXT), st.builds(Verdict.reject, reject_codes, TEXT))


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
    return Task(round_number, draw(NAME), phase, draw(model_refs), config, draw(SECONDS))


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


@given(NAME, st.one_of(st.none(), st.floats(min_value=1, max_value=1e12)), TEXT)
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


@given(st.one_of(st.builds(RetryAfter, SECONDS, TEXT), st.builds(Rejected, reject_codes, TEXT)))
def test_other_check_in_outcomes_round_trip(outcome: RetryAfter | Rejected) -> None:
    decoded = round_trip(serde.encode_check_in_response, serde.decode_check_in_response, outcome)
    assert decoded == outcome


@given(verdicts)
def test_verdicts_round_trip_in_every_response(verdict: Verdict) -> None:
    for encode, decode in [
        (serde.encode_submit_update_response, serde.decode_submit_update_response),
        (serde.encode_report_evaluation_response, serde.decode_report_evaluation_response),
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
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        pb.CheckInRequest.FromString(b"\xff\xff\xff")


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


def test_an_upload_whose_header_does_not_hash_the_payload_is_refused() -> None:
    header = serde.encode_update_header(UpdateHeader(1, "run", 5, "a" * 64, 3, "b" * 64))
    with pytest.raises(ProtocolError, match="payload_sha256"):
        list(serde.update_parts(header, b"abc"))
