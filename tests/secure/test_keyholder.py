"""The key holder: signed receipts, the k-of-registered-silos rule, one decryption per round."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shoal.core.errors import ConfigError, ProtocolError, RunError, SecurityError
from shoal.secure.ckks import (
    EncryptedVector,
    decrypt_vector,
    encrypt_vector,
    load_context,
    sum_encrypted,
)
from shoal.secure.keyholder import (
    DEFAULT_DECRYPTION_NOISE_STD,
    JOURNAL,
    MANIFEST,
    PUBLIC_CONTEXT,
    RECEIPT_CONTEXT,
    SECRET_CONTEXT,
    ContributionReceipt,
    KeyHolder,
    check_receipts,
    check_sum_form,
    csprng_standard_normal,
    read_silo_keys,
    receipt_message,
    sign_receipt,
    verify_contribution,
    verify_receipt,
)
from shoal.transport.signing import generate_client_key

pytest.importorskip("tenseal")

RUN = "run-1"
# Ten silos, values in [-1, 1]: CKKS errs by ~1e-8 and the flooding noise has a
# standard deviation of 2^-16 (1.5e-5); 1e-3 is more than 60 standard deviations.
HE_TOLERANCE = 1e-3
SILO_KEYS = {f"silo-{index}": generate_client_key() for index in range(10)}
PUBLIC_KEYS = {silo: public for silo, (_, public) in SILO_KEYS.items()}


@dataclass
class Round:
    """One round of contributions: each silo's update, ciphertext and receipt."""

    updates: dict[str, np.ndarray]
    ciphertexts: dict[str, EncryptedVector]
    receipts: dict[str, ContributionReceipt]

    def aggregate(
        self, public_context: bytes, silos: Sequence[str] | None = None
    ) -> EncryptedVector:
        chosen = list(self.ciphertexts) if silos is None else silos
        return sum_encrypted(public_context, [self.ciphertexts[silo] for silo in chosen])

    def receipts_of(self, silos: Sequence[str] | None = None) -> list[ContributionReceipt]:
        return [self.receipts[s] for s in (list(self.receipts) if silos is None else silos)]


def contribute(
    public_context: bytes, *, round: int, silos: Sequence[str], length: int = 64, seed: int = 0
) -> Round:
    rng = np.random.default_rng(seed + round)
    updates = {silo: rng.uniform(-1, 1, length) for silo in silos}
    ciphertexts = {silo: encrypt_vector(public_context, u) for silo, u in updates.items()}
    receipts = {
        silo: sign_receipt(
            SILO_KEYS[silo][0],
            run_id=RUN,
            round=round,
            silo_id=silo,
            ciphertext_sha256=ciphertexts[silo].sha256(),
        )
        for silo in silos
    }
    return Round(updates, ciphertexts, receipts)


@pytest.fixture
def holder(tmp_path: Path) -> KeyHolder:
    return KeyHolder.init(tmp_path / "keyholder", min_contributors=3, silos=PUBLIC_KEYS)


def decrypt(
    holder: KeyHolder, contribution: Round, *, round: int, silos: Sequence[str] | None = None
) -> np.ndarray:
    return holder.decrypt_aggregate(
        run_id=RUN,
        round=round,
        aggregate=contribution.aggregate(holder.public_context(), silos),
        receipts=contribution.receipts_of(silos),
    )


# --- receipts ----------------------------------------------------------------------------


def receipt(
    silo: str = "silo-0", *, round: int = 1, digest: str = "ab" * 32
) -> ContributionReceipt:
    return sign_receipt(
        SILO_KEYS[silo][0], run_id=RUN, round=round, silo_id=silo, ciphertext_sha256=digest
    )


def test_receipt_signs_and_round_trips() -> None:
    signed = receipt()
    verify_receipt(PUBLIC_KEYS["silo-0"], signed)
    assert ContributionReceipt.from_bytes(signed.to_bytes()) == signed
    assert "signature" not in repr(signed)


