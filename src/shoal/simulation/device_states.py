"""Simulated device states over virtual time: time zones, the diurnal cycle, battery, versions.

Nothing here is stored per device and per moment. Every fact of device
``i`` is computed on demand, for the devices the simulator examines, from a
keyed hash of (run seed, purpose, ``i``, and a local day or hour): the same
seed gives the same fleet in the same states, in any process, in any order,
and a resumed run sees what an uninterrupted one saw. The one history is
the battery that training drained (:meth:`DeviceStateModel.drain`), which
the simulator records in each round's row and replays on resume.

A device's local hour is ``devices.start_utc_hour`` plus the virtual hours
plus its UTC offset. The cycle of a class with ``states`` (see
:class:`~shoal.config.DeviceStates`): each local night ``n`` runs from about
``charging_hours[0]`` to ``charging_hours[1]``, each end moved by up to
``charging_jitter_h``; the phone is plugged in that night with probability
``nightly_charging`` and is idle and on WiFi at night or by day with their
probabilities, one draw per local hour. Its battery starts each morning
full after a night on the charger (between 15 % and 60 % after a night
off it), drains by the hour and by training, and charges at night.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from shoal.config import DeviceClass, DevicesSection, DeviceStates, utc_offset_hours
from shoal.coordinator.eligibility import DeviceFacts
from shoal.core.device import DeviceState
from shoal.registry.versioning import Component

Indices = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
_Words = npt.NDArray[np.uint64]
Debt = tuple[float, float]  # (local hour, battery share drained)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_UNPLUGGED_MORNING = (0.15, 0.60)  # the battery's range the morning after a night off the charger
_NIGHTS_BACK = 2  # a night that began two local days ago may still run (a long, late window)


class Draw(enum.IntEnum):
    """Purpose codes that keep the hashed draws of one device independent."""

    ONLINE = 1
    TIME_ZONE = 2
    APP_VERSION = 3
    RUNTIME_VERSION = 4
    NIGHT_START = 5
    NIGHT_END = 6
    PLUGGED = 7
    DAY_CHARGING = 8
    WIFI = 9
    IDLE = 10
    MORNING = 11


def _mix(words: _Words) -> _Words:
    """SplitMix64's finalizer: a bijection of 64-bit words whose output bits look random."""
    words = words ^ (words >> np.uint64(30))
    words = words * np.uint64(0xBF58476D1CE4E5B9)
    words = words ^ (words >> np.uint64(27))
    words = words * np.uint64(0x94D049BB133111EB)
    mixed: _Words = words ^ (words >> np.uint64(31))
    return mixed


def hashed_uniform(
    *, seed: int, draw: Draw, indices: Indices, slot: npt.NDArray[np.int64] | int = 0
) -> Floats:
    """A uniform number in [0, 1) for each device of ``indices``, keyed by seed, purpose, slot."""
    key = np.full(1, (seed * _GOLDEN + int(draw)) & _MASK64, dtype=np.uint64)
    slots = np.broadcast_to(np.asarray(slot, dtype=np.int64), indices.shape)
    words = _mix(indices.astype(np.int64).view(np.uint64) ^ _mix(key))
    words = _mix(words ^ (slots.view(np.uint64) * np.uint64(_GOLDEN)))
    uniform: Floats = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return uniform


def _pick(mix: Mapping[str, float], uniform: Floats) -> npt.NDArray[np.int64]:
    """The entry of ``mix`` each uniform number falls in, by cumulative share."""
    shares = np.array(list(mix.values()), dtype=np.float64)
    edges = np.cumsum(shares / shares.sum())
    picked: npt.NDArray[np.int64] = np.minimum(
        np.searchsorted(edges, uniform, side="right"), len(shares) - 1
    ).astype(np.int64)
    return picked


