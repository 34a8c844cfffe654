"""Federated preprocessing in simulation, on examples/federated-preprocessing: pass 1's
statistics are the pooled statistics of every client's records (in the clear and under
SecAgg+), a client sending moments no records give is refused, and pass 2 standardizes every
client's data and the central evaluation with them, with no other scaler, resumed or not."""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shoal
from shoal.client.api import FitConfig, FitResult
from shoal.client.app import ClientContext, load_attribute
from shoal.client.statistics import StatisticsClient
from shoal.config import config_to_dict, load_config, parse_config
from shoal.core.errors import ConfigError
from shoal.dashboard import Dashboard, RunReader
from shoal.preprocessing import SCALER_KEY, FeatureBounds, MomentsCheck, read_statistics
from shoal.registry import BlobStore, ModelRegistry
from shoal.registry.location import blob_location, registry_location

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "federated-preprocessing"
STATISTICS = EXAMPLE / "statistics.toml"
TRAIN = EXAMPLE / "train.toml"
HOSPITALS = 3


@pytest.fixture(autouse=True)
def _own_app_module() -> Iterator[None]:
    """The example's ``app.py`` is imported as ``app``, as other examples' are."""
    sys.modules.pop("app", None)
    yield
    sys.modules.pop("app", None)


def pooled_features(clients: int = HOSPITALS) -> np.ndarray:
    """Every hospital's training records, as the example's app gives them."""
    client_fn = load_attribute("app:client_fn", search_path=[EXAMPLE])
    config = load_config(STATISTICS)
    shares = [
        client_fn(ClientContext(f"h{i}", i, clients, config=config)).local_features()
        for i in range(clients)
    ]
    return np.concatenate(shares).astype(np.float64)


def bounds() -> FeatureBounds:
    return load_config(STATISTICS).statistics.bounds()


def statistics_run(out: Path, *overrides: str) -> shoal.SimulationResult:
    return shoal.simulate(STATISTICS, out=out, overrides=overrides)


@pytest.mark.parametrize(
    ("protocol", "mean_error", "variance_error"),
    [("none", 1e-6, 4e-7), ("secagg+", 2e-5, 2e-5)],  # of the range, and of its square
)
def test_pass_one_gives_the_pooled_statistics_of_every_clients_records(
    tmp_path: Path, protocol: str, mean_error: float, variance_error: float
) -> None:
    result = statistics_run(tmp_path / "stats", f"secure_aggregation.protocol='{protocol}'")
    statistics, _ = read_statistics(tmp_path / "stats")
    pooled = np.clip(pooled_features(), bounds().low, bounds().high)
    width = bounds().width
    assert (np.abs(statistics.mean - pooled.mean(axis=0)) <= mean_error * width).all()
    assert (np.abs(statistics.variance - pooled.var(axis=0)) <= variance_error * width**2).all()
    assert (statistics.examples, statistics.clients) == (len(pooled), HOSPITALS)
    assert result.summary["statistics"] == {
        "file": "statistics.json",
        "features": 30,
        "examples": len(pooled),
        "clients": HOSPITALS,
        "unresolved": 0,
        "model_version": 1,
    }
    assert result.summary["architecture"] == "feature-statistics"
    assert result.summary["secure_aggregation"] == protocol