def test_receipt_message_is_domain_separated_and_unambiguous() -> None:
    message = receipt_message(run_id="a", round=1, silo_id="bc", ciphertext_sha256="00" * 32)
    assert message.startswith(RECEIPT_CONTEXT)
    shifted = receipt_message(run_id="ab", round=1, silo_id="c", ciphertext_sha256="00" * 32)
    assert message != shifted


@pytest.mark.parametrize(
    "change",
    [
        {"run_id": "run-2"},
        {"round": 2},
        {"silo_id": "silo-1"},
        {"ciphertext_sha256": "cd" * 32},
        {"signature": bytes(64)},
    ],
)
def test_any_altered_receipt_field_breaks_the_signature(change: dict[str, object]) -> None:
    altered = dataclasses.replace(receipt(), **change)  # type: ignore[arg-type]
    with pytest.raises(SecurityError, match="bad signature"):
        verify_receipt(PUBLIC_KEYS["silo-0"], altered)


def test_receipt_from_another_key_is_refused() -> None:
    with pytest.raises(SecurityError, match="bad signature"):
        verify_receipt(PUBLIC_KEYS["silo-1"], receipt("silo-0"))
    with pytest.raises(SecurityError, match="32 bytes"):
        verify_receipt(b"short", receipt())
    with pytest.raises(SecurityError, match="32 bytes"):
        sign_receipt(b"short", run_id=RUN, round=1, silo_id="x", ciphertext_sha256="00" * 32)


@pytest.mark.parametrize(
    "fields",
    [
        {"run_id": ""},
        {"silo_id": "x" * 257},
        {"round": -1},
        {"round": True},
        {"ciphertext_sha256": "AB" * 32},
        {"ciphertext_sha256": "ab"},
        {"signature": b"x" * 63},
    ],
)
def test_malformed_receipts_are_refused(fields: dict[str, object]) -> None:
    base = {
        "run_id": RUN,
        "round": 1,
        "silo_id": "silo-0",
        "ciphertext_sha256": "ab" * 32,
        "signature": bytes(64),
    }
    with pytest.raises(ProtocolError):
        ContributionReceipt(**(base | fields))  # type: ignore[arg-type]


def test_malformed_receipt_bytes_are_refused() -> None:
    data = receipt().to_bytes()
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            ContributionReceipt.from_bytes(data[:cut])
    with pytest.raises(ProtocolError, match="trailing"):
        ContributionReceipt.from_bytes(data + b"\x00")


