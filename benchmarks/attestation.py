"""Benchmark of client attestation: what a check-in costs with the built-in manifest evidence.

A coordinator is built from a job (the built-in app, a state folder in a
temporary directory) and one client enrolled in it. Then, for ``--check-ins``
check-ins each, the same check-in goes through the real service handler
(``CoordinatorService.CheckIn``, called in process: no socket, so that the
figure is the work, not the network):

- ``plain``: the baseline, a coordinator without attestation, the request
  encoded and signed as the gRPC link does it;
- ``attested``: a coordinator with ``attestation = "manifest"``, the request
  carrying manifest evidence made for it (the client measures its installed
  code again, with its stat cache, and the coordinator verifies the release
  signature, compares the digests and reads the allow-list).

It also reports the parts: the client's evidence alone, the gate's check
alone, and the first (uncached) measurement of the Shoal package. Prints one
JSON object per measurement.

    python benchmarks/attestation.py --check-ins 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shoal.config import parse_config
from shoal.coordinator.server import CoordinatorParts, build
from shoal.core.device import DeviceState
from shoal.governance import (
    Binding,
    CodeMeasurer,
    Evidence,
    ManifestAttester,
    generate_release_key,
    load_release_private_key,
    release_statement,
    sign_manifest,
)
from shoal.registry import AllowedBuilds
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.signing import generate_client_key, new_nonce

APP = "shoal.apps.builtin:client_app"
RUN = "run-bench"


class _Context:
    """The one thing the service asks of a gRPC context: who the peer is (for refusals)."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def job(folder: Path, *, attested: bool) -> CoordinatorParts:
    coordinator: dict[str, Any] = {
        "run_id": RUN,
        "state_dir": str(folder / ("attested" if attested else "plain")),
        "enrollment_tokens": ["bench"],
    }
    if attested:
        coordinator |= {"attestation": "manifest", "release_keys": [str(folder / "r.pub")]}
    config = parse_config(
        {"data": {"num_clients": 10}, "round": {"clients_per_round": 2}, "coordinator": coordinator}
    )
    return build(config)


def check_in(
    private_key: bytes, public_key: bytes, client_id: str, attester: ManifestAttester | None
) -> bytes:
    """A check-in's bytes as the gRPC link makes them (evidence first, then the signature)."""
    message = serde.encode_check_in_request(DeviceState())
    nonce = new_nonce()
    if attester is not None:
        binding = Binding(client_id, public_key, RUN, nonce)
        serde.set_evidence(message, Evidence("manifest", attester.evidence(binding.challenge())))
    serde.sign_message(
        message,
        private_key,
        client_id=client_id,
        run_id=RUN,
        round=-1,
        timestamp=time.time(),
        nonce=nonce,
    )
    return message.SerializeToString()


def median_us(run: Callable[[], object], count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def client_on(parts: CoordinatorParts, attester: ManifestAttester | None) -> Callable[[], object]:
    """One check-in of a client enrolled in ``parts``: made, signed, served."""
    private, public = generate_client_key()
    client_id = f"client-{'attested' if attester else 'plain'}"
    parts.clients.enroll(client_id, DeviceState(), public_key=public)
    context: Any = _Context()
    loop = asyncio.new_event_loop()

    async def one() -> None:
        request = check_in(private, public, client_id, attester)
        response: pb.CheckInResponse = await parts.service.CheckIn(request, context)
        assert response.WhichOneof("outcome") == "retry_after", response

    return lambda: loop.run_until_complete(one())


def interleaved_us(runs: Sequence[Callable[[], object]], count: int) -> list[float]:
    """The median time of each run, the runs taking turns (load on the machine hits each alike)."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(count):
        for run, spent in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) * 1e6 for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-ins", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-attest-bench-") as name:
        folder = Path(name)
        generate_release_key(folder / "r.key", folder / "r.pub")
        started = time.perf_counter()
        statement = release_statement(APP)
        cold_ms = (time.perf_counter() - started) * 1e3
        manifest = sign_manifest(statement, load_release_private_key(folder / "r.key"))
        attester = ManifestAttester(manifest, app_spec=APP, measurer=CodeMeasurer())
        plain, attested = job(folder, attested=False), job(folder, attested=True)
        try:
            AllowedBuilds(attested.database).allow(
                build_id=manifest.manifest_id, kind="manifest", by="bench", reason="benchmark"
            )
            files = statement.components["shoal"].files
            print(json.dumps({"benchmark": "attestation", "what": "first_measurement",
                              "files": files, "ms": round(cold_ms, 2)}))  # fmt: skip
            binding = Binding("c", b"k" * 32, RUN, b"n" * 16)
            evidence_us = median_us(lambda: attester.evidence(binding.challenge()), args.check_ins)
            data = attester.evidence(binding.challenge())
            gate = attested.service.admission.attestation
            assert gate is not None
            gate_us = median_us(lambda: gate.check(Evidence("manifest", data), binding), 500)
            print(json.dumps({"benchmark": "attestation", "what": "parts",
                              "client_evidence_us": round(evidence_us, 1),
                              "evidence_bytes": len(data),
                              "coordinator_check_us": round(gate_us, 1)}))  # fmt: skip
            plain_us, attested_us = interleaved_us(
                [client_on(plain, None), client_on(attested, attester)], args.check_ins
            )
            print(json.dumps({"benchmark": "attestation", "what": "check_in",
                              "check_ins": args.check_ins,
                              "plain_us": round(plain_us, 1),
                              "attested_us": round(attested_us, 1),
                              "ratio": round(attested_us / plain_us, 2)}))  # fmt: skip
        finally:
            plain.close()
            attested.close()


if __name__ == "__main__":
    main()
