"""Benchmark of signed models: what signing costs a commit, and what verifying costs a client.

For a model of ``--parameters`` float32 values (1,000,000 by default):

- ``commit``: the best time of ``ModelRegistry.commit`` with the
  coordinator's signer against the same commit unsigned (the baseline): a
  version is signed once, when it is committed, never per request;
- ``verify``: a client that pins the key, per downloaded model: the
  signature check, then the download decoded and checked against the
  signed sha256, against the decoding alone, which every client does
  anyway (the baseline).

Prints one JSON object per measurement.

    python benchmarks/model_signing.py --parameters 1000000 --repeats 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shoal.core.parameters import Parameters
from shoal.governance import ModelSigner, PinnedKey, generate_signing_key
from shoal.registry import BlobStore, ModelRegistry, open_database
from shoal.transport.chunks import decode_parameters


def best_ms(
    baseline: Callable[[], object], measured: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """The best time of each, in milliseconds, the two run alternately (so that load on the
    machine falls on both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, kept in ((baseline, times[0]), (measured, times[1])):
            started = time.perf_counter()
            run()
            kept.append(time.perf_counter() - started)
    return min(times[0]) * 1e3, min(times[1]) * 1e3


def steady_round_s(rows: Sequence[Mapping[str, Any]]) -> float:
    """The median seconds a fit round took over the second half of a run's rows."""
    walls = [row["wall_time_s"] for row in rows if row["phase"] == "fit"]
    steps = np.diff([0.0, *walls])
    return float(statistics.median(steps[len(steps) // 2 :]))


def paired_rounds(
    pairs: Sequence[tuple[float, float]], *, baseline: str, measured: str
) -> dict[str, Any]:
    """Turns' (baseline, measured) seconds a round: each one's median in milliseconds, the
    median of the turns' ratios, and every turn's."""
    ratios = [measured_s / baseline_s for baseline_s, measured_s in pairs]
    return {
        f"{baseline}_round_ms": round(statistics.median(p[0] for p in pairs) * 1e3, 2),
        f"{measured}_round_ms": round(statistics.median(p[1] for p in pairs) * 1e3, 2),
        "ratio": round(statistics.median(ratios), 3),
        "pairs": [round(ratio, 3) for ratio in ratios],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parameters", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    model = Parameters.from_arrays(
        [rng.standard_normal(args.parameters).astype(np.float32)], names=["w"]
    )
    key = generate_signing_key()
    signer = ModelSigner(key, run_id="bench")
    pinned = PinnedKey.of(key.public_key())
    with tempfile.TemporaryDirectory() as folder:
        database = open_database(None, folder=Path(folder) / "registry")
        registry = ModelRegistry(database, BlobStore(Path(folder) / "blobs"))
        try:
            rounds = iter(range(10**9))

            def commit(sign: bool) -> None:
                registry.commit(
                    "bench",
                    model.with_vector(model.vector + 1e-3 * next(rounds)),
                    round=0,
                    architecture_version="v",
                    signer=signer if sign else None,
                )

            unsigned, signed = best_ms(lambda: commit(False), lambda: commit(True), args.repeats)
            head = registry.head("bench")
        finally:
            database.close()
    assert head is not None and head.signed is not None
    sha256 = model.sha256()  # the task's, known before the download
    facts = {"name": "bench", "version": 0, "round": 0}
    _, sign = best_ms(lambda: None, lambda: signer(sha256=sha256, **facts), args.repeats)
    print(
        json.dumps(
            {
                "benchmark": "commit",
                "parameters": args.parameters,
                "unsigned_ms": round(unsigned, 3),
                "signed_ms": round(signed, 3),
                "ratio_signed_to_unsigned": round(signed / unsigned, 3),
                "signing_alone_ms": round(sign, 4),
                "signing_share_of_a_commit": round(sign / unsigned, 5),
            }
        )
    )
    payload = model.to_bytes()
    signature = signer(sha256=sha256, **facts)

    def verify() -> None:  # what a client that pins the key does per download
        pinned.verify(signature, sha256=sha256, **facts)
        decode_parameters(payload, expected_sha256=sha256)  # as the link does

    decode, verified = best_ms(
        lambda: decode_parameters(payload, expected_sha256=sha256), verify, args.repeats
    )
    _, signature_only = best_ms(
        lambda: None, lambda: pinned.verify(signature, sha256=sha256, **facts), args.repeats
    )
    print(
        json.dumps(
            {
                "benchmark": "verify",
                "parameters": args.parameters,
                "decode_ms": round(decode, 3),
                "decode_and_verify_ms": round(verified, 3),
                "signature_check_ms": round(signature_only, 3),
                "ratio_verified_to_decode": round(verified / decode, 3),
                "signature_share_of_a_decode": round(signature_only / decode, 5),
            }
        )
    )


if __name__ == "__main__":
    main()