def test_coordinator_checks_each_upload_against_its_receipt(holder: KeyHolder) -> None:
    contribution = contribute(holder.public_context(), round=1, silos=["silo-0"])
    upload, signed = contribution.ciphertexts["silo-0"], contribution.receipts["silo-0"]
    verify_contribution(PUBLIC_KEYS["silo-0"], signed, upload, run_id=RUN, round=1)
    with pytest.raises(SecurityError, match="round 1, not run 'run-1' round 2"):
        verify_contribution(PUBLIC_KEYS["silo-0"], signed, upload, run_id=RUN, round=2)
    # a flip deep in the coefficients, which SEAL may well accept, fails the signed sha256
    altered = bytearray(upload.chunks[0])
    altered[len(altered) // 2] ^= 0x01
    tampered = EncryptedVector(upload.length, (bytes(altered),))
    with pytest.raises(SecurityError, match="does not match the sha256 it signed"):
        verify_contribution(PUBLIC_KEYS["silo-0"], signed, tampered, run_id=RUN, round=1)


# --- the k-of-registered-silos rule ------------------------------------------------------


def test_check_receipts_accepts_k_distinct_registered_silos() -> None:
    receipts = [receipt(silo) for silo in ("silo-2", "silo-0", "silo-1")]
    chosen = check_receipts(PUBLIC_KEYS, run_id=RUN, round=1, receipts=receipts, min_contributors=3)
    assert chosen == ("silo-0", "silo-1", "silo-2")


@pytest.mark.parametrize(
    ("receipts", "message"),
    [
        ([], "at least 3 distinct silos, got 0"),
        ([receipt("silo-0"), receipt("silo-1")], "at least 3 distinct silos, got 2"),
        ([receipt("silo-0"), receipt("silo-0"), receipt("silo-1")], "two receipts from"),
        ([receipt("silo-0"), receipt("silo-1"), receipt("silo-2", round=2)], "not run"),
        (
            [
                receipt("silo-0"),
                receipt("silo-1"),
                dataclasses.replace(receipt("silo-2"), run_id="run-0"),
            ],
            "not run",
        ),
        (
            [
                receipt("silo-0"),
                receipt("silo-1"),
                dataclasses.replace(receipt("silo-2"), ciphertext_sha256="00" * 32),
            ],
            "bad signature",
        ),
    ],
)
def test_check_receipts_refusals(receipts: list[ContributionReceipt], message: str) -> None:
    with pytest.raises(SecurityError, match=message):
        check_receipts(PUBLIC_KEYS, run_id=RUN, round=1, receipts=receipts, min_contributors=3)


def test_receipt_from_an_unregistered_silo_is_refused() -> None:
    intruder_private, _ = generate_client_key()
    intruder = sign_receipt(
        intruder_private, run_id=RUN, round=1, silo_id="intruder", ciphertext_sha256="ab" * 32
    )
    receipts = [receipt("silo-0"), receipt("silo-1"), intruder]
    with pytest.raises(SecurityError, match="'intruder' is not a registered silo"):
        check_receipts(PUBLIC_KEYS, run_id=RUN, round=1, receipts=receipts, min_contributors=3)


# --- the folder --------------------------------------------------------------------------


def test_init_writes_the_folder_with_a_private_secret(holder: KeyHolder) -> None:
    folder = holder.directory
    assert stat.S_IMODE((folder / SECRET_CONTEXT).stat().st_mode) == 0o600
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["min_contributors"] == 3
    assert manifest["silos"] == {silo: key.hex() for silo, key in PUBLIC_KEYS.items()}
    assert manifest["public_context_sha256"] == holder.public_context_sha256()
    public = (folder / PUBLIC_CONTEXT).read_bytes()
    assert public == holder.public_context()
    assert not load_context(public).has_secret_key()  # what the coordinator gets cannot decrypt
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        KeyHolder.init(folder, min_contributors=3, silos=PUBLIC_KEYS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_contributors": 1}, "between 2"),
        ({"min_contributors": 11}, "between 2"),
        ({"silos": {"a": b"short", "b": PUBLIC_KEYS["silo-0"]}}, "silo 'a'"),
        ({"silos": {"": PUBLIC_KEYS["silo-0"], "b": PUBLIC_KEYS["silo-1"]}}, "silo ''"),
        ({"decryption_noise_std": -1.0}, "decryption_noise_std"),
        ({"decryption_noise_std": float("nan")}, "decryption_noise_std"),
    ],
)
def test_init_validates_its_policy(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"min_contributors": 2, "silos": PUBLIC_KEYS} | kwargs
    with pytest.raises(ConfigError, match=message):
        KeyHolder.init(tmp_path, **arguments)  # type: ignore[arg-type]
    assert not (tmp_path / SECRET_CONTEXT).exists()


def test_open_checks_the_folder(holder: KeyHolder, tmp_path: Path) -> None:
    folder = holder.directory
    reopened = KeyHolder.open(folder)
    assert reopened.public_context() == holder.public_context()
    assert reopened.min_contributors == 3 and dict(reopened.silos) == PUBLIC_KEYS
    with pytest.raises(RunError, match="not a key-holder folder"):
        KeyHolder.open(tmp_path / "missing")
    os.chmod(folder / SECRET_CONTEXT, 0o644)
    with pytest.raises(SecurityError, match="readable by others"):
        KeyHolder.open(folder)
    os.chmod(folder / SECRET_CONTEXT, 0o600)
    (folder / PUBLIC_CONTEXT).write_bytes(holder.public_context()[:-1] + b"\x00")
    with pytest.raises(RunError, match="does not match the manifest"):
        KeyHolder.open(folder)


