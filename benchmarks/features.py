"""Benchmark of portable feature modules: what computing features in the WebAssembly sandbox
costs against the same features in NumPy.

- ``extract``: ``examples/portable-features/features.wat`` through
  :meth:`shoal.features.FeatureModule.extract` on ``--records`` records, against the
  example's NumPy reference (``reference.py``, vectorized float64) on the same records: the
  best time of each, the two run alternately; records per second each;
- ``batch``: a module that copies its input, one record a call against 4,096 a call: what
  a batch costs the host (a fresh instance, the allocation, two calls) before any work;
- ``training``: the example job simulated with its clients' and the server's features from
  the module, against the same job whose app computes them with the NumPy reference, the
  two runs taking turns in this process, ``--pairs`` times: seconds per round (the median of
  each run's second half), and the median of the pairs' ratios.

Prints one JSON object per measurement.

    python benchmarks/features.py --records 100000 --repeats 7 --rounds 20 --pairs 5
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from benchmarks.model_signing import best_ms, paired_rounds, steady_round_s
from shoal.client.app import ClientContext
from shoal.coordinator.app import ServerContext
from shoal.features import FeatureManifest, FeatureModule, with_manifest
from shoal.simulation.api import simulate

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "portable-features"
COPY_WAT = """(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8))
  (func (export "shoal_alloc") (param $bytes i32) (result i32)
    (local $grow i32)
    (local.set $grow (i32.sub (i32.div_u (i32.add (local.get $bytes) (i32.const 65551))
                                          (i32.const 65536))
                              (memory.size)))
    (if (i32.gt_s (local.get $grow) (i32.const 0))
      (then (drop (memory.grow (local.get $grow)))))
    (i32.const 8))
  (func (export "shoal_extract") (param $in i32) (param $out i32) (param $n i32) (result i32)
    (memory.copy (local.get $out) (local.get $in) (i32.mul (local.get $n) (i32.const 8)))
    (i32.const 0)))"""


def load(name: str, path: Path) -> ModuleType:
    """An example's module under a name of its own."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def records(count: int, seed: int = 0) -> npt.NDArray[np.float64]:
    """``count`` raw records in the example's input order, from several cities and times."""
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [
            np.floor(rng.uniform(1.7e12, 1.9e12, count)),
            rng.uniform(-60, 70, count),
            rng.uniform(-170, 170, count),
            rng.uniform(0, 1, count),
        ]
    )


def extract(
    module: FeatureModule, reference: ModuleType, *, count: int, repeats: int
) -> dict[str, Any]:
    data = records(count)
    assert np.array_equal(module.extract(data), reference.phone_context(data).astype(np.float32)), (
        "the module and the reference disagree"
    )
    numpy_ms, wasm_ms = best_ms(
        lambda: reference.phone_context(data), lambda: module.extract(data), repeats
    )
    return {
        "measure": "extract",
        "records": count,
        "numpy_ms": round(numpy_ms, 2),
        "wasm_ms": round(wasm_ms, 2),
        "ratio": round(wasm_ms / numpy_ms, 3),
        "wasm_records_per_s": round(count / wasm_ms * 1e3),
        "numpy_records_per_s": round(count / numpy_ms * 1e3),
    }


def batch(*, repeats: int) -> dict[str, Any]:
    import wasmtime

    manifest = FeatureManifest(name="copy", version="1", inputs=("x",), outputs=("y",))
    module = FeatureModule.from_bytes(with_manifest(bytes(wasmtime.wat2wasm(COPY_WAT)), manifest))
    one, full = np.ones((1, 1)), np.ones((4096, 1))
    one_ms, full_ms = best_ms(
        lambda: module.extract(one), lambda: module.extract(full), repeats * 10
    )
    return {
        "measure": "batch",
        "one_record_us": round(one_ms * 1e3, 1),
        "batch_4096_us": round(full_ms * 1e3, 1),
        "ratio": round(full_ms / one_ms, 3),
        "per_record_ns_at_4096": round(full_ms * 1e6 / 4096, 1),
    }


class ReferenceFeatures:
    """The example's features from its NumPy reference, with a module's ``extract`` and
    ``outputs``: what an app computes without a feature module."""

    def __init__(self, reference: ModuleType) -> None:
        self.reference = reference
        self.outputs = reference.OUTPUTS

    def extract(self, columns: dict[str, Any]) -> npt.NDArray[np.float32]:
        data = np.column_stack([columns[name] for name in self.reference.INPUTS])
        features: npt.NDArray[np.float32] = self.reference.phone_context(data).astype(np.float32)
        return features


def training(
    app: ModuleType, reference: ModuleType, *, rounds: int, pairs_count: int
) -> dict[str, Any]:
    for module in (app, reference):  # the pool's worker cannot import them by these names
        cloudpickle.register_pickle_by_value(module)
    numpy_features: Any = ReferenceFeatures(reference)

    def client_fn(context: ClientContext) -> Any:
        return app.client_fn(dataclasses.replace(context, features=numpy_features))

    def server_app(context: ServerContext) -> Any:
        return app.server_app(dataclasses.replace(context, features=numpy_features))

    def per_round(**apps: Any) -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as folder:
            result = simulate(EXAMPLE / "job.toml", out=Path(folder) / "run", rounds=rounds, **apps)
        return steady_round_s(result.rows), result.summary["final_accuracy"]

    pairs = []
    for _ in range(pairs_count):  # taking turns: the machine's spells fall on both alike
        numpy_s, numpy_accuracy = per_round(client_app=client_fn, server_app=server_app)
        wasm_s, wasm_accuracy = per_round()
        pairs.append((numpy_s, wasm_s))
    return {
        "measure": "training",
        "rounds": rounds,
        **paired_rounds(pairs, baseline="numpy", measured="wasm"),
        "accuracy": {"numpy": numpy_accuracy, "wasm": wasm_accuracy},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    reference = load("portable_features_reference", EXAMPLE / "reference.py")
    app = load("portable_features_app", EXAMPLE / "app.py")
    module = FeatureModule.load(EXAMPLE / "features.wat")
    print(json.dumps(extract(module, reference, count=args.records, repeats=args.repeats)))
    print(json.dumps(batch(repeats=args.repeats)))
    print(json.dumps(training(app, reference, rounds=args.rounds, pairs_count=args.pairs)))


if __name__ == "__main__":
    main()
