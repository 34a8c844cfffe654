"""A user's mistake in a config is one line and exit code 2, through the real ``shoal`` command.

The config file itself (not UTF-8, a folder, missing, not TOML), a size
beyond what the machine can hold (``model.hidden = 1e9`` asked for 477 GiB
and died of MemoryError), and a float that is not finite
(``client.learning_rate = inf`` was accepted, then every client failed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from support.user_errors import EXIT_CONFIG, invoke, one_line_error, run_shoal

SMALL = [
    "--set", "run.rounds=1",
    "--set", "data.num_clients=6",
    "--set", "round.clients_per_round=3",
    "--set", "evaluation.every=0",
    "--set", "simulation.workers=0",
]  # fmt: skip


def simulate(tmp_path: Path, *overrides: str) -> list[str | Path]:
    """A small one-round simulation with ``overrides`` (so a regression runs in seconds)."""
    extra = [word for override in overrides for word in ("--set", override)]
    return ["simulate", "--out", tmp_path / "run", *SMALL, *extra]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default state folder would land here, never in the repo


def _client_run(config: Path, tmp: Path) -> list[str | Path]:
    return [
        "client", "run", "--config", config, "--coordinator", "127.0.0.1:1",
        "--state-dir", tmp / "client", "--insecure",
    ]  # fmt: skip


# every command that reads a job config, given the config's path
READERS: dict[str, Callable[[Path, Path], list[str | Path]]] = {
    "simulate": lambda config, tmp: ["simulate", config, "--out", tmp / "run"],
    "coordinator serve": lambda config, tmp: ["coordinator", "serve", "--config", config],
    "client run": _client_run,
}


def _not_utf8(path: Path) -> None:
    path.write_bytes(b'[run]\nname = "caf\xe9"\n')  # Latin-1, as an old editor saves it


def _folder(path: Path) -> None:
    path.mkdir()


def _missing(path: Path) -> None:
    pass


def _not_toml(path: Path) -> None:
    path.write_text("[run]\nrounds = \n")


FILE_MISTAKES = {
    "not UTF-8": (_not_utf8, ("job.toml: not UTF-8 text (byte 0xe9 on line 2)",)),
    "a folder": (_folder, ("job.toml: is a folder, not a config file",)),
    "missing": (_missing, ("config file not found:", "job.toml")),
    "not TOML": (_not_toml, ("job.toml: not valid TOML:", "(at line 2, column 10)")),
}


@pytest.mark.parametrize("mistake", FILE_MISTAKES)
@pytest.mark.parametrize("command", READERS)
def test_a_bad_config_file_is_one_line(tmp_path: Path, command: str, mistake: str) -> None:
    make, expected = FILE_MISTAKES[mistake]
    config = tmp_path / "job.toml"
    make(config)
    result = invoke(*READERS[command](config, tmp_path))
    one_line_error(result, code=EXIT_CONFIG, contains=("config error:", *expected))
    assert not (tmp_path / "run").exists() and not (tmp_path / "client").exists()


def test_a_latin1_config_in_a_real_process_is_one_line(tmp_path: Path) -> None:
    _not_utf8(tmp_path / "job.toml")
    result = run_shoal("simulate", tmp_path / "job.toml", cwd=tmp_path)
    one_line_error(result, code=EXIT_CONFIG, contains=("not UTF-8 text",))


def test_a_model_of_477_gib_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """The issue's case, in a real process: it used to die allocating 477 GiB."""
    config = tmp_path / "job.toml"
    config.write_text('[model]\nkind = "mlp"\nhidden = 1e9\n')
    result = run_shoal("simulate", config, "--out", tmp_path / "run", *SMALL, cwd=tmp_path)
    line = one_line_error(result, code=EXIT_CONFIG)
    assert "model.hidden = 1000000000 is above the limit of 894,784" in line
    assert "the model would need 279 GiB" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.hidden=1e9", "model.hidden"),  # even unused (softmax): an MLP that wide
        ("data.num_clients=10_000_000", "data.num_clients"),
        ("run.rounds=1_000_000_000", "run.rounds"),
        ("run.seed=18446744073709551616", "run.seed"),  # 2**64: past any TOML integer
        ("client.batch_size=1_099_511_627_776", "client.batch_size"),
        ("client.epochs=1e9", "client.epochs"),
        ("simulation.workers=100_000", "simulation.workers"),
        ("evaluation.clients=10_000_000", "evaluation.clients"),
        ("strategy.num_selected=10_000_000", "strategy.num_selected"),
        ("coordinator.max_update_mb=1e9", "coordinator.max_update_mb"),
        ("secure_aggregation.max_weight=36893488147419103232", "secure_aggregation.max_weight"),
        ("data.samples_per_client=10_000_000", "data.samples_per_client"),
        ("devices.speed_jitter=1e10", "devices.speed_jitter"),  # a ZeroDivisionError later
    ],
)
def test_a_size_beyond_its_limit_says_the_limit_and_why(
    tmp_path: Path, override: str, key: str
) -> None:
    line = one_line_error(invoke(*simulate(tmp_path, override)), code=EXIT_CONFIG)
    assert line.startswith(f"config error: {key} = ")
    assert " is above the limit of " in line
    reason = line.partition(" is above the limit of ")[2].partition(": ")[2]
    assert len(reason) > 10  # the why


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (["data.dataset='gaussian'", "data.num_features=60000", "data.num_classes=2000"],
         "data.num_features"),
        (["data.dataset='gaussian'", "data.num_features=60000", "data.samples_per_client=5000"],
         "data.samples_per_client"),
    ],
)  # fmt: skip
def test_the_built_in_data_and_model_fit_in_memory_together(
    tmp_path: Path, data: list[str], key: str
) -> None:
    line = one_line_error(invoke(*simulate(tmp_path, *data)), code=EXIT_CONFIG)
    assert f"{key} = " in line and "would need" in line and "MiB allowed" in line


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "+inf"])
@pytest.mark.parametrize(
    "key",
    [
        "client.learning_rate",
        "round.deadline_s",
        "round.quorum",
        "data.dirichlet_alpha",
        "strategy.server_learning_rate",
        "privacy.clip_norm",
        "coordinator.retry_after_s",
        "devices.speed_jitter",
    ],
)
def test_a_number_that_is_not_finite_is_refused_from_set(
    tmp_path: Path, key: str, value: str
) -> None:
    line = one_line_error(invoke(*simulate(tmp_path, f"{key}={value}")), code=EXIT_CONFIG)
    assert f"{key} = " in line and "must be finite" in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # each passed the config before and raised from deep inside the run
        (['run.name="a\\u0000b"'], "run.name: a run name is printable characters"),  # NUL
        (["run.name='../elsewhere'"], "without '/'"),  # and a run folder outside runs/
        (["data.test_fraction=0.004"], "data.test_fraction = 0.004 leaves 8 of digits' 1797"),
        (["data.test_fraction=0.999999"], "use 0.006 to 0.994"),  # scikit-learn's ValueError
        (["client.dp_sgd=true", "client.dp_sgd_noise_multiplier=1e-300"],
         "client.dp_sgd_noise_multiplier: a noise multiplier is 0 (none) or at least 1e-06"),
        (["privacy.placement='central'", "privacy.noise_multiplier=1e-300"],
         "privacy.noise_multiplier: a noise multiplier is 0"),  # ZeroDivisionError
        (["canaries.enabled=true", "canaries.count=10000", "canaries.repeats=10000"],
         "count * repeats = 100,000,000 canary copies is above the limit"),  # 23.8 GiB asked
    ],
)  # fmt: skip
def test_a_value_the_run_cannot_work_with_is_one_line(
    tmp_path: Path, overrides: list[str], expected: str
) -> None:
    line = one_line_error(invoke(*simulate(tmp_path, *overrides)), code=EXIT_CONFIG)
    assert expected in line