@pytest.mark.parametrize(
    "change",
    [
        {"format": "shoal.keyholder/9"},
        {"min_contributors": 0},
        {"poly_modulus_degree": 1000},
        {"silos": {"a": "zz"}},
        {"public_context_sha256": "nope"},
    ],
)
def test_open_refuses_a_malformed_manifest(holder: KeyHolder, change: dict[str, object]) -> None:
    path = holder.directory / MANIFEST
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(RunError, match="manifest"):
        KeyHolder.open(holder.directory)


# --- decryption --------------------------------------------------------------------------


def test_decrypts_the_sum_of_ten_silos(holder: KeyHolder) -> None:
    contribution = contribute(holder.public_context(), round=1, silos=list(SILO_KEYS))
    total = decrypt(holder, contribution, round=1)
    expected = np.sum(list(contribution.updates.values()), axis=0)
    np.testing.assert_allclose(total, expected, rtol=0, atol=HE_TOLERANCE)
    (record,) = holder.decrypted_rounds()
    assert (record.run_id, record.round, record.silos) == (RUN, 1, tuple(sorted(SILO_KEYS)))


def test_decryption_is_flooded_with_csprng_noise(tmp_path: Path) -> None:
    holder = KeyHolder.init(tmp_path / "a", min_contributors=2, silos=PUBLIC_KEYS)
    quiet = KeyHolder.init(
        tmp_path / "b", min_contributors=2, silos=PUBLIC_KEYS, decryption_noise_std=0.0
    )
    silos = ["silo-0", "silo-1"]
    contribution = contribute(holder.public_context(), round=1, silos=silos, length=4096)
    aggregate = contribution.aggregate(holder.public_context())
    exact = decrypt_vector((holder.directory / SECRET_CONTEXT).read_bytes(), aggregate)
    flooded = decrypt(holder, contribution, round=1)
    spread = np.std(flooded - exact) / DEFAULT_DECRYPTION_NOISE_STD
    assert 0.9 < spread < 1.1  # 4096 draws: the estimate is within 2% of the truth
    quiet_contribution = contribute(quiet.public_context(), round=1, silos=silos, length=16)
    expected = sum(quiet_contribution.updates.values())
    np.testing.assert_allclose(decrypt(quiet, quiet_contribution, round=1), expected, atol=1e-6)


def test_fewer_than_k_receipts_are_refused_and_do_not_burn_the_round(holder: KeyHolder) -> None:
    contribution = contribute(
        holder.public_context(), round=1, silos=["silo-0", "silo-1", "silo-2"]
    )
    with pytest.raises(SecurityError, match="at least 3 distinct silos, got 2"):
        decrypt(holder, contribution, round=1, silos=["silo-0", "silo-1"])
    assert holder.decrypted_rounds() == []
    decrypt(holder, contribution, round=1)  # the refusal did not use the round up


def test_receipts_for_another_round_are_refused(holder: KeyHolder) -> None:
    contribution = contribute(
        holder.public_context(), round=1, silos=["silo-0", "silo-1", "silo-2"]
    )
    with pytest.raises(SecurityError, match="not run 'run-1' round 2"):
        decrypt(holder, contribution, round=2)


def test_second_decryption_of_a_round_is_refused_even_after_reopening(holder: KeyHolder) -> None:
    silos = [f"silo-{index}" for index in range(5)]
    contribution = contribute(holder.public_context(), round=1, silos=silos)
    decrypt(holder, contribution, round=1, silos=silos)
    # another subset: the difference of two sums would be silo-4's update
    with pytest.raises(SecurityError, match="decrypted already"):
        decrypt(holder, contribution, round=1, silos=silos[:4])
    reopened = KeyHolder.open(holder.directory)
    with pytest.raises(SecurityError, match="decrypted already"):
        decrypt(reopened, contribution, round=1, silos=silos[:4])
    next_round = contribute(holder.public_context(), round=2, silos=silos)
    decrypt(reopened, next_round, round=2)
    assert [(r.run_id, r.round) for r in KeyHolder.open(holder.directory).decrypted_rounds()] == [
        (RUN, 1),
        (RUN, 2),
    ]


