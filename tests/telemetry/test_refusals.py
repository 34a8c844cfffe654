"""Refusals: every one counted, the log limited per peer host and window, driven by a fake clock."""

from __future__ import annotations

import logging

import pytest

from shoal.core.errors import ConfigError
from shoal.telemetry.prometheus import CoordinatorMetrics
from shoal.telemetry.refusals import RefusalLog, peer_host

LOGGER = "shoal.test.refusals"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def refusals(clock: Clock, caplog: pytest.LogCaptureFixture) -> RefusalLog:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return RefusalLog(logging.getLogger(LOGGER), lines_per_window=3, window_s=60, clock=clock)


def refuse(refusals: RefusalLog, count: int, *, peer: str = "ipv4:10.0.0.7:5000") -> None:
    for index in range(count):
        refusals.refused(peer=peer, rpc="Probe", reason="malformed", detail=f"number {index}")


def test_no_refusal_no_line(refusals: RefusalLog, caplog: pytest.LogCaptureFixture) -> None:
    refuse(refusals, 0)
    assert lines(caplog) == []


def test_a_flood_logs_a_few_lines_then_says_it_suppresses(
    refusals: RefusalLog, caplog: pytest.LogCaptureFixture
) -> None:
    refuse(refusals, 1000)
    assert lines(caplog) == [
        "Probe from 10.0.0.7 refused: malformed (number 0)",
        "Probe from 10.0.0.7 refused: malformed (number 1)",
        "Probe from 10.0.0.7 refused: malformed (number 2)",
        "suppressing further refusals from 10.0.0.7 for up to 60 s (they are still counted)",
    ]


def test_the_next_window_opens_with_the_count_of_what_was_suppressed(
    refusals: RefusalLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    refuse(refusals, 10)
    clock.now = 59.9
    refuse(refusals, 5)  # still the first window
    assert len(lines(caplog)) == 4
    clock.now = 60.0
    refuse(refusals, 1)
    assert lines(caplog)[4:] == [
        "suppressed 12 more refusals from 10.0.0.7 in 60 s",
        "Probe from 10.0.0.7 refused: malformed (number 0)",
    ]
    clock.now = 1000.0
    refuse(refusals, 1)  # a quiet window suppressed nothing: no summary
    assert lines(caplog)[6:] == ["Probe from 10.0.0.7 refused: malformed (number 0)"]


def test_each_host_has_its_own_limit_whatever_its_port(
    refusals: RefusalLog, caplog: pytest.LogCaptureFixture
) -> None:
    for port in range(100):  # a new connection per request: the same host
        refuse(refusals, 1, peer=f"ipv4:10.0.0.7:{port}")
    refuse(refusals, 1, peer="ipv6:[2001:db8::1]:443")
    assert len(lines(caplog)) == 5
    assert lines(caplog)[-1] == "Probe from 2001:db8::1 refused: malformed (number 0)"


def test_forgotten_peers_are_summarized_and_memory_stays_bounded(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    refusals = RefusalLog(logging.getLogger(LOGGER), lines_per_window=1, max_peers=2, clock=clock)
    refuse(refusals, 3, peer="ipv4:10.0.0.1:1")
    refuse(refusals, 1, peer="ipv4:10.0.0.2:1")
    refuse(refusals, 1, peer="ipv4:10.0.0.3:1")  # 10.0.0.1 is forgotten, its count said
    assert "suppressed 2 more refusals from 10.0.0.1 in 60 s" in lines(caplog)
    assert len(refusals._windows) == 2


def test_every_refusal_is_counted_logged_or_not(refusals: RefusalLog) -> None:
    counter = refusals.counter.labels(rpc="Probe", reason="malformed")
    refuse(refusals, 250)
    assert counter._value.get() == 250


def test_refusals_count_in_the_coordinators_registry(clock: Clock) -> None:
    metrics = CoordinatorMetrics()
    refusals = RefusalLog(logging.getLogger(LOGGER), clock=clock, counter=metrics.refused)
    refuse(refusals, 3)
    labels = {"rpc": "Probe", "reason": "malformed"}
    assert metrics.registry.get_sample_value("shoal_refused_requests_total", labels) == 3
    assert RefusalLog(logging.getLogger(LOGGER)).counter is not metrics.refused  # its own


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:50051", "127.0.0.1"),
        ("ipv6:[::1]:50051", "::1"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
        ("", ""),
    ],
)
def test_peer_hosts(peer: str, host: str) -> None:
    assert peer_host(peer) == host


@pytest.mark.parametrize(
    "arguments",
    [{"lines_per_window": 0}, {"window_s": 0.0}, {"max_peers": 0}, {"window_s": float("nan")}],
)
def test_bad_limits_are_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="must be"):
        RefusalLog(logging.getLogger(LOGGER), **arguments)  # type: ignore[arg-type]
