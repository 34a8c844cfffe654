"""The attestation allow-list on every backend: who, when and why; prefixes; revocation is final."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from shoal.core import NotFoundError, RegistryError
from shoal.registry import AllowedBuilds, BuildState, Database

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
BUILD = "3f" * 32  # a manifest's sha256
OTHER = "3f" * 4 + "00" * 28  # shares its first 8 characters with BUILD


@pytest.fixture
def builds(database: Database) -> AllowedBuilds:
    return AllowedBuilds(database)


def test_an_empty_list(builds: AllowedBuilds) -> None:
    assert builds.list() == []
    assert builds.get(BUILD) is None
    with pytest.raises(NotFoundError, match="no allowed build"):
        builds.find(BUILD)
    with pytest.raises(NotFoundError, match="no allowed build"):
        builds.revoke(BUILD, by="ana", reason="r")


def test_allowing_keeps_who_when_and_why_and_the_first_decision_stands(
    builds: AllowedBuilds,
) -> None:
    entry = builds.allow(
        build_id=BUILD, kind="manifest", label="v1", by="ana", reason="QA passed", now=NOW
    )
    assert (entry.build_id, entry.kind, entry.label, entry.state) == (
        BUILD,
        "manifest",
        "v1",
        BuildState.ALLOWED,
    )
    assert (entry.allowed_by, entry.allowed_at, entry.allowed_reason) == ("ana", NOW, "QA passed")
    again = builds.allow(
        build_id=BUILD, kind="manifest", by="bo", reason="again", now=NOW + timedelta(hours=1)
    )
    assert again == entry
    assert builds.list() == [entry]
    assert builds.get(BUILD) == entry


def test_a_revocation_is_final_and_keeps_its_first_reason(builds: AllowedBuilds) -> None:
    builds.allow(build_id=BUILD, kind="manifest", by="ana", reason="QA", now=NOW)
    later = NOW + timedelta(days=1)
    revoked = builds.revoke(BUILD[:12], by="bo", reason="CVE-2026-1", now=later)
    assert revoked.state is BuildState.REVOKED
    assert (revoked.revoked_by, revoked.revoked_at, revoked.revoked_reason) == (
        "bo",
        later,
        "CVE-2026-1",
    )
    assert revoked.allowed_by == "ana"
    twice = builds.revoke(BUILD, by="cy", reason="again", now=later + timedelta(days=1))
    assert twice == revoked
    with pytest.raises(RegistryError, match="revocation is final"):
        builds.allow(build_id=BUILD, kind="manifest", by="ana", reason="oops")
    assert builds.get(BUILD) == revoked


def test_a_prefix_names_one_build_and_is_long_enough(builds: AllowedBuilds) -> None:
    for build_id, moment in ((BUILD, NOW), (OTHER, NOW + timedelta(seconds=1))):
        builds.allow(build_id=build_id, kind="manifest", by="ana", reason="QA", now=moment)
    assert [entry.build_id for entry in builds.list()] == [BUILD, OTHER]
    assert builds.find(BUILD[:10]).build_id == BUILD
    with pytest.raises(NotFoundError, match="more than one build"):
        builds.find("3f3f3f3f")
    with pytest.raises(NotFoundError, match="at least 8 characters"):
        builds.find("3f3f")
    with pytest.raises(NotFoundError, match="no allowed build"):
        builds.find("3f3f3f3f3f3f00")
    # LIKE's wildcards are plain characters in a prefix
    with pytest.raises(NotFoundError):
        builds.find("3f3f3f3f_")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"build_id": ""}, "not a build id"),
        ({"build_id": "x" * 129}, "not a build id"),
        ({"build_id": "a b"}, "not a build id"),
        ({"by": " "}, "who decided"),
        ({"by": "x" * 129}, "who decided"),
        ({"reason": ""}, "a reason"),
        ({"reason": "two\nlines"}, "a reason"),
        ({"kind": ""}, "kind"),
    ],
)
def test_a_bad_entry_is_refused_and_nothing_is_stored(
    builds: AllowedBuilds, fields: dict[str, str], message: str
) -> None:
    entry = {"build_id": BUILD, "kind": "manifest", "by": "ana", "reason": "QA"} | fields
    with pytest.raises(RegistryError, match=message):
        builds.allow(**entry)
    assert builds.list() == []


def test_a_naive_time_is_refused(builds: AllowedBuilds) -> None:
    with pytest.raises(RegistryError):
        builds.allow(build_id=BUILD, kind="manifest", by="a", reason="r", now=datetime(2026, 1, 1))


def test_concurrent_allows_of_one_build_store_one_entry(builds: AllowedBuilds) -> None:
    errors: list[BaseException] = []

    def allow(index: int) -> None:
        try:
            builds.allow(build_id=BUILD, kind="manifest", by=f"op{index}", reason="QA")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=allow, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(builds.list()) == 1