def test_concurrent_requests_for_one_round_decrypt_once(holder: KeyHolder) -> None:
    contribution = contribute(
        holder.public_context(), round=1, silos=["silo-0", "silo-1", "silo-2"]
    )
    second = KeyHolder.open(holder.directory)  # as a second process would
    start = threading.Barrier(4)
    outcomes: list[str] = []

    def attempt(target: KeyHolder) -> None:
        start.wait()
        try:
            decrypt(target, contribution, round=1)
            outcomes.append("decrypted")
        except SecurityError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(h,)) for h in (holder, second) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["decrypted", "refused", "refused", "refused"]


def test_a_torn_journal_line_is_dropped_and_a_corrupt_one_stops(holder: KeyHolder) -> None:
    silos = ["silo-0", "silo-1", "silo-2"]
    decrypt(holder, contribute(holder.public_context(), round=1, silos=silos), round=1)
    journal = holder.directory / JOURNAL
    with journal.open("a") as handle:
        handle.write('{"run_id": "run-1", "rou')  # a crash in the middle of an append
    assert [r.round for r in KeyHolder.open(holder.directory).decrypted_rounds()] == [1]
    decrypt(holder, contribute(holder.public_context(), round=2, silos=silos), round=2)
    assert [r.round for r in holder.decrypted_rounds()] == [1, 2]
    assert len(journal.read_text().splitlines()) == 2
    with journal.open("a") as handle:
        handle.write("not json\n")
    with pytest.raises(RunError, match="line 3 is corrupt"):
        KeyHolder.open(holder.directory)


def test_a_tampered_aggregate_is_refused_and_does_not_burn_the_round(holder: KeyHolder) -> None:
    contribution = contribute(
        holder.public_context(), round=1, silos=["silo-0", "silo-1", "silo-2"]
    )
    aggregate = contribution.aggregate(holder.public_context())
    altered = bytearray(aggregate.chunks[0])
    altered[10] ^= 0x01
    with pytest.raises(SecurityError, match="not valid"):
        holder.decrypt_aggregate(
            run_id=RUN,
            round=1,
            aggregate=EncryptedVector(aggregate.length, (bytes(altered),)),
            receipts=contribution.receipts_of(),
        )
    decrypt(holder, contribution, round=1)


def test_check_sum_form_takes_a_sum_of_fresh_ciphertexts_only(holder: KeyHolder) -> None:
    public, params = holder.public_context(), holder.policy.params
    slots = params.slot_count
    long = contribute(public, round=1, silos=["silo-0", "silo-1"], length=slots + 1)
    check_sum_form(public, params, long.aggregate(public))
    check_sum_form(public, params, EncryptedVector(0, ()))  # the empty vector: no ciphertext
    first = long.aggregate(public).chunks[:1]
    for length, expected in ((slots + 1, 2), (2**40, 2**28)):  # never allocated nor listed
        with pytest.raises(ProtocolError, match=f"takes {expected} ciphertexts of {slots} slots"):
            check_sum_form(public, params, EncryptedVector(length, first))


def test_csprng_standard_normal() -> None:
    assert csprng_standard_normal(0).shape == (0,)
    draws = csprng_standard_normal(200_000)
    assert abs(draws.mean()) < 0.02 and abs(draws.std() - 1) < 0.02
    assert np.all(np.isfinite(draws))


def test_one_reader_for_every_form_of_a_silo_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "silos.json"
    path.write_text(json.dumps({"a": "00" * 32, "b": {"public": "11" * 32, "private": "22" * 32}}))
    keys = read_silo_keys(path)
    assert (keys["a"].public, keys["a"].private) == (bytes(32), None)
    assert (keys["b"].public, keys["b"].private) == (b"\x11" * 32, b"\x22" * 32)
    for content, message in [
        ("[]", "JSON object"),
        ('{"a": {"private": "00"}}', "no hex public key"),
        ('{"a": "zz"}', "not hex"),
        ('{"a": {"public": "00", "private": 7}}', "no hex public key"),
        ("{", "cannot read"),
    ]:
        path.write_text(content)
        with pytest.raises(ConfigError, match=message):
            read_silo_keys(path)
