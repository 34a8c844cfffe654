"""examples/portable-features/ as a user runs it: a simulation whose clients and central
evaluation compute their features with the job's WebAssembly module, recorded with every
version; the module exported from the registry; a resume with another module refused.

(The module itself, against its reference and Node.js: tests/test_example_features.py.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import shoal
from shoal.cli import app as cli
from shoal.core.errors import ConfigError
from shoal.dashboard import Dashboard, RunReader
from shoal.features import FeatureModule
from shoal.registry import BlobStore, ModelRecord, ModelRegistry
from shoal.registry.location import blob_location, registry_location

pytest.importorskip("wasmtime")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "portable-features"
JOB = EXAMPLE / "job.toml"


@pytest.fixture(autouse=True)
def _own_app_module() -> Iterator[None]:
    """The example's ``app.py`` is imported as ``app``, as other examples' are: forgotten
    before and after."""
    sys.modules.pop("app", None)
    yield
    sys.modules.pop("app", None)


def versions(folder: Path) -> list[ModelRecord]:
    database = registry_location(folder, None).open()
    try:
        registry = ModelRegistry(database, BlobStore(blob_location(folder, None)))
        return registry.list(registry.names()[0])
    finally:
        database.close()


def test_the_example_learns_from_features_its_module_computes(tmp_path: Path) -> None:
    result = shoal.simulate(JOB, out=tmp_path / "run", rounds=5)
    assert result.summary["rounds_completed"] == 5
    # opens peak in the evening: the hour's sine and cosine (which the raw timestamp is not
    # linear in) carry most of it; the noise of the answers caps accuracy near 0.8
    assert result.summary["final_accuracy"] > 0.72
    module = FeatureModule.load(EXAMPLE / "features.wat")
    recorded = versions(tmp_path / "run")
    assert len(recorded) == 6 and {v.features_sha256 for v in recorded} == {module.sha256}
    assert all(v.signed is not None for v in recorded)
    dashboard = Dashboard(RunReader(tmp_path / "run"))  # the operator's view shows it too
    try:
        _, _, shown = dashboard.state()
    finally:
        dashboard.close()
    assert shown.count(f"<td>{module.sha256[:12]}</td>") == len(recorded)


def test_clients_in_worker_processes_compute_the_same_bits(tmp_path: Path) -> None:
    """The module goes to the pool's worker by value and is compiled there: the run is the
    same, bit for bit, as the one whose clients train in this process."""
    pooled = shoal.simulate(JOB, out=tmp_path / "pool", rounds=3)
    alone = shoal.simulate(
        JOB, out=tmp_path / "alone", rounds=3, overrides=["simulation.workers=0"]
    )
    assert pooled.parameters.sha256() == alone.parameters.sha256()


def test_the_registry_gives_back_the_module_a_version_was_trained_with(tmp_path: Path) -> None:
    shoal.simulate(JOB, out=tmp_path / "run", rounds=1)
    out = tmp_path / "served.wasm"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "models",
            "features",
            "global",
            "head",
            "--out",
            str(out),
            "--state-dir",
            str(tmp_path / "run"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    exported = json.loads(result.output)
    module = FeatureModule.from_bytes(out.read_bytes())
    assert exported["features_sha256"] == module.sha256
    assert module.sha256 == FeatureModule.load(EXAMPLE / "features.wat").sha256
    assert exported["outputs"][0] == "hour_sin"


def test_a_version_without_a_module_says_so(tmp_path: Path) -> None:
    shoal.simulate(None, out=tmp_path / "run", rounds=1, overrides=["data.num_clients=20"])
    result = CliRunner().invoke(
        cli,
        [
            "models",
            "features",
            "global",
            "0",
            "--out",
            str(tmp_path / "x.wasm"),
            "--state-dir",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code != 0
    assert "records no feature module" in result.output
    assert not (tmp_path / "x.wasm").exists()


def test_a_run_resumes_only_with_the_module_it_was_trained_with(tmp_path: Path) -> None:
    shoal.simulate(JOB, out=tmp_path / "run", rounds=1)
    wat = (EXAMPLE / "features.wat").read_text().replace("(f64.const -0.5)", "(f64.const -0.25)", 1)
    (tmp_path / "skewed.wat").write_text(wat)
    with pytest.raises(ConfigError, match="trained with the feature module"):
        shoal.simulate(
            JOB,
            out=tmp_path / "run",
            rounds=2,
            resume=True,
            overrides=[f"features.module='{tmp_path / 'skewed.wat'}'"],
        )
    # the run as it was: the same module goes on
    resumed = shoal.simulate(JOB, out=tmp_path / "run", rounds=2, resume=True)
    assert resumed.summary["rounds_completed"] == 2


def test_a_pinned_module_that_does_not_match_stops_the_run_before_it_starts(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"features\.sha256 pins"):
        shoal.simulate(
            JOB, out=tmp_path / "run", rounds=1, overrides=["features.sha256='" + "0" * 64 + "'"]
        )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_app_without_a_module_says_which_setting_to_give(tmp_path: Path) -> None:
    job = {
        "run": {"name": "no-module", "rounds": 1},
        "data": {"num_clients": 4},
        "round": {"clients_per_round": 4},
        "app": {"client": "app:client_fn", "server": "app:server_app", "path": [str(EXAMPLE)]},
    }
    with pytest.raises(ConfigError, match=r"set \[features\] module"):
        shoal.simulate(job, out=tmp_path / "run")