class DeviceStateModel:
    """The states of a fleet's devices; ``classes[i]`` is the class code of device ``i``."""

    def __init__(self, settings: DevicesSection, classes: npt.NDArray[np.int16], *, seed: int):
        self.settings = settings
        self.classes = classes
        self.seed = seed
        self._debts: dict[int, list[tuple[float, float]]] = {}  # device: (virtual s, drained)

    # --- static facts ---------------------------------------------------------------------

    def utc_offsets(self, indices: Indices) -> Floats:
        """Each device's UTC offset in hours (its class's time-zone mix, else the fleet's)."""
        offsets = np.zeros(len(indices), dtype=np.float64)
        uniform = hashed_uniform(seed=self.seed, draw=Draw.TIME_ZONE, indices=indices)
        for code, device in self._present(indices):
            mine = self.classes[indices] == code
            zones = device.time_zones or self.settings.time_zones
            hours = np.array([utc_offset_hours(name) for name in zones], dtype=np.float64)
            offsets[mine] = hours[_pick(zones, uniform[mine])]
        return offsets

    def versions(self, indices: Indices, component: Component) -> npt.NDArray[np.object_]:
        """Each device's version of ``component`` (its class's mix, else DeviceState's default)."""
        default = getattr(DeviceState(), component.column)
        column = np.full(len(indices), default, dtype=object)
        draw = Draw.APP_VERSION if component is Component.APP else Draw.RUNTIME_VERSION
        uniform = hashed_uniform(seed=self.seed, draw=draw, indices=indices)
        for code, device in self._present(indices):
            mix = {
                Component.APP: device.app_versions,
                Component.RUNTIME: device.runtime_versions,
            }.get(component)
            if mix is not None:
                mine = self.classes[indices] == code
                names = np.array(list(mix), dtype=object)
                column[mine] = names[_pick(mix, uniform[mine])]
        return column

    def _present(self, indices: Indices) -> list[tuple[int, DeviceClass]]:
        codes = np.unique(self.classes[indices])
        return [(int(code), self.settings.classes[int(code)]) for code in codes]

    # --- facts at a virtual time ------------------------------------------------------------

    def facts(self, indices: Indices, *, at: float) -> DeviceFacts:
        """What devices ``indices`` report at virtual time ``at`` (NaN: not modelled)."""
        count = len(indices)
        unknown = np.full(count, np.nan)
        charging, wifi, idle = unknown.copy(), unknown.copy(), unknown.copy()
        battery, ram = unknown.copy(), unknown.copy()
        names = np.array([device.name for device in self.settings.classes], dtype=object)
        local = self.settings.start_utc_hour + at / 3600.0 + self.utc_offsets(indices)
        for code, device in self._present(indices):
            mine = self.classes[indices] == code
            if device.ram_gb is not None:
                ram[mine] = device.ram_gb
            if device.states is None:
                continue
            cycle = _Cycle(self, device.states, indices[mine], local[mine])
            charging[mine], wifi[mine], idle[mine] = cycle.charging, cycle.wifi, cycle.idle
            battery[mine] = cycle.battery(self._debts_since(indices[mine], cycle.morning_at))
        return DeviceFacts(
            charging=charging,
            wifi=wifi,
            idle=idle,
            battery_level=battery,
            ram_gb=ram,
            device_class=names[self.classes[indices]],
            versions={
                Component.APP: self.versions(indices, Component.APP),
                Component.RUNTIME: self.versions(indices, Component.RUNTIME),
                Component.MODEL_ARCHITECTURE: np.full(
                    count, DeviceState().model_architecture_version, dtype=object
                ),
                Component.FEATURE_EXTRACTOR: np.full(count, None, dtype=object),
            },
        )

    def local_hours(self, indices: Indices, *, at: float) -> Floats:
        """Each device's local hour of the day at virtual time ``at``."""
        local = self.settings.start_utc_hour + at / 3600.0 + self.utc_offsets(indices)
        hours: Floats = np.mod(local, 24.0)
        return hours

    # --- the battery that training drained ----------------------------------------------------

    def drain(self, index: int, *, at: float, amount: float) -> None:
        """Device ``index`` trained from virtual time ``at``, draining ``amount`` of its battery."""
        if amount > 0:
            self._debts.setdefault(index, []).append((at, amount))

    def _debts_since(self, indices: Indices, since_local: Floats) -> dict[int, list[Debt]]:
        """The drains since its last morning of each device that has any, by position in
        ``indices``, as (local hour, amount) in time order."""
        if not self._debts:
            return {}
        drained = np.fromiter(self._debts, dtype=np.int64, count=len(self._debts))
        positions = np.flatnonzero(np.isin(indices, drained))
        offsets = self.utc_offsets(indices[positions])
        found: dict[int, list[Debt]] = {}
        for position, offset in zip(positions.tolist(), offsets.tolist(), strict=True):
            local = self.settings.start_utc_hour + offset
            debts = [
                (local + at / 3600.0, amount)
                for at, amount in self._debts[int(indices[position])]
                if local + at / 3600.0 >= since_local[position]
            ]
            if debts:
                found[position] = sorted(debts)
        return found


