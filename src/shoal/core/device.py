"""What a device says about itself: the seed's registry record, shared by wire and registry.

A client reports its ``DeviceState`` at enrollment, at every check-in and in
heartbeats; the registry stores it, the selector filters on it, and the
versioning matrix checks its four versions. One definition serves all three.

Power, network, idleness and memory are None when the client did not report them (a
server has no battery; a simulated fleet models none of them): unknown, not
a default. Every layer keeps them unknown: the wire leaves the field unset,
the registry stores NULL, ``shoal clients`` prints "unknown", and a
selection criterion on a fact (charging, WiFi, a minimum of RAM) never
accepts a client whose fact is unknown, while a selection that asks nothing
of it still may pick the client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.core.errors import ProtocolError

MAX_TEXT = 64


def _check_text(value: str, what: str) -> None:
    """1 to :data:`MAX_TEXT` printable characters: a device's texts are printed on the
    operator's terminal (``shoal clients list``) and logged, where a control character
    (an escape sequence, a newline) would act."""
    if not (0 < len(value) <= MAX_TEXT and value.isprintable()):
        raise ProtocolError(
            f"{what} must have 1 to {MAX_TEXT} printable characters, got {value[:MAX_TEXT]!r}"
        )


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device's class, power, network, memory and the versions it runs.

    ``battery_level``, ``charging``, ``wifi``, ``idle`` and ``ram_gb`` are None when
    unknown; ``feature_extractor_version`` is None for a client without a
    portable feature extractor. Bad values raise :class:`ProtocolError`.
    """

    device_class: str = "server"
    battery_level: float | None = None
    charging: bool | None = None
    wifi: bool | None = None
    app_version: str = "1.0.0"
    runtime_version: str = "1.0.0"
    model_architecture_version: str = "1"
    feature_extractor_version: str | None = None
    ram_gb: float | None = None
    idle: bool | None = None

    def __post_init__(self) -> None:
        _check_text(self.device_class, "device_class")
        for name in ("app_version", "runtime_version", "model_architecture_version"):
            _check_text(getattr(self, name), name)
        if self.feature_extractor_version is not None:
            _check_text(self.feature_extractor_version, "feature_extractor_version")
        if self.battery_level is not None and not 0.0 <= self.battery_level <= 1.0:  # and NaN
            raise ProtocolError(f"battery_level must lie in [0, 1], got {self.battery_level!r}")
        if self.ram_gb is not None and not (math.isfinite(self.ram_gb) and self.ram_gb >= 0):
            raise ProtocolError(f"ram_gb must be a finite number >= 0, got {self.ram_gb!r}")
