"""Benchmark of compressed uploads: what each codec saves on the wire, what it costs in
accuracy, and what encoding and decoding cost against the uncompressed upload.

- ``training``: the same job (``--config``, the embedded default unless given) simulated
  once with full uploads (the baseline) and once with each codec, in this run: bytes
  uploaded per fit round, and the final accuracy, each as a ratio to the baseline's;
- ``codec``: for an update of ``--parameters`` float32 values, the best time a client takes
  to encode it and the coordinator to decode it, against serializing it as safetensors and
  parsing that (the baseline: what an uncompressed upload costs both sides), the two timed
  alternately.

Prints one JSON object per measurement.

    python benchmarks/compression.py --rounds 20 --parameters 1000000 --repeats 15
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from benchmarks.model_signing import best_ms
from shoal.config import load_config
from shoal.core.compression import Compression, decode, encode
from shoal.core.parameters import Parameters
from shoal.simulation.runner import Simulation
from shoal.transport.chunks import decode_parameters

CODECS = (
    Compression("int8"),
    Compression("ternary"),
    Compression("topk", 0.1),
    Compression("topk", 0.01),
)


def simulated(config_path: str | None, rounds: int, codec: Compression) -> dict[str, Any]:
    """The run's summary and its fit rounds' mean upload bytes, with ``codec``."""
    overrides = [f"run.rounds={rounds}", f"compression.kind='{codec.kind}'"]
    if codec.kind == "topk":
        overrides.append(f"compression.fraction={codec.fraction}")
    with tempfile.TemporaryDirectory() as folder:
        summary = Simulation(load_config(config_path, overrides), Path(folder) / "run").run()
        rows = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").open()]
    fits = [row for row in rows if row["phase"] == "fit"]
    return {
        "accuracy": summary["final_accuracy"],
        "bytes_up_per_round": sum(row["bytes_up"] for row in fits) / len(fits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a job file (unset: the default job)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--parameters", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    dense = simulated(args.config, args.rounds, Compression())
    for codec in CODECS:
        run = simulated(args.config, args.rounds, codec)
        record = {
            "benchmark": "compression_training",
            "codec": codec.spec,
            "rounds": args.rounds,
            "bytes_up_per_round": run["bytes_up_per_round"],
            "bytes_up_per_round_uncompressed": dense["bytes_up_per_round"],
            "bytes_ratio": round(run["bytes_up_per_round"] / dense["bytes_up_per_round"], 4),
            "accuracy": run["accuracy"],
            "accuracy_uncompressed": dense["accuracy"],
            "accuracy_ratio": round(run["accuracy"] / dense["accuracy"], 4),
        }
        print(json.dumps(record), flush=True)
    rng = np.random.default_rng(0)
    update = rng.standard_normal(args.parameters).astype(np.float32)
    model = Parameters.from_arrays([update], names=["w"])
    for codec in CODECS:
        payload = encode(update, codec, rng=rng)
        uncompressed = model.to_bytes(content_sha256=False)

        def compressed(codec: Compression = codec) -> object:
            return decode(encode(update, codec, rng=rng), codec, size=len(update))

        baseline_ms, codec_ms = best_ms(
            lambda: decode_parameters(model.to_bytes(content_sha256=False)),
            compressed,
            args.repeats,
        )
        record = {
            "benchmark": "compression_codec",
            "codec": codec.spec,
            "parameters": args.parameters,
            "payload_bytes": len(payload),
            "uncompressed_bytes": len(uncompressed),
            "size_ratio": round(len(payload) / len(uncompressed), 5),
            "encode_and_decode_ms": round(codec_ms, 3),
            "safetensors_round_trip_ms": round(baseline_ms, 3),
            "time_ratio": round(codec_ms / baseline_ms, 3),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
