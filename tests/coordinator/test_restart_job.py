"""A restarted coordinator with a changed job: what the run depends on is refused, the rest taken.

Reproduced before: a coordinator restarted with another ``model.hidden`` resumed
HEAD's parameters under a job whose clients build another model, and one with
another ``privacy.noise_multiplier`` went on accounting the rounds before it
with the new one; both started without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.config import load_config
from shoal.coordinator.server import build
from shoal.core.errors import ConfigError
from shoal.transport.certs import init_certificates


@pytest.fixture
def job(tmp_path: Path) -> Path:
    init_certificates(tmp_path / "certs")
    path = tmp_path / "job.toml"
    path.write_text(
        "[data]\nnum_clients = 4\n[round]\nclients_per_round = 2\ndeadline_s = 60\n"
        f'[coordinator]\nstate_dir = "{tmp_path / "state"}"\n'
        f'certificates = "{tmp_path / "certs"}"\n'
    )
    build(load_config(path)).close()  # the run starts: version 0 and its config.json
    return path


def test_a_restart_that_changes_what_the_run_depends_on_is_refused(job: Path) -> None:
    stored = (job.parent / "state" / "config.json").read_text()
    with pytest.raises(ConfigError) as refused:
        build(load_config(job, ["model.hidden=128", "strategy.server_learning_rate=0.5"]))
    message = str(refused.value)
    assert "holds a run started with another job" in message
    assert "model.hidden (32, now 128)" in message
    assert "strategy.server_learning_rate (unset, now 0.5)" in message
    assert "\n" not in message
    assert (job.parent / "state" / "config.json").read_text() == stored  # nothing changed
    build(load_config(job)).close()  # the job it started with still opens it


def test_a_restart_takes_other_changes_and_keeps_them_as_the_runs(job: Path) -> None:
    build(load_config(job, ["round.deadline_s=120", "run.rounds=20"])).close()
    stored = json.loads((job.parent / "state" / "config.json").read_text())
    assert stored["round"]["deadline_s"] == 120
    assert stored["run"]["rounds"] == 20


def test_a_key_the_stored_config_lacks_is_compared_as_its_default(job: Path) -> None:
    """A config.json another Shoal wrote lacks the keys added since: each is its default."""
    path = job.parent / "state" / "config.json"
    stored = json.loads(path.read_text())
    del stored["model"]["hidden"]
    path.write_text(json.dumps(stored))
    build(load_config(job)).close()
    path.write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match=r"model.hidden \(32, now 128\)"):
        build(load_config(job, ["model.hidden=128"]))