class _Cycle:
    """One class's diurnal states for some of its devices at one moment (local hours)."""

    def __init__(
        self, model: DeviceStateModel, states: DeviceStates, indices: Indices, local: Floats
    ) -> None:
        self.states = states
        self.indices = indices
        self.local = local
        self.seed = model.seed
        day = np.floor(local / 24.0).astype(np.int64)
        nights = [day - back for back in range(_NIGHTS_BACK, -1, -1)]  # oldest first
        self.starts = [
            self._night_edge(n, Draw.NIGHT_START, states.charging_hours[0]) for n in nights
        ]
        length = (states.charging_hours[1] - states.charging_hours[0]) % 24.0
        self.ends = [
            np.maximum(
                self._night_edge(n, Draw.NIGHT_END, states.charging_hours[0] + length), s + 0.5
            )
            for n, s in zip(nights, self.starts, strict=True)
        ]
        self.plugged = [self._uniform(Draw.PLUGGED, n) < states.nightly_charging for n in nights]
        self.in_night = np.zeros(len(indices), dtype=bool)
        self.charging_night = np.zeros(len(indices), dtype=bool)
        self.night_start = np.full(len(indices), np.nan)
        self.morning_at = np.full(len(indices), -np.inf)
        self.morning_level = np.ones(len(indices))
        for night, start, end, plugged in zip(
            nights, self.starts, self.ends, self.plugged, strict=True
        ):
            inside = (start <= local) & (local < end)
            self.in_night |= inside
            self.charging_night |= inside & plugged
            self.night_start = np.where(inside, start, self.night_start)
            over = (end <= local) & (end > self.morning_at)
            low, high = _UNPLUGGED_MORNING
            level = np.where(plugged, 1.0, low + (high - low) * self._uniform(Draw.MORNING, night))
            self.morning_at = np.where(over, end, self.morning_at)
            self.morning_level = np.where(over, level, self.morning_level)
        hour = np.floor(local).astype(np.int64)
        by_day = self._uniform(Draw.DAY_CHARGING, hour) < states.daytime_charging
        self.charging = np.where(self.in_night, self.charging_night, by_day).astype(np.float64)
        self.wifi = self._hourly(Draw.WIFI, hour, states.wifi_at_night, states.wifi_by_day)
        self.idle = self._hourly(Draw.IDLE, hour, states.idle_at_night, states.idle_by_day)

    def _uniform(self, draw: Draw, slot: npt.NDArray[np.int64]) -> Floats:
        return hashed_uniform(seed=self.seed, draw=draw, indices=self.indices, slot=slot)

    def _night_edge(self, night: npt.NDArray[np.int64], draw: Draw, hour: float) -> Floats:
        jitter = self.states.charging_jitter_h * (2.0 * self._uniform(draw, night) - 1.0)
        edge: Floats = 24.0 * night + hour + jitter
        return edge

    def _hourly(
        self, draw: Draw, hour: npt.NDArray[np.int64], at_night: float, by_day: float
    ) -> Floats:
        chance = np.where(self.in_night, at_night, by_day)
        return (self._uniform(draw, hour) < chance).astype(np.float64)

    def battery(self, debts: Mapping[int, Sequence[Debt]]) -> Floats:
        """The battery level: the morning's, run forward through the day's drain, each
        training's drain (``debts``, by position) and the night's charge (a drain while
        charging is charged back from then on)."""
        everyone = np.arange(len(self.indices))
        level = self._run(self.morning_level, self.morning_at, self.local, everyone)
        for position, drains in debts.items():
            level[position] = self._battery_through(position, drains)
        rounded: Floats = np.round(level, 6)
        return rounded

    def _battery_through(self, position: int, drains: Sequence[Debt]) -> float:
        where = np.array([position])
        level, since = self.morning_level[where], self.morning_at[where]
        for hour, amount in drains:
            until = np.array([min(hour, float(self.local[position]))])
            level = np.clip(self._run(level, since, until, where) - amount, 0.0, 1.0)
            since = until
        return float(self._run(level, since, self.local[where], where)[0])

    def _run(self, level: Floats, since: Floats, until: Floats, where: Indices) -> Floats:
        """``level`` at local hour ``since``, run to ``until``: drained until the night's plug-in
        (all along on a night off the charger), then charged (capped at full)."""
        states, plugged = self.states, self.charging_night[where]
        since = np.where(np.isfinite(since), since, until)
        plug_in = np.where(
            plugged,
            np.where(np.isnan(self.night_start[where]), until, self.night_start[where]),
            until,
        )
        unplugged = np.maximum(np.minimum(until, plug_in) - since, 0.0)
        level = np.clip(level - states.drain_per_hour * unplugged, 0.0, 1.0)
        charged = np.maximum(until - np.maximum(since, plug_in), 0.0)
        ran: Floats = np.minimum(1.0, level + states.charge_per_hour * charged)
        return ran


def simulated_state(facts: DeviceFacts, position: int) -> DeviceState:
    """The :class:`DeviceState` of one examined device (what it would report at enrollment)."""

    def known(column: Floats) -> float | None:
        value = float(column[position])
        return None if np.isnan(value) else value

    def flag(column: Floats) -> bool | None:
        value = known(column)
        return None if value is None else value == 1.0

    versions = facts.versions
    return DeviceState(
        device_class=str(facts.device_class[position]),
        battery_level=known(facts.battery_level),
        charging=flag(facts.charging),
        wifi=flag(facts.wifi),
        idle=flag(facts.idle),
        ram_gb=known(facts.ram_gb),
        app_version=str(versions[Component.APP][position]),
        runtime_version=str(versions[Component.RUNTIME][position]),
    )


def class_codes(picks: Sequence[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.int16]:
    """Class picks stored compactly: a million devices' classes take 2 MB."""
    return np.asarray(picks, dtype=np.int16)
