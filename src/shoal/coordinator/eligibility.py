"""Who may train this round: the ``[selection]`` policy and the ``[versions]`` matrix, as one rule.

The simulator screens its sample of devices with :class:`EligibilityPolicy`
(as columns: one array per fact); the network coordinator reads each
check-in with the registry's per-client rule
(:func:`~shoal.registry.selector.unmet_criteria`) and selects with its SQL
twin. Both take the criteria from the run layer, and a property test holds
this rule to the registry's, device by device (:meth:`DeviceFacts.of`
builds its columns from reported states).
Each active criterion (the names of ``SelectionSection.criteria()``, and
``versions`` once a ``[[versions.require]]`` entry applies) gives a mask
of the devices it excludes; a device failing two criteria counts under
each, and only a device that fails none is eligible. A fact a device did
not report (NaN here) never meets a criterion on it.

Version checks are :class:`~shoal.registry.versioning.Requirement`'s,
made once per distinct version of a column, not once per device:

>>> from shoal.config import SelectionSection, VersionsSection
>>> policy = EligibilityPolicy(
...     SelectionSection(require_charging=True, min_app_version="2.4"), VersionsSection()
... )
>>> facts = DeviceFacts.of([DeviceState(charging=True, app_version="2.5.0"),
...                         DeviceState(charging=False, app_version="2.3.1"), DeviceState()])
>>> {name: mask.tolist() for name, mask in policy.failures(facts, round_number=1).items()}
{'charging': [False, True, True], 'app_version': [False, True, True]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shoal.config import SelectionSection, VersionsSection
from shoal.core.device import DeviceState
from shoal.registry.versioning import Component, Requirement

Facts = npt.NDArray[np.float64]
Texts = npt.NDArray[np.object_]
Mask = npt.NDArray[np.bool_]

VERSIONS = "versions"
"""The ``excluded`` key of the devices whose versions fail a ``[[versions.require]]`` entry."""


def _known(value: bool | float | None) -> float:
    return np.nan if value is None else float(value)


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What a set of devices reports, one array per fact (NaN: not reported).

    ``charging``, ``wifi`` and ``idle`` hold 1.0 or 0.0; ``versions`` holds,
    per component, each device's version (None for a component it lacks).
    """

    charging: Facts
    wifi: Facts
    idle: Facts
    battery_level: Facts
    ram_gb: Facts
    device_class: Texts
    versions: Mapping[Component, Texts] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.charging)

    @classmethod
    def of(cls, states: Sequence[DeviceState]) -> DeviceFacts:
        """The facts of devices as they reported them (a check-in, an enrollment)."""

        def column(values: Sequence[bool | float | None]) -> Facts:
            return np.array([_known(value) for value in values], dtype=np.float64)

        def texts(values: Sequence[str | None]) -> Texts:
            array = np.empty(len(values), dtype=object)
            array[:] = values
            return array

        return cls(
            charging=column([state.charging for state in states]),
            wifi=column([state.wifi for state in states]),
            idle=column([state.idle for state in states]),
            battery_level=column([state.battery_level for state in states]),
            ram_gb=column([state.ram_gb for state in states]),
            device_class=texts([state.device_class for state in states]),
            versions={
                component: texts([getattr(state, component.column) for state in states])
                for component in Component
            },
        )


def requirements_of(versions: VersionsSection, round_number: int) -> tuple[Requirement, ...]:
    """The ``[[versions.require]]`` entries that apply in ``round_number`` (from their round on)."""
    return tuple(
        Requirement(
            Component(entry.component),
            entry.minimum,
            None if entry.allowed is None else frozenset(entry.allowed),
        )
        for entry in versions.require
        if entry.from_round <= round_number
    )


class EligibilityPolicy:
    """The job's eligibility rule; see the module docstring. ``model`` names it in reasons."""

    def __init__(
        self,
        selection: SelectionSection,
        versions: VersionsSection,
        *,
        model: str = "global",
        matrix: Sequence[Requirement] = (),
    ) -> None:
        self.selection = selection
        self.versions = versions
        self.model = model
        self.matrix = tuple(matrix)  # the registry's requirements of the model, every round
        self._app_minimum = (
            None
            if selection.min_app_version is None
            else Requirement(Component.APP, minimum=selection.min_app_version)
        )

    def criteria(self, round_number: int) -> tuple[str, ...]:
        """The names of the criteria that apply in ``round_number``: the keys of ``excluded``."""
        names = self.selection.criteria()
        return (*names, VERSIONS) if self.requirements(round_number) else names

    def requirements(self, round_number: int) -> tuple[Requirement, ...]:
        """The version requirements of ``round_number``: the registry's matrix for the model
        (``shoal versions require``), then the job's ``[[versions.require]]`` from their round."""
        return (*self.matrix, *requirements_of(self.versions, round_number))

    @property
    def active(self) -> bool:
        """Whether any criterion may ever exclude a device."""
        return bool(self.selection.criteria() or self.versions.require or self.matrix)

    def failures(self, facts: DeviceFacts, *, round_number: int) -> dict[str, Mask]:
        """For each criterion that applies, the mask of the devices it excludes."""
        selection = self.selection
        tests: dict[str, Mask] = {}
        for name in self.criteria(round_number):
            if name == "charging":
                tests[name] = ~(facts.charging == 1.0)
            elif name == "wifi":
                tests[name] = ~(facts.wifi == 1.0)
            elif name == "idle":
                tests[name] = ~(facts.idle == 1.0)
            elif name == "battery":
                tests[name] = ~(facts.battery_level >= selection.min_battery)  # NaN: not met
            elif name == "ram":
                tests[name] = ~(facts.ram_gb >= selection.min_ram_gb)
            elif name == "app_version" and self._app_minimum is not None:
                tests[name] = self._failing(self._app_minimum, facts)
            elif name == "device_class":
                allowed = list(selection.device_classes or ())
                tests[name] = ~np.isin(facts.device_class.astype(str), allowed)
            elif name == VERSIONS:
                tests[name] = self._versions_fail(facts, round_number)
        return tests

    def screen(self, facts: DeviceFacts, *, round_number: int) -> Screening:
        """Which devices meet every criterion, and how many each criterion excluded."""
        failures = self.failures(facts, round_number=round_number)
        eligible = np.ones(len(facts), dtype=bool)
        for mask in failures.values():
            eligible &= ~mask
        excluded = {name: int(np.count_nonzero(mask)) for name, mask in failures.items()}
        return Screening(eligible, excluded)

    def _versions_fail(self, facts: DeviceFacts, round_number: int) -> Mask:
        failing = np.zeros(len(facts), dtype=bool)
        for requirement in self.requirements(round_number):
            failing |= self._failing(requirement, facts)
        return failing

    def _failing(self, requirement: Requirement, facts: DeviceFacts) -> Mask:
        """The devices whose version of the requirement's component fails it (checked per
        distinct version: a fleet runs a handful of versions)."""
        column = facts.versions.get(requirement.component)
        if column is None:  # the shell reported no versions of this component: unknown
            return np.ones(len(facts), dtype=bool)
        keyed = np.array(["\0" if version is None else version for version in column], dtype=str)
        distinct, inverse = np.unique(keyed, return_inverse=True)
        verdicts = np.array(
            [
                requirement.check(None if text == "\0" else str(text), model=self.model) is not None
                for text in distinct
            ],
            dtype=bool,
        )
        failing: Mask = verdicts[inverse.reshape(-1)]
        return failing


@dataclass(frozen=True, slots=True)
class Screening:
    """The devices a policy let through, and the count each criterion excluded."""

    eligible: Mask
    excluded: dict[str, int]
