"""examples/portable-features/: the hand-written phone-context feature module.

It computes what the plain-Python reference says, refuses the records it should, naming
them, and gives the same bits under wasmtime (Shoal's host) and under Node.js's V8.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest

from shoal.core.errors import DataError
from shoal.features import FeatureModule, read_manifest

wasmtime = pytest.importorskip("wasmtime")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "portable-features"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INPUTS = ("timestamp_ms", "latitude", "longitude", "battery_level")
OUTPUTS = ("hour_sin", "hour_cos", "is_weekend", "battery_bucket", "geocell_lat", "geocell_lon")
BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"

Array = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    """The example's reference.py, under a name of its own."""
    spec = importlib.util.spec_from_file_location(
        "portable_features_reference", EXAMPLE / "reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wasm() -> bytes:
    return bytes(wasmtime.wat2wasm((EXAMPLE / "features.wat").read_text()))


@pytest.fixture(scope="module")
def records() -> Array:
    """A few thousand records: 1950 to 2100 (before 1970 too), fractional milliseconds,
    the edges of latitude and longitude and the midpoints geohash halves at, batteries
    below 0, above 1, infinite and on the bucket edges."""
    rng = np.random.default_rng(20261205)
    n = 4000
    start, stop = (ms(datetime(year, 1, 1, tzinfo=UTC)) for year in (1950, 2100))
    ts = rng.integers(start, stop, n).astype(np.float64)
    ts[::4] += rng.random(len(ts[::4]))  # fractions of a millisecond
    ts[:8] = [0, -1, -0.5, 86_400_000, -86_400_000, start, stop, 1e-300]
    lat = rng.uniform(-90, 90, n)
    lon = rng.uniform(-180, 180, n)
    lat_edges = [-90, 90, 0, -0.0, 45, -45, 22.5, 1e-300, -1e-300, np.nextafter(90, 0)]
    lon_edges = [-180, 180, 0, -0.0, 90, -90, 11.25, 1e-300, -1e-300, np.nextafter(-180, 0)]
    lat[: len(lat_edges)] = lat_edges
    lon[10 : 10 + len(lon_edges)] = lon_edges
    lat[100:200] = np.round(lat[100:200] / (180 / 4096)) * (180 / 4096)  # cell edges
    lon[200:300] = np.round(lon[200:300] / (360 / 8192)) * (360 / 8192)
    battery = rng.uniform(-0.1, 1.1, n)
    edges = [0, 1, -0.0, np.inf, -np.inf, 1e-300, np.nextafter(1, 0), *np.arange(11) / 10]
    battery[: len(edges)] = edges
    return np.column_stack([ts, lat, lon, battery])


def ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


def run_abi(wasm: bytes, records: Array) -> tuple[int, Array]:
    """Run the module on ``records`` by the ABI, directly in wasmtime: the return code and
    the float64 outputs as shoal_extract left them in linear memory."""
    config = wasmtime.Config()
    config.cranelift_nan_canonicalization = True
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    exports = wasmtime.Instance(store, wasmtime.Module(engine, wasm), []).exports(store)
    memory, alloc, extract = exports["memory"], exports["shoal_alloc"], exports["shoal_extract"]
    count = len(records)
    pointer = alloc(store, count * (len(INPUTS) + len(OUTPUTS)) * 8)
    assert pointer % 8 == 0
    outputs = pointer + count * len(INPUTS) * 8
    memory.write(store, np.ascontiguousarray(records, dtype="<f8").tobytes(), pointer)
    memory.write(store, np.full(count * len(OUTPUTS), np.nan, dtype="<f8").tobytes(), outputs)
    code = extract(store, pointer, outputs, count)
    data = bytes(memory.read(store, outputs, outputs + count * len(OUTPUTS) * 8))
    return code, np.frombuffer(data, dtype="<f8").reshape(count, len(OUTPUTS)).copy()


def geohash_of_cell(row: int, column: int) -> str:
    """The geohash-5 string of a cell: 13 column bits and 12 row bits, interleaved from
    the column's top bit, in base 32."""
    bits = 0
    for k in range(25):
        source, width = (column, 13) if k % 2 == 0 else (row, 12)
        bits = 2 * bits + ((source >> (width - 1 - k // 2)) & 1)
    return "".join(BASE32[(bits >> (20 - 5 * j)) & 31] for j in range(5))


def test_the_manifest_is_the_contracts(wasm: bytes) -> None:
    manifest = read_manifest(wasm)
    assert (manifest.name, manifest.version) == ("phone-context", "1.0.0")
    assert (manifest.inputs, manifest.outputs) == (INPUTS, OUTPUTS)
    module = FeatureModule.load(EXAMPLE / "features.wat")
    assert module.manifest == manifest
    assert (module.inputs, module.outputs) == (INPUTS, OUTPUTS)
    assert module.sha256 == FeatureModule.from_bytes(wasm).sha256


def test_the_module_computes_what_the_reference_says(
    wasm: bytes, records: Array, reference: ModuleType
) -> None:
    code, got = run_abi(wasm, records)
    assert code == 0
    expected = reference.phone_context(records)
    assert got.shape == expected.shape == (len(records), 6)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[:, :2], expected[:, :2], rtol=0, atol=1e-6)
    assert np.abs(got[:, :2] - expected[:, :2]).max() < 1e-14  # measured: about 1.5e-15
    np.testing.assert_array_equal(got[:, 2:], expected[:, 2:])
    assert np.all(np.hypot(got[:, 0], got[:, 1]) == pytest.approx(1, abs=1e-12))
    assert set(np.unique(got[:, 2])) == {0.0, 1.0}
    assert set(np.unique(got[:, 3])) == set(range(10))
    assert {got[:, 4].min(), got[:, 4].max(), got[:, 5].min(), got[:, 5].max()} == {0.0, 1.0}
    assert not (np.signbit(got) & (got == 0)).any()  # no -0.0 (noon's sine, a -0.0 battery)

    # Shoal's host gives the same features as float32
    features = FeatureModule.load(EXAMPLE / "features.wat").extract(records)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, got.astype(np.float32))
    by_name = FeatureModule.from_bytes(wasm).extract(dict(zip(INPUTS, records.T, strict=True)))
    np.testing.assert_array_equal(by_name, features)


def test_the_reference_agrees_with_the_calendar_and_exact_arithmetic(
    records: Array, reference: ModuleType
) -> None:
    features = reference.phone_context(records)
    for (ts, lat, lon, battery), row in zip(records, features, strict=True):
        moment = EPOCH + timedelta(milliseconds=int(np.floor(ts)))
        hour = (moment - moment.replace(hour=0, minute=0, second=0, microsecond=0)) / timedelta(
            hours=1
        )
        assert row[0] == pytest.approx(np.sin(2 * np.pi * hour / 24), abs=1e-9)
        assert row[1] == pytest.approx(np.cos(2 * np.pi * hour / 24), abs=1e-9)
        assert row[2] == (moment.weekday() >= 5)
        assert row[3] == min(max(np.floor(battery * 10), 0), 9)
        # the bisection's cell is the exact floor((v - lo) / (hi - lo) * 2**bits)
        cell_row = min(int((Fraction(lat) + 90) * 4096 / 180), 4095)
        cell_column = min(int((Fraction(lon) + 180) * 8192 / 360), 8191)
        assert (row[4], row[5]) == (cell_row / 4095, cell_column / 8191)


@pytest.mark.parametrize(
    ("day", "weekend"),
    [
        (datetime(2026, 12, 5, tzinfo=UTC), True),  # a Saturday
        (datetime(2026, 12, 6, tzinfo=UTC), True),  # a Sunday
        (datetime(2026, 12, 7, tzinfo=UTC), False),  # a Monday
        (datetime(2026, 12, 4, tzinfo=UTC), False),  # a Friday
        (datetime(1970, 1, 1, tzinfo=UTC), False),  # day 0, a Thursday
        (datetime(1970, 1, 3, tzinfo=UTC), True),  # the seed's day 0 % 7 == 0 is not this
        (datetime(1969, 12, 28, tzinfo=UTC), True),  # a Sunday, before 1970
        (datetime(1969, 12, 27, tzinfo=UTC), True),  # a Saturday
        (datetime(1969, 12, 26, tzinfo=UTC), False),  # a Friday
        (datetime(1950, 1, 1, tzinfo=UTC), True),  # a Sunday
    ],
)
def test_known_dates(wasm: bytes, reference: ModuleType, day: datetime, weekend: bool) -> None:
    # the first and the last millisecond of the day, and 06:00, noon and 18:00
    offsets = [0, 86_399_999, 21_600_000, 43_200_000, 64_800_000]
    records = np.array([[ms(day) + offset, 0, 0, 0.5] for offset in offsets], dtype=np.float64)
    code, got = run_abi(wasm, records)
    assert code == 0
    assert list(got[:, 2]) == [float(weekend)] * len(offsets)
    np.testing.assert_array_equal(got[:, 2], reference.phone_context(records)[:, 2])
    # whole quarter days are exact; the day's last millisecond is just short of midnight
    assert got[0, :2].tolist() == [0.0, 1.0]
    assert got[2:, :2].tolist() == [[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]]
    assert -1e-7 < got[1, 0] < 0 and got[1, 1] == pytest.approx(1)


@pytest.mark.parametrize(
    ("lat", "lon", "expected"),
    [
        (57.64911, 10.40744, "u4pruydqqvj"),  # the geohash article's example
        (42.605, -5.603, "ezs42"),  # and the point its "ezs42" decodes to
        (48.1374, 11.5755, "u281z7jh8"),  # Munich
        (0, 0, "s0000"),  # a midpoint is in the upper half
        (90, 180, "zzzzz"),  # the top edges are in the last cell
        (-90, -180, "00000"),
    ],
)
def test_known_geohash_cells(
    wasm: bytes, reference: ModuleType, lat: float, lon: float, expected: str
) -> None:
    assert reference.geohash(lat, lon, len(expected)) == expected
    code, got = run_abi(wasm, np.array([[0, lat, lon, 0.5]], dtype=np.float64))
    assert code == 0
    row, column = round(got[0, 4] * 4095), round(got[0, 5] * 8191)
    assert (row / 4095, column / 8191) == (got[0, 4], got[0, 5])
    assert geohash_of_cell(row, column) == expected[:5]


def test_battery_buckets(wasm: bytes) -> None:
    levels = [-0.5, -0.0, 0.0, 0.05, 0.0999, 0.1, 0.55, 0.9, 0.95, 0.999, 1.0, 1.7, np.inf, -np.inf]
    records = np.array([[0, 0, 0, level] for level in levels], dtype=np.float64)
    code, got = run_abi(wasm, records)
    assert code == 0
    assert got[:, 3].tolist() == [0, 0, 0, 0, 0, 1, 5, 9, 9, 9, 9, 9, 9, 0]  # never a 10


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("battery_level", np.nan),
        ("latitude", 91.0),
        ("latitude", -90.000001),
        ("latitude", np.nan),
        ("longitude", np.nan),
        ("longitude", 180.00000000000003),
        ("longitude", -np.inf),
        ("timestamp_ms", np.nan),
        ("timestamp_ms", np.inf),
        ("timestamp_ms", 8.64e15 + 1),
    ],
)
def test_refused_records_are_named(
    wasm: bytes, records: Array, reference: ModuleType, column: str, value: float
) -> None:
    batch = records[:40].copy()
    batch[17, INPUTS.index(column)] = value
    code, _ = run_abi(wasm, batch)
    assert code == 18  # record 17, counted from 1
    with pytest.raises(ValueError, match=r"record 17\b"):
        reference.phone_context(batch)
    module = FeatureModule.load(EXAMPLE / "features.wat")
    with pytest.raises(DataError, match=r"cannot compute record 17$"):
        module.extract(batch)
    # in a later batch the host counts from the first record of all
    many = np.concatenate([records, batch])
    with pytest.raises(DataError, match=rf"cannot compute record {len(records) + 17}$"):
        module.extract(many)


