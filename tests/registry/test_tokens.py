"""Enrollment tokens on every backend: hashed at rest, bound, expiring, counted, raced, revoked."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from shoal.core import NotFoundError, RegistryError, SecurityError
from shoal.registry import (
    Database,
    EnrollmentTokens,
    ListedToken,
    TokenOrigin,
    TokenState,
    open_database,
    token_id_of,
)
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


def test_checking_a_token_says_what_redeeming_would_and_uses_nothing(
    tokens: EnrollmentTokens,
) -> None:
    """What an enrollment asks before it remembers a request: the same refusals as a
    redemption, reason for reason, and not one use taken."""
    bound = tokens.issue(client_id="hospital-7", expires_in=timedelta(hours=1), now=NOW)
    revoked = tokens.issue(expires_in=WEEK, now=NOW)
    tokens.revoke(token_id_of(revoked), now=NOW)
    cases = [
        ("never-issued", "hospital-7", NOW),
        (bound, "hospital-8", NOW),
        (bound, "hospital-7", NOW + timedelta(hours=1)),
        (revoked, "hospital-7", NOW),
    ]
    for token, client_id, when in cases:
        with pytest.raises(SecurityError) as checked:
            tokens.check(token, client_id=client_id, now=when)
        with pytest.raises(SecurityError) as redeemed:
            tokens.redeem(token, client_id=client_id, now=when)
        assert str(checked.value) == str(redeemed.value)
    for _ in range(3):
        tokens.check(bound, client_id="hospital-7", now=NOW)
    assert tokens.get(token_id_of(bound)).uses_left == 1
    tokens.redeem(bound, client_id="hospital-7", now=NOW)
    with pytest.raises(SecurityError, match="used up"):
        tokens.check(bound, client_id="hospital-7", now=NOW)


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
        ({"client_id": ""}, "a client id is 1 to 128 ASCII"),
        ({"client_id": "c" * 129}, "a client id is 1 to 128 ASCII"),
        ({"client_id": "../../etc/passwd"}, "a client id is 1 to 128 ASCII"),
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


# --- tokens listed in the coordinator's config ---------------------------------------------


def listed(token: str = "config-secret", **limits: Any) -> ListedToken:
    return ListedToken(token=token, **limits)


def test_no_listed_tokens_store_nothing(tokens: EnrollmentTokens) -> None:
    assert tokens.sync_listed([], now=NOW) == []
    assert tokens.list() == []


def test_a_listed_token_is_stored_hashed_with_the_default_limits(
    tokens: EnrollmentTokens, database: Database
) -> None:
    (record,) = tokens.sync_listed([listed()], now=NOW)
    assert (record.origin, record.uses, record.uses_left) == (TokenOrigin.CONFIG, 100, 100)
    assert record.expires_at == NOW + timedelta(days=7)
    assert record.token_id == token_id_of("config-secret")
    with database.read() as connection:
        row = connection.execute(sa.select(enrollment_tokens)).one()
    assert all("config-secret" not in str(value) for value in row)


def test_the_use_after_max_uses_is_refused(tokens: EnrollmentTokens) -> None:
    tokens.sync_listed([listed(max_uses=3)], now=NOW)
    for index in range(3):
        tokens.redeem("config-secret", client_id=f"c{index}", now=NOW)
    with pytest.raises(SecurityError, match=r"used up \(all 3 uses taken\)"):
        tokens.redeem("config-secret", client_id="c3", now=NOW)


def test_a_listed_token_expires_after_its_ttl_or_at_its_date(tokens: EnrollmentTokens) -> None:
    fixed = NOW + timedelta(hours=5)
    tokens.sync_listed(
        [listed("short", ttl=timedelta(hours=1)), listed("dated", expires_at=fixed)], now=NOW
    )
    tokens.redeem("short", client_id="c1", now=NOW + timedelta(minutes=59))
    with pytest.raises(SecurityError, match="expired at 2026-03-20 11:00:00 UTC"):
        tokens.redeem("short", client_id="c2", now=NOW + timedelta(hours=1))
    tokens.redeem("dated", client_id="c3", now=fixed - timedelta(seconds=1))
    with pytest.raises(SecurityError, match="expired at 2026-03-20 15:00:00 UTC"):
        tokens.redeem("dated", client_id="c4", now=fixed)


def test_a_restart_keeps_the_uses_taken_and_the_first_listing_time(
    tokens: EnrollmentTokens,
) -> None:
    tokens.sync_listed([listed(max_uses=3)], now=NOW)
    tokens.redeem("config-secret", client_id="c1", now=NOW)
    tokens.redeem("config-secret", client_id="c2", now=NOW)
    later = NOW + timedelta(days=3)
    (record,) = tokens.sync_listed([listed(max_uses=3)], now=later)  # a restart
    assert (record.uses_left, record.expires_at) == (1, NOW + timedelta(days=7))
    (record,) = tokens.sync_listed([listed(max_uses=10, ttl=timedelta(days=1))], now=later)
    assert (record.uses, record.uses_left) == (10, 8)  # the config raised the limit
    assert record.state(later) is TokenState.EXPIRED  # and its ttl ran from the first listing
    (record,) = tokens.sync_listed([listed(max_uses=1)], now=NOW)
    assert record.uses_left == 0  # lowered below what was taken: used up, never negative


def test_a_token_no_longer_listed_stops_working_and_comes_back_when_listed(
    tokens: EnrollmentTokens,
) -> None:
    tokens.sync_listed([listed("old"), listed("kept")], now=NOW)
    later = NOW + timedelta(hours=1)
    tokens.sync_listed([listed("kept")], now=later)
    with pytest.raises(SecurityError, match="expired at 2026-03-20 11:00:00 UTC"):
        tokens.redeem("old", client_id="c1", now=later)
    tokens.redeem("kept", client_id="c1", now=later)
    tokens.sync_listed([listed("old"), listed("kept")], now=later)
    tokens.redeem("old", client_id="c2", now=later)


def test_issued_tokens_are_left_alone_and_their_secret_cannot_be_listed(
    tokens: EnrollmentTokens,
) -> None:
    issued = tokens.issue(expires_in=WEEK, now=NOW)
    tokens.sync_listed([], now=NOW)
    assert tokens.get(token_id_of(issued)).state(NOW) is TokenState.ACTIVE
    with pytest.raises(RegistryError, match="lists the secret of issued token"):
        tokens.sync_listed([listed(issued)], now=NOW)
    with pytest.raises(RegistryError, match="the same token twice"):
        tokens.sync_listed([listed("a"), listed("a", max_uses=5)], now=NOW)
    assert [record.origin for record in tokens.list()] == [TokenOrigin.ISSUED]


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"token": ""}, "1 to 256 characters"),
        ({"token": "x" * 257}, "1 to 256 characters"),
        ({"max_uses": 0}, "at least one use"),
        ({"ttl": timedelta(0)}, "must be positive"),
        ({"expires_at": datetime(2026, 1, 1)}, "timezone-aware"),
    ],
)
def test_bad_listed_tokens_are_refused(limits: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        ListedToken(**({"token": "t"} | limits))


def test_the_secret_of_a_listed_token_is_not_in_its_repr() -> None:
    assert "hunter2" not in repr(listed("hunter2"))


@pytest.mark.parametrize(("uses", "racers"), [(1, 8), (3, 8)])
def test_concurrent_enrollments_never_exceed_a_listed_tokens_uses(
    tokens: EnrollmentTokens, database_url: str, uses: int, racers: int
) -> None:
    """Racers on one registry, each through its own engine, as coordinators sharing it would."""
    tokens.sync_listed([listed(max_uses=uses)], now=NOW)
    engines = [open_database(database_url) for _ in range(racers)]
    start = threading.Barrier(racers)
    winners: list[str] = []
    refusals: list[str] = []

    def race(client_id: str, database: Database) -> None:
        start.wait()
        try:
            EnrollmentTokens(database).redeem("config-secret", client_id=client_id, now=NOW)
            winners.append(client_id)
        except SecurityError as exc:
            refusals.append(str(exc))

    threads = [
        threading.Thread(target=race, args=(f"c{index}", engine))
        for index, engine in enumerate(engines)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for engine in engines:
            engine.close()
    assert len(winners) == uses
    assert len(refusals) == racers - uses
    assert all("used up" in message for message in refusals)
    assert tokens.get(token_id_of("config-secret")).uses_left == 0
