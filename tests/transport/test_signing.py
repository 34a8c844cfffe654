"""Request signing: what verifies, what is refused, and how the replay guard bounds memory."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.errors import ProtocolError, SecurityError
from shoal.transport.signing import (
    NO_ROUND,
    ReplayGuard,
    RequestAuth,
    create_request_auth,
    generate_client_key,
    new_nonce,
    public_key_of,
    sign_request,
    signed_message,
    verify_request,
)

PAYLOAD = hashlib.sha256(b"the request body").hexdigest()
OTHER_PAYLOAD = hashlib.sha256(b"another body").hexdigest()
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_client_key()


def make_auth(private_key: bytes, **changes: object) -> RequestAuth:
    fields: dict[str, object] = {
        "client_id": "client-1",
        "run_id": "run-1",
        "round": 3,
        "payload_sha256": PAYLOAD,
        "timestamp": NOW,
    }
    fields.update(changes)
    return create_request_auth(private_key, **fields)  # type: ignore[arg-type]


def test_a_signed_request_verifies(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    verify_request(public, make_auth(private), payload_sha256=PAYLOAD)


def test_key_sizes_and_public_key_derivation(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    assert len(private) == len(public) == 32
    assert public_key_of(private) == public


def test_a_forged_signature_is_refused(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    auth = make_auth(private)
    forged = dataclasses.replace(auth, signature=bytes(64))
    with pytest.raises(SecurityError, match="bad signature"):
        verify_request(public, forged, payload_sha256=PAYLOAD)
    flipped = bytes([auth.signature[0] ^ 1]) + auth.signature[1:]
    with pytest.raises(SecurityError, match="bad signature"):
        verify_request(public, dataclasses.replace(auth, signature=flipped), payload_sha256=PAYLOAD)


def test_another_clients_key_does_not_verify(keys: tuple[bytes, bytes]) -> None:
    private, _ = keys
    _, other_public = generate_client_key()
    with pytest.raises(SecurityError, match="bad signature"):
        verify_request(other_public, make_auth(private), payload_sha256=PAYLOAD)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("client_id", "client-2"),
        ("run_id", "run-2"),
        ("round", 4),
        ("round", NO_ROUND),
        ("nonce", bytes(16)),
        ("timestamp", NOW + 1),
        ("payload_sha256", OTHER_PAYLOAD),
    ],
)
def test_changing_any_signed_field_breaks_the_signature(
    keys: tuple[bytes, bytes], field: str, value: object
) -> None:
    private, public = keys
    tampered = dataclasses.replace(make_auth(private), **{field: value})
    with pytest.raises(SecurityError):
        # the server hashes the body it received: the tampered payload hash is that one
        verify_request(public, tampered, payload_sha256=tampered.payload_sha256)


def test_a_body_that_is_not_the_signed_one_is_refused(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    with pytest.raises(SecurityError, match="does not match"):
        verify_request(public, make_auth(private), payload_sha256=OTHER_PAYLOAD)


def test_a_malformed_public_key_is_a_security_error(keys: tuple[bytes, bytes]) -> None:
    private, _ = keys
    with pytest.raises(SecurityError, match="32 bytes"):
        verify_request(b"short", make_auth(private), payload_sha256=PAYLOAD)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("client_id", "", "client id"),
        ("run_id", "r" * 300, "run id"),
        ("round", -2, "round"),
        ("nonce", b"short", "nonce"),
        ("timestamp", float("nan"), "timestamp"),
        ("payload_sha256", "ABC", "sha256"),
        ("payload_sha256", PAYLOAD.upper(), "sha256"),
        ("signature", b"\0" * 10, "signature"),
    ],
)
def test_a_malformed_auth_is_a_protocol_error(
    keys: tuple[bytes, bytes], field: str, value: object, message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        dataclasses.replace(make_auth(keys[0]), **{field: value})


def test_nonces_are_random_and_sixteen_bytes() -> None:
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert {len(nonce) for nonce in nonces} == {16}


def test_the_signature_is_deterministic_ed25519(keys: tuple[bytes, bytes]) -> None:
    private, _ = keys
    fields = {
        "client_id": "c",
        "run_id": "r",
        "round": 0,
        "nonce": bytes(16),
        "timestamp": 0.0,
        "payload_sha256": PAYLOAD,
    }
    assert sign_request(private, **fields) == sign_request(private, **fields)  # type: ignore[arg-type]


@given(
    first=st.tuples(st.text(max_size=8), st.text(max_size=8)),
    second=st.tuples(st.text(max_size=8), st.text(max_size=8)),
)
def test_the_encoding_is_unambiguous(first: tuple[str, str], second: tuple[str, str]) -> None:
    """Moving characters between the client id and the run id changes the signed bytes."""

    def encode(ids: tuple[str, str]) -> bytes:
        return signed_message(
            client_id=ids[0],
            run_id=ids[1],
            round=1,
            nonce=bytes(16),
            timestamp=1.0,
            payload_sha256=PAYLOAD,
        )

    assert (encode(first) == encode(second)) == (first == second)


# --- the replay guard ------------------------------------------------------------------


def test_a_fresh_request_passes_once_and_its_replay_is_refused(keys: tuple[bytes, bytes]) -> None:
    guard = ReplayGuard(window_s=60)
    auth = make_auth(keys[0])
    guard.check(auth, key=keys[1], now=NOW)
    with pytest.raises(SecurityError, match="replayed"):
        guard.check(auth, key=keys[1], now=NOW + 1)
    guard.check(make_auth(keys[0]), key=keys[1], now=NOW + 1)  # a new nonce is fine
    assert len(guard) == 2


def test_the_same_nonce_from_another_client_is_its_own(keys: tuple[bytes, bytes]) -> None:
    guard = ReplayGuard(window_s=60)
    auth = make_auth(keys[0])
    guard.check(auth, key=keys[1], now=NOW)
    guard.check(dataclasses.replace(auth, client_id="client-2"), key=keys[1], now=NOW)


@pytest.mark.parametrize("offset", [-60.001, 60.001, -1e6, 1e6])
def test_a_timestamp_outside_the_window_is_refused(
    keys: tuple[bytes, bytes], offset: float
) -> None:
    guard = ReplayGuard(window_s=60)
    with pytest.raises(SecurityError, match="outside"):
        guard.check(make_auth(keys[0], timestamp=NOW + offset), key=keys[1], now=NOW)
    assert len(guard) == 0


@pytest.mark.parametrize("offset", [-60.0, 0.0, 60.0])
def test_the_window_edges_are_inside(keys: tuple[bytes, bytes], offset: float) -> None:
    ReplayGuard(window_s=60).check(make_auth(keys[0], timestamp=NOW + offset), key=keys[1], now=NOW)


def test_a_replay_after_the_window_is_refused_by_its_timestamp(keys: tuple[bytes, bytes]) -> None:
    guard = ReplayGuard(window_s=60)
    auth = make_auth(keys[0])
    guard.check(auth, key=keys[1], now=NOW)
    with pytest.raises(SecurityError, match="outside"):
        guard.check(auth, key=keys[1], now=NOW + 61)


def test_expiry_frees_the_memory_of_old_nonces(keys: tuple[bytes, bytes]) -> None:
    guard = ReplayGuard(window_s=60)
    for step in range(100):
        guard.check(make_auth(keys[0], timestamp=NOW + step), key=keys[1], now=NOW + step)
    assert len(guard) == 61  # the requests of the last 60 s, both ends included
    guard.expire(now=NOW + 1000)
    assert len(guard) == 0
    assert not guard._seen  # no empty per-client sets are left behind


def test_a_strangers_key_never_uses_up_a_clients_share(keys: tuple[bytes, bytes]) -> None:
    """Requests that name a client's id but verified with another key (an enrollment's own,
    say) are the stranger's: the client's own requests still pass, nonce and all."""
    guard = ReplayGuard(window_s=60, max_per_client=3)
    _, stranger = generate_client_key()
    auth = make_auth(keys[0])
    for _ in range(3):
        guard.check(make_auth(keys[0]), key=stranger, now=NOW)
    with pytest.raises(SecurityError, match="more than 3"):
        guard.check(make_auth(keys[0]), key=stranger, now=NOW)
    guard.check(auth, key=keys[1], now=NOW)
    with pytest.raises(SecurityError, match="replayed"):
        guard.check(auth, key=keys[1], now=NOW)


def test_one_client_cannot_fill_the_guard(keys: tuple[bytes, bytes]) -> None:
    guard = ReplayGuard(window_s=60, max_per_client=3)
    for _ in range(3):
        guard.check(make_auth(keys[0]), key=keys[1], now=NOW)
    with pytest.raises(SecurityError, match="more than 3"):
        guard.check(make_auth(keys[0]), key=keys[1], now=NOW)
    guard.check(make_auth(keys[0], client_id="client-2"), key=keys[1], now=NOW)


@pytest.mark.parametrize("window", [0.0, -1.0, float("inf"), float("nan")])
def test_the_window_must_be_positive_and_finite(window: float) -> None:
    with pytest.raises(ValueError, match="window_s"):
        ReplayGuard(window_s=window)