NODE_SCRIPT = r"""
// Run a shoal-features module by the ABI: node run.js module.wasm records.f64 outputs.f64
const fs = require("fs");
const [wasmPath, recordsPath, outputsPath] = process.argv.slice(2);

(async () => {
  const { module, instance } = await WebAssembly.instantiate(fs.readFileSync(wasmPath), {});
  const [section] = WebAssembly.Module.customSections(module, "shoal.features");
  const manifest = JSON.parse(new TextDecoder().decode(section));
  const inputs = manifest.inputs.length, outputs = manifest.outputs.length;
  const records = fs.readFileSync(recordsPath);
  const count = records.length / (8 * inputs);
  const { memory, shoal_alloc, shoal_extract } = instance.exports;
  const pointer = shoal_alloc(count * (inputs + outputs) * 8) >>> 0;
  const outputsAt = pointer + count * inputs * 8;
  // memory.buffer is read after shoal_alloc: growing the memory replaces it
  new Uint8Array(memory.buffer, pointer, records.length).set(records);
  const view = new DataView(memory.buffer);
  for (let i = 0; i < count * outputs; i++) view.setFloat64(outputsAt + 8 * i, NaN, true);
  const code = shoal_extract(pointer, outputsAt, count);
  fs.writeFileSync(outputsPath, new Uint8Array(memory.buffer, outputsAt, count * outputs * 8));
  process.stdout.write(JSON.stringify({ code, manifest }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


def run_node(node: str, wasm: bytes, records: Array, tmp_path: Path) -> tuple[int, bytes]:
    (tmp_path / "module.wasm").write_bytes(wasm)
    (tmp_path / "records.f64").write_bytes(np.ascontiguousarray(records, dtype="<f8").tobytes())
    (tmp_path / "run.js").write_text(NODE_SCRIPT)
    done = subprocess.run(
        [node, "run.js", "module.wasm", "records.f64", "outputs.f64"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    reply = json.loads(done.stdout)
    assert (reply["manifest"]["inputs"], reply["manifest"]["outputs"]) == (
        list(INPUTS),
        list(OUTPUTS),
    )
    return int(reply["code"]), (tmp_path / "outputs.f64").read_bytes()


def test_node_computes_the_same_bits(wasm: bytes, records: Array, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the parity check needs `node` on the PATH")
    # every millisecond of the first ten seconds past each eighth of a day, beside the rest
    eighths = np.arange(8) * 10_800_000 + 1_798_934_400_000  # from 2027-01-03T00:00Z
    near = (eighths[:, None] + np.arange(-5_000, 5_000)[None, :]).reshape(-1)
    extra = np.column_stack(
        [near, np.zeros_like(near), np.zeros_like(near), np.full(len(near), 0.5)]
    )
    batch = np.concatenate([records, extra.astype(np.float64)])

    code, expected = run_abi(wasm, batch)
    node_code, node_bytes = run_node(node, wasm, batch, tmp_path)
    assert (code, node_code) == (0, 0)
    assert node_bytes == expected.astype("<f8").tobytes()  # bit for bit
    node_outputs = np.frombuffer(node_bytes, dtype="<f8").reshape(expected.shape)
    features = FeatureModule.load(EXAMPLE / "features.wat").extract(batch)
    np.testing.assert_array_equal(
        features.view(np.uint32), node_outputs.astype(np.float32).view(np.uint32)
    )

    # and Node refuses the same record
    refused = records[:10].copy()
    refused[6, 1] = 91.0
    assert run_node(node, wasm, refused, tmp_path)[0] == run_abi(wasm, refused)[0] == 7
