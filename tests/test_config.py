"""Run configuration: defaults, overrides, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import (
    Config,
    apply_overrides,
    config_to_dict,
    default_config_path,
    load_config,
    parse_config,
)
from shoal.core import ConfigError


def test_empty_config_is_valid_with_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    config = load_config(empty)
    assert config == Config() == parse_config({})
    assert config.round.over_selection == 1.3 and config.round.quorum == 0.8
    assert parse_config(config_to_dict(config)) == config


def test_no_config_is_the_embedded_default_job_the_cli_runs() -> None:
    config = load_config(None)
    assert config == load_config(default_config_path())
    assert config.run.name == "digits-cross-device" and config.run.rounds == 100
    assert [device.name for device in config.devices.classes] == [
        "high-end-phone",
        "mid-range-phone",
        "budget-phone",
    ]


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("run.rounds=7", lambda c: c.run.rounds == 7),
        ("strategy.name=fedadam", lambda c: c.strategy.name == "fedadam"),
        ('strategy.name="fedyogi"', lambda c: c.strategy.name == "fedyogi"),
        ("client.epochs=0.5", lambda c: c.client.epochs == 0.5),
        ("evaluation.centralized=false", lambda c: c.evaluation.centralized is False),
        ("devices.classes=[{name='x', share=2.0}]", lambda c: c.devices.classes[0].share == 2.0),
    ],
)
def test_overrides_are_toml_values(override: str, check: object) -> None:
    assert check(load_config(None, [override]))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("run.name=2024", "run.name", "2024"),
        ("run.name=2024-01-01", "run.name", "2024-01-01"),
        ("run.name=true", "run.name", "true"),
        ("run.name=1e3", "run.name", "1e3"),
        ('run.name="2024"', "run.name", "2024"),
        ("run.name=my-run", "run.name", "my-run"),
        ("tracking.experiment=7", "tracking.experiment", "7"),  # optional text
        ("coordinator.run_id=42", "coordinator.run_id", "42"),  # constrained text
        ("data.dataset=digits", "data.dataset", "digits"),  # a choice of words
        ("round.quorum=0.5", "round.quorum", 0.5),
        ("run.seed=3", "run.seed", 3),
        ("evaluation.centralized=false", "evaluation.centralized", False),
        ("strategy.server_momentum=0.9", "strategy.server_momentum", 0.9),  # optional number
        (
            'coordinator.enrollment_tokens=["a", "2024"]',
            "coordinator.enrollment_tokens",
            ["a", "2024"],
        ),
    ],
)
def test_an_override_takes_the_type_of_its_field(
    override: str, field: str, expected: object
) -> None:
    section, key = field.split(".")
    value = getattr(getattr(load_config(None, [override]), section), key)
    assert value == expected and type(value) is type(expected)


def test_a_text_field_given_a_list_is_still_an_error() -> None:
    with pytest.raises(ConfigError, match=r"run\.name: Input should be a valid string"):
        load_config(None, ["run.name=[1, 2]"])


def test_overrides_apply_on_top_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[run]\nrounds = 3\nseed = 9\n")
    config = load_config(path, ["run.rounds=5"])
    assert (config.run.rounds, config.run.seed) == (5, 9)


def test_overrides_do_not_touch_the_input() -> None:
    data = {"run": {"rounds": 1}}
    merged = apply_overrides(data, ["run.rounds=2"])
    assert data == {"run": {"rounds": 1}} and merged == {"run": {"rounds": 2}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nope.key=1", "nope: unknown key"),
        (
            "round.clients_per_rund=5",
            "round.clients_per_rund: unknown key (did you mean clients_per_round?)",
        ),
        ("privcy.epsilon=1", "privcy: unknown key (did you mean privacy?)"),
        (
            "round.zzz=1",
            "round.zzz: unknown key; allowed: clients_per_round, over_selection, quorum",
        ),
        (
            "devices.classes=[{name='a', share=1, dropot=0.1}]",
            "devices.classes.0.dropot: unknown key (did you mean dropout?)",
        ),
        ("run.rounds=0", "run.rounds: Input should be greater than or equal to 1"),
        ("round.over_selection=0.9", "round.over_selection"),
        ("model.kind=cnn", "model.kind: Input should be 'softmax' or 'mlp', got 'cnn'"),
        ("strategy.aggregator=mode", "strategy.aggregator: unknown aggregator 'mode'"),
        ("round.clients_per_round=500", "exceeds data.num_clients"),
        ("devices.classes=[{name='a', share=1}, {name='a', share=1}]", "unique"),
        ("devices.classes=[]", "devices.classes"),
        ("tracking.mlflow.deep=1", "tracking.mlflow: Input should be a valid boolean"),
        ("rounds=3", "--set expects section.key=value"),
    ],
)
def test_mistakes_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_value_is_not_a_section() -> None:
    with pytest.raises(ConfigError, match=r"run.rounds: is a value, not a section"):
        load_config(None, ["run.rounds=3", "run.rounds.deep=1"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("run = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
