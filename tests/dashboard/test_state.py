"""What the dashboard reads of a run and shows: rows, versions and their marks, clients, budget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shoal.dashboard import Dashboard, RunReader, Snapshot
from shoal.dashboard.page import NOT_RECORDED, formatted, fragment
from shoal.registry import ClientRegistry, ClientStatus, ModelStatus
from shoal.simulation.runner import MODEL_NAME, Simulation, open_run_models
from shoal.telemetry.plots import FIGURE_KEYS
from support.stepped_runs import CLASSES, RUN_NAME, small_job

pytestmark = pytest.mark.filterwarnings("ignore::shoal.privacy.noise.InsecureNoiseWarning")

HOSTILE = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished DP run of 2 rounds whose version 1 an operator marked BAD, a client suspended."""
    folder = tmp_path_factory.mktemp("run")
    Simulation(small_job(rounds=2, private=True), folder).run()
    models = open_run_models(folder)
    try:
        models.mark(MODEL_NAME, 1, ModelStatus.BAD, reason=HOSTILE)
        clients = ClientRegistry(models.database)
        suspended = clients.list(limit=1)[0].client_id
        clients.set_status(suspended, ClientStatus.SUSPENDED, reason="caught")
    finally:
        models.database.close()
    return folder


def test_a_snapshot_holds_the_rows_versions_clients_and_budget(private_run: Path) -> None:
    reader = RunReader(private_run)
    try:
        snapshot = reader.snapshot()
    finally:
        reader.close()
    assert snapshot.current_round == 2 and snapshot.finished
    assert snapshot.run_name == RUN_NAME
    assert snapshot.model == MODEL_NAME and snapshot.head == 2
    assert [record.version for record in snapshot.versions] == [2, 1, 0]  # newest first
    assert snapshot.versions[1].status is ModelStatus.BAD
    assert sum(snapshot.census.values()) == 8
    assert {device for _, device in snapshot.census} == set(CLASSES)
    assert sum(n for (s, _), n in snapshot.census.items() if s is ClientStatus.SUSPENDED) == 1
    assert snapshot.budget is not None and snapshot.budget.epsilon == 50.0
    fit = snapshot.last_row("fit")
    assert fit is not None and snapshot.budget.epsilon_spent == pytest.approx(fit["epsilon"])


def test_the_fragment_escapes_the_run_and_marks_good_and_bad(private_run: Path) -> None:
    dashboard = Dashboard(RunReader(private_run))
    try:
        revision, _, fragment = dashboard.state()
        again, _, _ = dashboard.state()
    finally:
        dashboard.close()
    assert revision == again  # nothing changed, nothing to swap
    assert "<script>" not in fragment and "&lt;script&gt;" in fragment
    assert "&lt;b&gt;run&lt;i&gt;&amp;amp;" in fragment  # the run's name, escaped
    assert '<dd id="current-round">2</dd>' in fragment
    assert re.search(r'class="status bad">BAD<', fragment)
    assert re.search(r'class="status good">GOOD<', fragment)
    assert '<meter id="epsilon-meter"' in fragment
    for key in FIGURE_KEYS:  # every figure of the report, drawn for it
        assert f'<figure id="figure-{key}"><svg' in fragment
    assert re.search(r'id="fairness-gap">[0-9.]+%<', fragment)  # the fleet telemetry, shown
    # a figure the run did not record says so, as the report does
    assert formatted(None, ".2%") == NOT_RECORDED


def test_a_run_not_started_yet_is_a_waiting_page(tmp_path: Path) -> None:
    dashboard = Dashboard(RunReader(tmp_path / "state"))
    try:
        _, snapshot, fragment = dashboard.state()
    finally:
        dashboard.close()
    assert snapshot.current_round is None and not snapshot.finished
    assert "waiting for the registry" in fragment and "none committed yet" in fragment
    assert not (tmp_path / "state").exists()  # a viewer creates nothing


@pytest.mark.parametrize(
    ("privacy", "said"),
    [({"enabled": False}, "differential privacy is off"), ({"enabled": True}, "no budget opened")],
)
def test_a_run_without_a_budget_says_why(
    tmp_path: Path, privacy: dict[str, bool], said: str
) -> None:
    snapshot = Snapshot(folder=tmp_path, config={"privacy": privacy}, rows=[{"round": 1}])
    assert said in fragment(snapshot, [])


def test_the_contract_figures_show_when_a_run_records_them(tmp_path: Path) -> None:
    fit = {
        "round": 3,
        "phase": "fit",
        "drop_rate": 0.125,
        "straggler_index": 0.8125,
        "rtt_p90_s": 12.5,
        "bytes_up_per_client": 2936.0,
        "drift_clusters": 2,
        "drift_bimodal": True,
    }
    evaluate = {"round": 3, "phase": "evaluate", "accuracy": 0.875, "fairness_gap": 0.05}
    shown = fragment(Snapshot(folder=tmp_path, rows=[fit, evaluate]), [])
    for key, text in [
        ("drop-rate", "12.5%"),
        ("straggler-index", "0.81"),
        ("rtt-p90-s", "12.50 s"),
        ("bytes-up-per-client", "2,936"),
        ("drift-clusters", "2"),
        ("drift-bimodal", "yes"),
        ("accuracy", "87.50%"),
        ("fairness-gap", "5.00%"),
        ("bytes-down-per-client", NOT_RECORDED),
    ]:
        assert f'id="{key}">{text}<' in shown
