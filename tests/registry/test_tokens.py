"""Enrollment tokens on every backend: hashed at rest, bound, expiring, counted, raced, revoked."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shoal.core import NotFoundError, RegistryError, SecurityError
from shoal.registry import Database, EnrollmentTokens, TokenState, token_id_of
from shoal.registry.schema import enrollment_tokens

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


@pytest.fixture
def tokens(database: Database) -> EnrollmentTokens:
    return EnrollmentTokens(database)


def test_an_empty_store(tokens: EnrollmentTokens) -> None:
    assert tokens.list() == []
    with pytest.raises(NotFoundError):
        tokens.get("0" * 16)
    with pytest.raises(NotFoundError):
        tokens.revoke("0" * 16)
    with pytest.raises(SecurityError, match="unknown enrollment token"):
        tokens.redeem("never-issued", client_id="c1", now=NOW)


def test_only_the_hash_is_stored(tokens: EnrollmentTokens, database: Database) -> None:
    token = tokens.issue(expires_in=WEEK, now=NOW)
    assert len(token) == 32  # 24 random bytes, URL-safe base64
    with database.read() as connection:
        rows = connection.execute(sa.select(enrollment_tokens)).all()
    assert len(rows) == 1
    assert all(token not in str(value) for value in rows[0])
    assert rows[0].token_id == token_id_of(token)


def test_tokens_are_distinct(tokens: EnrollmentTokens) -> None:
    issued = {tokens.issue(expires_in=WEEK, now=NOW) for _ in range(20)}
    assert len(issued) == 20
    assert {record.token_id for record in tokens.list()} == {token_id_of(t) for t in issued}


def test_a_single_use_token_enrolls_once(tokens: EnrollmentTokens) -> None:
    token = tokens.issue(expires_in=WEEK, now=NOW)
    redeemed = tokens.redeem(token, client_id="c1", now=NOW + timedelta(hours=1))
    assert (redeemed.uses, redeemed.uses_left) == (1, 0)
    assert redeemed.last_used_by == "c1"
    assert redeemed.last_used_at == NOW + timedelta(hours=1)
    assert redeemed.state(NOW) is TokenState.USED_UP
    with pytest.raises(SecurityError, match=r"used up \(all 1 uses taken\)"):
        tokens.redeem(token, client_id="c2", now=NOW)
    assert tokens.get(redeemed.token_id) == redeemed  # the refusal consumed nothing


def test_a_multi_use_token_counts_down(tokens: EnrollmentTokens) -> None:
    token = tokens.issue(expires_in=WEEK, uses=3, now=NOW)
    left = [tokens.redeem(token, client_id=f"c{i}", now=NOW).uses_left for i in range(3)]
    assert left == [2, 1, 0]
    with pytest.raises(SecurityError, match="used up"):
        tokens.redeem(token, client_id="c3", now=NOW)


def test_a_bound_token_refuses_other_clients(tokens: EnrollmentTokens) -> None:
    token = tokens.issue(client_id="hospital-7", expires_in=WEEK, uses=2, now=NOW)
    with pytest.raises(SecurityError, match="bound to another client id, not 'hospital-8'"):
        tokens.redeem(token, client_id="hospital-8", now=NOW)
    assert tokens.get(token_id_of(token)).uses_left == 2
    assert tokens.redeem(token, client_id="hospital-7", now=NOW).uses_left == 1


def test_a_token_expires(tokens: EnrollmentTokens) -> None:
    token = tokens.issue(expires_in=timedelta(hours=1), uses=5, now=NOW)
    assert tokens.redeem(token, client_id="c1", now=NOW + timedelta(minutes=59)).uses_left == 4
    with pytest.raises(SecurityError, match="expired at 2026-03-20 11:00:00 UTC"):
        tokens.redeem(token, client_id="c2", now=NOW + timedelta(hours=1))  # the end is excluded
    record = tokens.get(token_id_of(token))
    assert record.uses_left == 4
    assert record.state(NOW + timedelta(hours=2)) is TokenState.EXPIRED
    assert record.state(NOW) is TokenState.ACTIVE


def test_a_revoked_token_is_refused(tokens: EnrollmentTokens) -> None:
    token = tokens.issue(expires_in=WEEK, uses=3, now=NOW)
    token_id = token_id_of(token)
    revoked = tokens.revoke(token_id, now=NOW + timedelta(minutes=1))
    assert revoked.revoked_at == NOW + timedelta(minutes=1)
    assert revoked.state(NOW) is TokenState.REVOKED
    assert tokens.revoke(token_id, now=NOW + timedelta(days=1)).revoked_at == revoked.revoked_at
    with pytest.raises(SecurityError, match=f"enrollment token {token_id} was revoked"):
        tokens.redeem(token, client_id="c1", now=NOW + timedelta(minutes=2))
    assert tokens.list() == [revoked]  # kept, for audit


@pytest.mark.parametrize("bad", ["", "x" * 257, "almost" + "A" * 26])
def test_malformed_or_unknown_tokens_are_unknown(tokens: EnrollmentTokens, bad: str) -> None:
    tokens.issue(expires_in=WEEK, now=NOW)
    with pytest.raises(SecurityError, match=r"^unknown enrollment token$"):
        tokens.redeem(bad, client_id="c1", now=NOW)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uses": 0}, "at least one use"),
        ({"uses": -1}, "at least one use"),
        ({"expires_in": timedelta(0)}, "must be positive"),
        ({"expires_in": timedelta(seconds=-1)}, "must be positive"),
        ({"expires_in": timedelta.max}, "too long"),
        ({"client_id": ""}, "1 to 128 characters"),
        ({"client_id": "c" * 129}, "1 to 128 characters"),
    ],
)
def test_bad_issue_arguments_are_refused(
    tokens: EnrollmentTokens, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"expires_in": WEEK, "now": NOW} | kwargs
    with pytest.raises(RegistryError, match=message):
        tokens.issue(**arguments)  # type: ignore[arg-type]
    assert tokens.list() == []


def test_naive_times_are_refused(tokens: EnrollmentTokens) -> None:
    with pytest.raises(RegistryError, match="timezone-aware"):
        tokens.issue(expires_in=WEEK, now=datetime(2026, 1, 1))
    token = tokens.issue(expires_in=WEEK, now=NOW)
    with pytest.raises(RegistryError, match="timezone-aware"):
        tokens.redeem(token, client_id="c1", now=datetime(2026, 1, 1))


@pytest.mark.parametrize(("uses", "racers"), [(1, 8), (3, 8)])
def test_concurrent_redeems_never_exceed_the_uses(
    tokens: EnrollmentTokens, uses: int, racers: int
) -> None:
    token = tokens.issue(expires_in=WEEK, uses=uses, now=NOW)
    start = threading.Barrier(racers)
    winners: list[str] = []
    refusals: list[str] = []
    others: list[BaseException] = []

    def race(client_id: str) -> None:
        start.wait()
        try:
            tokens.redeem(token, client_id=client_id, now=NOW)
            winners.append(client_id)
        except SecurityError as exc:
            refusals.append(str(exc))
        except BaseException as exc:  # pragma: no cover - reported below
            others.append(exc)

    threads = [threading.Thread(target=race, args=(f"c{i}",)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert others == []
    assert len(winners) == uses
    assert len(refusals) == racers - uses
    assert all("used up" in message for message in refusals)
    record = tokens.get(token_id_of(token))
    assert record.uses_left == 0
    assert record.last_used_by in winners