def test_moments_no_records_give_are_refused_and_count_for_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One hospital sends every mean at the top of its range with no spread: moments no
    records give, which a plaintext round checks (under SecAgg+ no one sees them)."""
    plain = "secure_aggregation.protocol='none'"
    quorum = "round.quorum=0.6"  # two of three commit
    statistics_run(tmp_path / "honest", plain)
    honest, _ = read_statistics(tmp_path / "honest")
    original = StatisticsClient.fit
    forger: list[int] = []  # the task seed of the first client asked: the forger

    def forging(self: StatisticsClient, parameters: Any, config: FitConfig) -> FitResult:
        result = original(self, parameters, config)
        if forger and config.seed != forger[0]:
            return result
        forger[:] = [config.seed]
        forged = np.concatenate([np.ones(30), np.zeros(30)]).astype(np.float32)
        return FitResult(parameters.with_vector(forged), result.num_examples)

    monkeypatch.setattr(StatisticsClient, "fit", forging)
    refused = statistics_run(tmp_path / "refused", plain, quorum)
    row = refused.rows[-1]
    assert row["rejected"].get("invalid_update") == 1 and row["reported"] == HOSPITALS - 1
    assert any("its mean square is below its squared mean" in f for f in row["failures"])
    statistics, _ = read_statistics(tmp_path / "refused")
    assert statistics.clients == HOSPITALS - 1
    assert (statistics.mean < honest.mean + 0.05 * bounds().width).all()  # none of the forgery

    # without the check, the forgery moves every mean toward the top of its range
    monkeypatch.setattr(MomentsCheck, "__call__", lambda self, moments: None)
    forger.clear()
    poisoned = statistics_run(tmp_path / "poisoned", plain, quorum)
    assert poisoned.rows[-1]["reported"] == HOSPITALS
    skewed, _ = read_statistics(tmp_path / "poisoned")
    assert (skewed.mean > honest.mean + 0.05 * bounds().width).all()


def forge(
    monkeypatch: pytest.MonkeyPatch, moments: np.ndarray | None = None, records: int | None = None
) -> None:
    """The first hospital asked sends ``moments`` and claims ``records`` (each, when given,
    in place of its own); the others count honestly."""
    original = StatisticsClient.fit
    forger: list[int] = []

    def forging(self: StatisticsClient, parameters: Any, config: FitConfig) -> FitResult:
        result = original(self, parameters, config)
        if forger and config.seed != forger[0]:
            return result
        forger[:] = [config.seed]
        vector = parameters.with_vector(moments) if moments is not None else result.parameters
        return FitResult(vector, result.num_examples if records is None else records)

    monkeypatch.setattr(StatisticsClient, "fit", forging)


def test_a_claimed_record_count_past_the_policys_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the clear, plausible moments with ten million claimed records would be the whole
    population: [policy] max_examples is the cap a statistics job sets on one client."""
    plain = ["secure_aggregation.protocol='none'", "round.quorum=0.6"]
    statistics_run(tmp_path / "honest", *plain)
    honest, _ = read_statistics(tmp_path / "honest")
    top = np.concatenate([np.full(30, 0.99), np.full(30, 0.985)]).astype(np.float32)  # valid
    forge(monkeypatch, top, records=10_000_000)
    denied = statistics_run(tmp_path / "capped", *plain, "policy.max_examples=1000")
    assert denied.rows[-1]["policy_denied"] == {"examples_above_cap": 1}
    capped, _ = read_statistics(tmp_path / "capped")
    assert capped.clients == HOSPITALS - 1 and capped.examples < 1000
    assert (capped.mean < honest.mean + 0.05 * bounds().width).all()
    statistics_run(tmp_path / "uncapped", *plain)  # the default cap: ten million
    uncapped, _ = read_statistics(tmp_path / "uncapped")
    assert (uncapped.mean > 0.95 * bounds().high).all()  # the forger is the population


def test_a_client_past_max_weight_refuses_rather_than_bias_the_secure_sum(
    tmp_path: Path,
) -> None:
    """SecAgg+ counts a client as at most max_weight records: the hospital with 169 refuses
    to be counted as 150 (its reason in the row, its count not), and the statistics are the
    others'."""
    result = statistics_run(
        tmp_path / "stats", "secure_aggregation.max_weight=150", "round.quorum=0.6"
    )
    row = result.rows[-1]
    assert row["committed"] and row["reported"] == HOSPITALS - 1
    (reason,) = [reason for reason in row["failures"] if "max_weight = 150" in reason]
    assert "holds more examples than the secure sum counts" in reason
    assert "169" not in reason  # the count the secure sum masks is not told in the clear
    statistics, _ = read_statistics(tmp_path / "stats")
    assert (statistics.clients, statistics.examples) == (2, 77 + 96)
    others = np.clip(pooled_features()[169:], bounds().low, bounds().high)
    assert (np.abs(statistics.mean - others.mean(axis=0)) <= 1e-6 * bounds().width).all()