def test_a_learning_rate_of_inf_in_a_file_is_refused(tmp_path: Path) -> None:
    """The issue's case: accepted before, then every client failed in every round."""
    config = tmp_path / "job.toml"
    config.write_text("[client]\nlearning_rate = inf\n")
    result = invoke("simulate", config, "--out", tmp_path / "run", *SMALL)  # the file's value
    one_line_error(
        result,
        code=EXIT_CONFIG,
        contains=("client.learning_rate = inf: every number of the config must be finite",),
    )
    assert not (tmp_path / "run").exists()


def test_a_device_class_that_is_not_finite_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('[[devices.classes]]\nname = "phone"\nshare = 1.0\nupload_mbps = nan\n')
    one_line_error(
        invoke("simulate", config, "--out", tmp_path / "run", *SMALL),
        code=EXIT_CONFIG,
        contains=("devices.classes.0.upload_mbps = nan",),
    )


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:99999", "127.0.0.1", "garbage", ":50051", "127.0.0.1:-1", "h:5x"]
)
def test_a_malformed_listen_address_is_a_config_error(tmp_path: Path, listen: str) -> None:
    """Port 99999 used to be wrapped around by gRPC to 34463, where the clients found it too."""
    (tmp_path / "job.toml").write_text("")
    result = invoke(
        "coordinator", "serve", "--config", tmp_path / "job.toml", "--insecure",
        "--set", f"coordinator.listen='{listen}'",
    )  # fmt: skip
    one_line_error(
        result, code=EXIT_CONFIG, contains=("coordinator.listen: expected HOST:PORT", repr(listen))
    )
    assert not (tmp_path / "coordinator-state").exists()
