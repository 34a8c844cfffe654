"""Compressed uploads to a served coordinator over real gRPC: honest clients, and clients that
send what a codec's decoder must refuse.

The clients are :class:`ClientRuntime` s over real channels on 127.0.0.1; each link records
what went up and the coordinator's answer. A hostile client changes its upload on the link,
after its runtime made it (and signs what it sends: the coordinator knows who sent it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.client.link import Submitted, SubmitUpdate
from shoal.config import Config, parse_config
from shoal.coordinator import service
from shoal.core.compression import Compression, decode, encode
from shoal.tasks import RejectReason, RejectSubmission
from shoal.transport.grpc_link import GrpcLink
from support.jobs import network_job, serve_to_digits_clients

pytestmark = pytest.mark.timeout(180)

TOKEN = "compressed-uploads"
Tamper = Callable[[SubmitUpdate], SubmitUpdate]


class RecordingLink(GrpcLink):
    """A real gRPC link that keeps each upload it sent (changed by ``tamper`` first) and the
    coordinator's answer to it."""

    def __init__(self, *args: Any, tamper: Tamper | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper
        self.sent: list[tuple[SubmitUpdate, Submitted]] = []

    async def _submit_update(self, enrollment: Any, request: SubmitUpdate) -> Submitted:
        if self.tamper is not None:
            request = self.tamper(request)
        answer = await super()._submit_update(enrollment, request)
        self.sent.append((request, answer))
        return answer


def job(tmp_path: Path, *, clients: int, compression: dict[str, Any], rounds: int = 2) -> Config:
    """``clients`` all in each round; with three, a refused one's round closes at a short
    deadline with the other two (an upload refused before it is decoded leaves its client in
    the cohort: it may send again)."""
    honest = clients < 3
    return parse_config(
        network_job(
            tmp_path,
            run_id="squeezed",
            token=TOKEN,
            clients=clients,
            per_round=clients,
            run={"name": "squeezed", "rounds": rounds},
            round={"deadline_s": 60.0 if honest else 4.0, "quorum": 1.0 if honest else 0.6},
            evaluation={"every": rounds if honest else 0, "clients": clients},
            compression=compression,
        )
    )


def serve_recording(
    tmp_path: Path, config: Config, *, clients: int, tamper: dict[int, Tamper] | None = None
) -> tuple[list[dict[str, Any]], list[RecordingLink]]:
    """The rows of ``config`` served to ``clients`` digits clients, and their links;
    ``tamper[i]`` changes client ``i``'s uploads."""
    rows: list[dict[str, Any]] = []
    links: list[RecordingLink] = []

    def link_of(index: int, address: str) -> RecordingLink:
        link = RecordingLink(
            address, credentials=None, enrollment_token=TOKEN, tamper=(tamper or {}).get(index)
        )
        links.append(link)
        return link

    asyncio.run(
        serve_to_digits_clients(
            tmp_path,
            config,
            clients=clients,
            token=TOKEN,
            on_round=rows.append,
            link_of=link_of,
            timeout_s=120,
        )
    )
    return rows, links


@pytest.mark.parametrize("compression", [{"kind": "int8"}, {"kind": "topk", "fraction": 0.1}])
def test_served_clients_upload_their_updates_compressed_and_the_run_trains(
    tmp_path: Path, compression: dict[str, Any]
) -> None:
    config = job(tmp_path, clients=2, compression=compression)
    rows, links = serve_recording(tmp_path, config, clients=2)
    fits = [row for row in rows if row["phase"] == "fit"]
    assert [row["round"] for row in fits] == [1, 2] and all(row["committed"] for row in fits)
    spec = config.compression.codec().spec
    uploads = [request for link in links for request, answer in link.sent if answer is None]
    assert len(uploads) == 4 and all(request.codec == spec for request in uploads)
    assert all(request.payload is not None for request in uploads)
    dense = len(uploads[0].update.to_bytes())
    for row in fits:  # the row counts the bytes that went up, not the model's size
        sizes = [
            len(request.payload or b"")
            for link in links
            for request, _ in link.sent
            if request.offer.round == row["round"]
        ]
        assert row["bytes_up"] == sum(sizes) < len(sizes) * dense / 3
    summary = json.loads((tmp_path / "state" / "summary.json").read_text())
    assert summary["final_federated_accuracy"] > 0.5  # two rounds of digits, compressed


def recompressed(compression: Compression) -> Tamper:
    """Uploads re-encoded with another codec than the task asked for."""

    def tamper(request: SubmitUpdate) -> SubmitUpdate:
        payload = encode(request.update.vector, compression, rng=np.random.default_rng(0))
        return dataclasses.replace(request, payload=payload, codec=compression.spec)

    return tamper


def garbled(request: SubmitUpdate) -> SubmitUpdate:
    """The payload's codec as asked, its bytes cut short (the link hashes what it sends)."""
    assert request.payload is not None
    return dataclasses.replace(request, payload=request.payload[:-7])


HOSTILE = {
    "another codec": (recompressed(Compression("int8")), "invalid_update", "this run takes"),
    "a wider top-k": (
        recompressed(Compression("topk", 0.5)),
        "invalid_update",
        "this run takes topk:0.1",
    ),
    "a top-k wider than its spec says": (
        lambda request: dataclasses.replace(
            recompressed(Compression("topk", 0.5))(request), codec="topk:0.1"
        ),
        "malformed",
        "the task allows",
    ),
    "cut short": (garbled, "malformed", "bytes"),
}


def refusals(link: RecordingLink) -> list[RejectSubmission]:
    """The answers to a hostile client's uploads, none accepted, that judged the upload: it
    is asked again until the round closes, and one sent as it closed is refused for that
    (LATE after the run's end, WRONG_MODEL_HASH once the next model is out)."""
    answers = [answer for _, answer in link.sent]
    assert all(isinstance(answer, RejectSubmission) for answer in answers), answers
    return [
        a
        for a in answers
        if a is not None
        and a.reason is not RejectReason.LATE
        and not a.detail.startswith("wrong_model_hash:")
    ]


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_an_upload_its_codec_cannot_decode_is_refused_and_the_round_commits_without_it(
    tmp_path: Path, attack: str
) -> None:
    tamper, code, detail = HOSTILE[attack]
    config = job(tmp_path, clients=3, compression={"kind": "topk", "fraction": 0.1}, rounds=1)
    rows, links = serve_recording(tmp_path, config, clients=3, tamper={0: tamper})
    answers = refusals(links[0])
    assert answers and all(answer.detail.startswith(f"{code}: ") for answer in answers), answers
    assert all(detail in answer.detail for answer in answers), answers
    [fit] = [row for row in rows if row["phase"] == "fit"]
    assert fit["committed"] and fit["reported"] == 2  # the honest two counted
    honest = [request for link in links[1:] for request, answer in link.sent if answer is None]
    assert len(honest) == 2


def test_a_compressed_upload_to_a_run_that_asks_for_none_is_refused(tmp_path: Path) -> None:
    config = job(tmp_path, clients=3, compression={"kind": "none"}, rounds=1)
    tamper = {0: recompressed(Compression("ternary"))}
    rows, links = serve_recording(tmp_path, config, clients=3, tamper=tamper)
    answers = refusals(links[0])
    assert answers and all("this run takes safetensors only" in a.detail for a in answers)
    [fit] = [row for row in rows if row["phase"] == "fit"]
    assert fit["committed"] and fit["reported"] == 2
    assert all(request.codec == "" for link in links[1:] for request, _ in link.sent)


def test_uploads_are_decoded_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode holds the thread it runs on: on the loop, every other call would wait."""
    threads: list[str] = []

    def decode_where(payload: bytes, compression: Compression, *, size: int) -> Any:
        threads.append(threading.current_thread().name)
        return decode(payload, compression, size=size)

    monkeypatch.setattr(service, "decode", decode_where)
    config = job(tmp_path, clients=2, compression={"kind": "int8"}, rounds=1)
    rows, _ = serve_recording(tmp_path, config, clients=2)
    assert rows[0]["committed"] and len(threads) == 2
    assert threading.main_thread().name not in threads
