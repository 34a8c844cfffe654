"""The client app's device-state provider: what a user's app says about its device, checked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from shoal.client.app import ClientApp, ClientContext, device_state_of, load_attribute
from shoal.core import ConfigError, DeviceState

CONTEXT = ClientContext(client_id="phone-1", options={"charging": "yes"})


def test_a_partial_mapping_leaves_every_other_fact_unknown() -> None:
    state = device_state_of({"charging": True, "idle": False})
    assert (state.charging, state.idle) == (True, False)
    assert (state.wifi, state.battery_level, state.ram_gb) == (None, None, None)
    assert device_state_of({}) == DeviceState()
    whole = DeviceState(device_class="phone", wifi=True)
    assert device_state_of(whole) is whole


def test_without_a_provider_nothing_is_invented() -> None:
    app = ClientApp(lambda context: None)  # type: ignore[arg-type, return-value]
    assert app.report_device_state(CONTEXT) == DeviceState()


def test_the_provider_is_told_its_client_context() -> None:
    seen: list[ClientContext] = []

    def device_state(context: ClientContext) -> dict[str, Any]:
        seen.append(context)
        return {"charging": context.options["charging"] == "yes"}

    app = ClientApp(lambda context: None, device_state=device_state)  # type: ignore[arg-type, return-value]
    assert app.report_device_state(CONTEXT).charging is True
    assert seen == [CONTEXT]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({"charging": True, "plugged": True}, "unknown fields plugged"),
        ({"battery_level": 1.5}, "battery_level must lie in"),
        ({"app_version": ""}, "app_version must have"),
        ([("charging", True)], "not a DeviceState or a mapping"),
        (None, "not a DeviceState or a mapping"),
    ],
)
def test_a_bad_state_is_one_clear_error(returned: object, message: str) -> None:
    app = ClientApp(lambda context: None, device_state=lambda context: returned)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigError, match=message):
        app.report_device_state(CONTEXT)


def test_a_provider_that_raises_is_one_clear_error() -> None:
    def broken(context: ClientContext) -> dict[str, Any]:
        raise OSError("no battery service")

    app = ClientApp(lambda context: None, device_state=broken)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigError, match="provider failed: OSError: no battery service"):
        app.report_device_state(CONTEXT)


def test_two_jobs_whose_apps_share_a_module_name_each_get_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs in one process (a notebook), each with its own ``app.py``: the second job
    got the first one's module, silently, from ``sys.modules``."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "app", raising=False)
    for job in ("first", "second"):
        (tmp_path / job).mkdir()
        (tmp_path / job / "app.py").write_text(f"NAME = {job!r}\n")
    assert load_attribute("app:NAME", search_path=[tmp_path / "first"]) == "first"
    assert load_attribute("app:NAME", search_path=[tmp_path / "second"]) == "second"
    assert load_attribute("app:NAME", search_path=[tmp_path / "first"]) == "first"
    monkeypatch.delitem(sys.modules, "app", raising=False)