def test_moments_outside_the_bounds_under_secagg_leave_no_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SecAgg+ no one checks one hospital's moments: a mean of 4 (in units of the
    range) with no spread reaches the sum, whose average no records give. The run writes no
    statistics (the CLI exits 1), rather than the clipped means and zero spread it makes."""
    forged = np.concatenate([np.full(30, 4.0), np.zeros(30)]).astype(np.float32)
    forge(monkeypatch, forged)
    result = statistics_run(tmp_path / "stats")
    assert result.rows[-1]["committed"]
    assert result.summary["statistics"] is None
    assert not (tmp_path / "stats" / "statistics.json").exists()


def test_features_whose_spread_the_bounds_do_not_resolve_are_named(tmp_path: Path) -> None:
    """A radius bounded by 40 million instead of 40: its variance is below what float32
    moments resolve; the file and the summary name it."""
    high = load_config(STATISTICS).statistics.high
    assert isinstance(high, list)
    wide = [4e7, *high[1:]]
    result = statistics_run(tmp_path / "stats", f"statistics.high={wide}")
    statistics, _ = read_statistics(tmp_path / "stats")
    assert statistics.unresolved == [0]
    assert json.loads((tmp_path / "stats" / "statistics.json").read_text())["unresolved"] == [0]
    assert result.summary["statistics"]["unresolved"] == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.rounds=3", "run.rounds = 1"),
        ("strategy.name='fedadam'", "no \\[strategy\\]"),
        ("privacy.placement='central'", "no \\[privacy\\]"),
        ("compression.kind='int8'", "no \\[compression\\]"),
        ("clustering.clusters=2", "no \\[clustering\\]"),
        ("preprocessing.statistics='runs/other'", "no \\[preprocessing\\]"),
        ("statistics.low=[0.0, 0.0, 0.0]", "lists of 3 values"),
        ("secure_aggregation.clip=0.5", "clip >= 1: every moment lies in"),
        ("policy.max_l2_norm=7.0", "max_l2_norm >= 7.74597: the moments of 30 features"),
        ("secure_aggregation.bits=12", "bits >= 16"),
    ],
)
def test_a_statistics_run_refuses_what_would_change_its_moments(
    override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(STATISTICS, [override])
    load_config(STATISTICS, ["policy.max_l2_norm=7.75", "secure_aggregation.clip=1.0"])


def test_an_app_whose_clients_give_no_features_is_named(tmp_path: Path) -> None:
    class Opaque(shoal.client.Client):  # type: ignore[misc]
        def get_parameters(self) -> Any: ...
        def fit(self, parameters: Any, config: Any) -> Any: ...
        def evaluate(self, parameters: Any, config: Any) -> Any: ...

    with pytest.raises(ConfigError, match="Opaque has no local_features\\(\\) method"):
        StatisticsClient(Opaque(), bounds())


# --- pass 2 -----------------------------------------------------------------------------


def train(tmp_path: Path, statistics: Path | None, *overrides: str, **kwargs: Any) -> Any:
    job = tomllib.loads(TRAIN.read_text())
    job["app"]["path"] = [str(EXAMPLE)]
    if statistics is None:
        job.pop("preprocessing")
    else:
        job["preprocessing"]["statistics"] = str(statistics)
    return shoal.simulate(job, out=tmp_path / "train", overrides=overrides, **kwargs)


def test_pass_two_standardizes_every_client_and_the_central_evaluation(tmp_path: Path) -> None:
    statistics_run(tmp_path / "stats")
    statistics, sha256 = read_statistics(tmp_path / "stats")
    client_fn = load_attribute("app:client_fn", search_path=[EXAMPLE])
    seen: list[Any] = []

    def recording(context: ClientContext) -> Any:
        client = client_fn(context)
        fit = client.fit

        def recorded_fit(parameters: Any, config: FitConfig) -> FitResult:
            seen.append(config.scaler)
            return fit(parameters, config)

        client.fit = recorded_fit
        return client

    result = train(tmp_path, tmp_path / "stats", "run.rounds=5", client_app=recording)
    assert len(seen) == 5 * HOSPITALS and all(scaler is seen[0] for scaler in seen)
    expected = statistics.scaler()
    assert seen[0].mean.tolist() == expected.mean.tolist()
    assert seen[0].scale.tolist() == expected.scale.tolist()
    stored = json.loads((tmp_path / "train" / "config.json").read_text())
    assert stored["preprocessing"]["sha256"] == sha256  # recorded, pinned or not
    assert result.summary["final_accuracy"] >= 0.95
    # every version records the scaler its tasks carried (a blob), signed with it
    folder = tmp_path / "train"
    database = registry_location(folder, None).open()
    try:
        registry = ModelRegistry(database, BlobStore(blob_location(folder, None)))
        versions = registry.list("global")
        assert len(versions) == 6
        assert {version.preprocessing_sha256 for version in versions} == {expected.sha256}
        assert registry.blobs.get(expected.sha256) == expected.text().encode()
    finally:
        database.close()
    dashboard = Dashboard(RunReader(folder))  # the operator's view shows it too
    try:
        _, _, shown = dashboard.state()
    finally:
        dashboard.close()
    assert shown.count(f"<td>{expected.sha256[:12]}</td>") == len(versions)


def test_standardized_training_learns_where_raw_training_does_not(tmp_path: Path) -> None:
    statistics_run(tmp_path / "stats")
    standardized = train(tmp_path / "a", tmp_path / "stats")
    raw = train(tmp_path / "b", None, "playbook.enabled=false")
    assert standardized.summary["final_accuracy"] >= 0.95
    # one learning rate for areas in the thousands and fractions in the hundredths
    assert raw.summary["final_accuracy"] <= standardized.summary["final_accuracy"] - 0.05


def test_a_server_app_cannot_send_a_scaler_of_its_own(tmp_path: Path) -> None:
    statistics_run(tmp_path / "stats")
    server_app = load_attribute("app:server_app", search_path=[EXAMPLE])
    forged = shoal.preprocessing.Scaler(np.zeros(30), np.full(30, 1e6)).text()

    def meddling(context: shoal.ServerContext) -> shoal.ServerApp:
        from dataclasses import replace

        return replace(server_app(context), fit_config=lambda _: {SCALER_KEY: forged})

    seen: list[Any] = []
    client_fn = load_attribute("app:client_fn", search_path=[EXAMPLE])

    def recording(context: ClientContext) -> Any:
        client = client_fn(context)
        fit = client.fit
        client.fit = lambda parameters, config: (
            seen.append(config.extras) or fit(parameters, config)
        )
        return client

    train(
        tmp_path / "with",
        tmp_path / "stats",
        "run.rounds=1",
        client_app=recording,
        server_app=meddling,
    )
    assert seen and all(extras[SCALER_KEY] != forged for extras in seen)
    seen.clear()
    train(tmp_path / "without", None, "run.rounds=1", client_app=recording, server_app=meddling)
    assert seen and all(SCALER_KEY not in extras for extras in seen)


def test_a_run_resumes_only_with_the_statistics_it_started_with(tmp_path: Path) -> None:
    statistics_run(tmp_path / "stats")
    train(tmp_path, tmp_path / "stats", "run.rounds=2")
    train(tmp_path, tmp_path / "stats", "run.rounds=3", resume=True)  # the same file: goes on
    path = tmp_path / "stats" / "statistics.json"
    data = json.loads(path.read_text())
    data["mean"][0] += 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"this job.s \[preprocessing\] gives the scaler"):
        train(tmp_path, tmp_path / "stats", "run.rounds=4", resume=True)


def test_a_pin_refuses_other_statistics(tmp_path: Path) -> None:
    statistics_run(tmp_path / "stats")
    _, sha256 = read_statistics(tmp_path / "stats")
    train(
        tmp_path / "pinned", tmp_path / "stats", "run.rounds=1", f"preprocessing.sha256='{sha256}'"
    )
    other = "0" * 64
    with pytest.raises(ConfigError, match=f"preprocessing.sha256 pins {other}"):
        train(
            tmp_path / "other",
            tmp_path / "stats",
            "run.rounds=1",
            f"preprocessing.sha256='{other}'",
        )


@pytest.mark.parametrize("path", [STATISTICS, TRAIN], ids=lambda path: path.stem)
def test_the_examples_jobs_read_back_from_config_json(path: Path) -> None:
    """What a resume reads: config.json holds the bounds and the statistics file as given."""
    config = load_config(path)
    assert parse_config(json.loads(json.dumps(config_to_dict(config)))) == config


def wards(context: ClientContext) -> Any:
    """Ten hospital wards' length of stay and age: ward 0 is long-stay (about 120 days),
    the others about 3; ward sizes from 20 to 2,000 records; a constant and a binary column."""
    from shoal.client import NumpyClient, SoftmaxRegression

    index = context.partition_index or 0
    rng = np.random.default_rng([context.seed, index])
    size = [20, 2000, 45, 700, 90, 1500, 33, 400, 1200, 60][index]
    stay = rng.normal(120.0 if index == 0 else 3.0, 1.0, size).clip(0, 365)
    age = rng.uniform(18, 90, size)
    columns = [stay, age, np.full(size, 7.0), rng.integers(0, 2, size).astype(float)]
    features = np.column_stack(columns).astype(np.float32)
    return NumpyClient(
        SoftmaxRegression(num_features=4, num_classes=2),
        train_data=(features, np.zeros(size, dtype=np.int64)),
    )


def wards_job(**sections: dict[str, Any]) -> dict[str, Any]:
    job: dict[str, Any] = {
        "run": {"name": "wards", "rounds": 1},
        "data": {"num_clients": 10},
        "round": {"clients_per_round": 10, "over_selection": 1.0, "quorum": 0.5},
        "evaluation": {"every": 0},
        "simulation": {"workers": 0},
        "statistics": {"enabled": True, "low": 0.0, "high": [365.0, 120.0, 10.0, 1.0]},
    }
    for name, values in sections.items():
        job[name] = {**job.get(name, {}), **values}
    return job


def pooled_wards(seed: int = 0) -> np.ndarray:
    config = parse_config(wards_job())
    shares = [
        wards(ClientContext(f"w{i}", i, 10, config=config, seed=seed)).local_features()
        for i in range(10)
    ]
    return np.concatenate(shares).astype(np.float64)


def test_an_honest_ward_unlike_the_others_is_counted(tmp_path: Path) -> None:
    """In the clear, the default policy's bound relative to the round's median would refuse
    the long-stay ward (its moments ten times the others'): a statistics run has none."""
    result = shoal.simulate(wards_job(), client_app=wards, out=tmp_path)
    row = result.rows[-1]
    assert row["reported"] == 10 and row["policy_denied"] == {}
    statistics, _ = read_statistics(tmp_path)
    pooled = pooled_wards()
    np.testing.assert_allclose(statistics.mean, pooled.mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_honest_secure_cohort_of_very_unequal_wards_passes_the_aggregate_check(
    tmp_path: Path, seed: int
) -> None:
    """16 bits and a max_weight of 2,000: the fixed point rounds the 20-record ward's
    contribution coarsely, and the averaged moments of a constant column fall a little
    outside what records give. The check allows the secure sum's own rounding (a bound), so
    an honest cohort is never blamed, and the resolution it names grows with it."""
    job = wards_job(
        run={"seed": seed},
        secure_aggregation={"protocol": "secagg+", "bits": 16, "max_weight": 2000},
    )
    result = shoal.simulate(job, client_app=wards, out=tmp_path)
    assert result.rows[-1]["reported"] == 10
    statistics, _ = read_statistics(tmp_path)
    assert statistics.resolution > 1e-6  # coarser than float32's, and said
    assert 2 in statistics.unresolved  # the constant column
    width = statistics.bounds.width
    assert (np.abs(statistics.mean - pooled_wards(seed).mean(axis=0)) <= 1e-3 * width).all()


def scaler_cli(folder: Path, out: Path, version: str = "head") -> Any:
    from typer.testing import CliRunner

    from shoal.cli import app as cli

    command = ["models", "scaler", "global", version, "--out", str(out), "--state-dir", str(folder)]
    return CliRunner().invoke(cli, command)


def test_shoal_models_scaler_writes_the_signed_bytes_and_checks_first(tmp_path: Path) -> None:
    """What serves a model gets the scaler its tasks carried, byte for byte the signed text;
    a version's row whose scaler was taken out is a signature failure, never "none"."""
    import sqlite3

    statistics_run(tmp_path / "stats")
    train(tmp_path, tmp_path / "stats", "run.rounds=1")
    folder, out = tmp_path / "train", tmp_path / "scaler.json"
    exported = scaler_cli(folder, out)
    assert exported.exit_code == 0, exported.output
    expected = read_statistics(tmp_path / "stats")[0].scaler()
    assert out.read_bytes() == expected.text().encode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected.sha256

    statistics_folder = tmp_path / "stats"
    none = scaler_cli(statistics_folder, tmp_path / "none.json")
    assert none.exit_code != 0 and "records no scaler" in none.output
    assert not (tmp_path / "none.json").exists()

    database = sqlite3.connect(folder / "registry" / "registry.db")
    database.execute("UPDATE model_versions SET preprocessing_sha256 = NULL")
    database.commit()
    database.close()
    tampered = scaler_cli(folder, tmp_path / "tampered.json")
    assert tampered.exit_code != 0 and "does not match its signature" in tampered.output
    assert not (tmp_path / "tampered.json").exists()
