"""Which devices a simulated round examines, and which of them the run may select.

A live coordinator sees the devices that check in; the simulator examines a
uniform random sample of the fleet sized by the cohort it needs, not the
whole fleet: :data:`EXAMINED_PER_MEMBER` devices per cohort member, at
least :data:`MIN_EXAMINED`. Of the sample, the devices online this round
are screened by the run's eligibility policy (:meth:`Run.screen`, whose
``excluded`` counts then count these examined candidates); when too few
pass, a sample four times larger is examined instead, up to the whole
fleet. The cohort is then drawn from the sample's eligible devices, which
is a uniform draw from the fleet's eligible devices.

The whole fleet is examined when it is no larger than the sample (the
draws are then exactly those of :meth:`DeviceFleet.available`), and in a
DP run's fit rounds: the whole eligible population is what a DP round
samples from and accounts for, so those rounds stay O(population).
"""

from __future__ import annotations

import numpy as np

from shoal.coordinator.run import Run
from shoal.coordinator.schedule import Play
from shoal.coordinator.selection import Stream, cohort_size, round_rng
from shoal.simulation.device_states import Indices
from shoal.simulation.devices import DeviceFleet
from shoal.tasks import Phase

EXAMINED_PER_MEMBER = 16
MIN_EXAMINED = 1024
_WIDER = 4


def examined_size(members: int) -> int:
    """How many devices a round that needs ``members`` examines first."""
    return max(MIN_EXAMINED, EXAMINED_PER_MEMBER * members)


def members_needed(lifecycle: Run, phase: Phase) -> int:
    """The cohort the engine will draw for ``phase``: what a sample must hold, at least."""
    settings = lifecycle.parts.settings
    return cohort_size(target=settings.target(phase), over_selection=settings.over_selection)


def examines_whole_fleet(lifecycle: Run, fleet: DeviceFleet, play: Play) -> bool:
    """Whether ``play`` examines every device (a small fleet, or a DP fit round)."""
    private = lifecycle.privacy is not None and play.phase is Phase.FIT
    return private or len(fleet) <= examined_size(members_needed(lifecycle, play.phase))


def candidates(lifecycle: Run, fleet: DeviceFleet, play: Play, *, at: float) -> tuple[str, ...]:
    """The devices of ``fleet`` that are online and eligible for ``play`` at virtual time ``at``."""
    needed = members_needed(lifecycle, play.phase)
    if examines_whole_fleet(lifecycle, fleet, play):
        return _screened(lifecycle, fleet, play, fleet.available_indices(play.round), at)
    rng = round_rng(seed=fleet.seed, round_number=play.round, stream=Stream.EXAMINATION)
    size = examined_size(needed)
    while size < len(fleet):
        sample: Indices = np.sort(rng.choice(len(fleet), size=size, replace=False))
        online = sample[fleet.online(play.round, sample)]
        found = _screened(lifecycle, fleet, play, online, at)
        if len(found) >= needed:
            return found
        size *= _WIDER
    return _screened(lifecycle, fleet, play, fleet.available_indices(play.round), at)


def _screened(
    lifecycle: Run, fleet: DeviceFleet, play: Play, indices: Indices, at: float
) -> tuple[str, ...]:
    if lifecycle.eligibility.active:
        indices = indices[lifecycle.screen(play, fleet.facts(indices, at=at))]
    names = fleet.client_ids
    return tuple(names[index] for index in indices.tolist())
