"""Benchmark of homomorphic (CKKS) aggregation across silos against a plaintext numpy sum.

For K silos of P float32 parameters in [-1, 1]: each silo encrypts its update
under the consortium's public key and signs a receipt of its ciphertext's
sha256 (timed apart, mean per silo); the coordinator adds the K ciphertexts
(``sum_encrypted``: each deserialized once, added in place); the key holder
checks the K receipts, decrypts, floods the result with noise and journals
the round (``KeyHolder.decrypt_aggregate``). The error is reported with and
without that noise (the second from a plain decryption of the same sum). The
baseline is numpy's sum of the same K plaintext vectors, best of
``--repeats``, in the same process. Prints one JSON object.

    python benchmarks/secagg_he.py --silos 10 --params 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from shoal.secure.ckks import CkksParameters, decrypt_vector, encrypt_vector, sum_encrypted
from shoal.secure.keyholder import SECRET_CONTEXT, KeyHolder, sign_receipt
from shoal.transport.signing import generate_client_key

RUN = "benchmark"


def best_seconds(function: Callable[[], object], *, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def measure(*, num_silos: int, num_parameters: int, repeats: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-1, 1, num_parameters).astype(np.float32) for _ in range(num_silos)]
    params = CkksParameters()
    silo_keys = {f"silo-{index}": generate_client_key() for index in range(num_silos)}
    with tempfile.TemporaryDirectory(prefix="shoal-he-bench-") as folder:
        holder = KeyHolder.init(
            folder,
            params=params,
            min_contributors=num_silos,
            silos={silo: public for silo, (_, public) in silo_keys.items()},
        )
        public_context = holder.public_context()

        encrypt_seconds, receipt_seconds, ciphertexts, receipts = [], [], [], []
        for (silo, (private, _)), update in zip(silo_keys.items(), updates, strict=True):
            start = time.perf_counter()
            ciphertext = encrypt_vector(public_context, update)
            encrypt_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            receipts.append(
                sign_receipt(
                    private,
                    run_id=RUN,
                    round=1,
                    silo_id=silo,
                    ciphertext_sha256=ciphertext.sha256(),
                )
            )
            receipt_seconds.append(time.perf_counter() - start)
            ciphertexts.append(ciphertext)

        start = time.perf_counter()
        aggregate = sum_encrypted(public_context, ciphertexts)
        sum_seconds = time.perf_counter() - start

        start = time.perf_counter()
        decrypted = holder.decrypt_aggregate(
            run_id=RUN, round=1, aggregate=aggregate, receipts=receipts
        )
        decrypt_seconds = time.perf_counter() - start
        secret_context = (Path(folder) / SECRET_CONTEXT).read_bytes()
        exact = decrypt_vector(secret_context, aggregate)  # without the flooding noise

    baseline = best_seconds(lambda: np.sum(updates, axis=0, dtype=np.float32), repeats=repeats)
    reference = np.sum([u.astype(np.float64) for u in updates], axis=0)
    ciphertext_bytes = int(np.mean([c.num_bytes for c in ciphertexts]))
    encrypt_mean = float(np.mean(encrypt_seconds))
    return {
        "benchmark": "secagg_he_ckks",
        "num_silos": num_silos,
        "num_parameters": num_parameters,
        "poly_modulus_degree": params.poly_modulus_degree,
        "ciphertexts_per_silo": len(ciphertexts[0].chunks),
        "encrypt_seconds_per_silo": encrypt_mean,
        "receipt_seconds_per_silo": float(np.mean(receipt_seconds)),
        "sum_seconds": sum_seconds,
        "decrypt_seconds": decrypt_seconds,
        "ciphertext_bytes_per_silo": ciphertext_bytes,
        "plaintext_bytes_per_silo": updates[0].nbytes,
        "expansion_ratio": ciphertext_bytes / updates[0].nbytes,
        "numpy_sum_seconds": baseline,
        "sum_ratio_to_numpy": sum_seconds / baseline,
        "end_to_end_seconds": encrypt_mean + sum_seconds + decrypt_seconds,
        "end_to_end_ratio_to_numpy": (encrypt_mean + sum_seconds + decrypt_seconds) / baseline,
        "max_abs_error_vs_plaintext_sum": float(np.max(np.abs(decrypted - reference))),
        "max_abs_ckks_error_without_flooding": float(np.max(np.abs(exact - reference))),
        "decryption_noise_std": holder.policy.decryption_noise_std,
        "cpu_count": os.cpu_count(),
        "repeats": repeats,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7, help="of the numpy baseline; best counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.silos < 2 or args.params < 1 or args.repeats < 1:
        parser.error("--silos must be >= 2, --params and --repeats >= 1")
    row = measure(
        num_silos=args.silos, num_parameters=args.params, repeats=args.repeats, seed=args.seed
    )
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
