"""The selector: N eligible clients drawn uniformly at random, without scanning the table.

It answers the seed's query: "N clients that are charging, on WiFi, running
app version >= X, with at least Y GB of RAM, seen within T", and also
ACTIVE (not suspended or retired), not expired and compatible with the
versioning matrix of the model. Every condition is a SQL predicate on the
clients table; :meth:`Selector.check` evaluates the same conditions in
Python to tell one client why it was not eligible. A criterion on a fact
the client did not report (charging, WiFi or RAM stored as NULL) is not
met: the SQL comparison with NULL is not true, and the Python check says the
fact is unknown. A selection that asks nothing of a fact ignores it.

How the sample is drawn (:meth:`Selector.select`)
-------------------------------------------------
Each client carries a ``sample_key``, uniform in [0, 2^63), indexed as
``(status, sample_key)``. A selection draws a random start in [0, 2^63) and
reads the next ``window`` eligible rows in key order (``status = 'ACTIVE'
AND sample_key >= start AND <filters> ORDER BY sample_key LIMIT window``,
wrapping around to 0), repeating from fresh random starts until it holds a
pool of ``oversample * count`` distinct clients (or every eligible one),
then picks ``count`` of the pool uniformly at random. Each window is an
index range scan that stops after about ``window / (the fraction of ACTIVE
clients that pass the other filters)`` rows: the cost follows ``count``,
never the size of the table (unless almost no client is eligible, when any
method must look at every candidate to find out).

What "uniform" means here. Starts are uniform over the key space, so a
client lands in a window when a start falls in the stretch of key space
just before it: with the keys held fixed, its chance is proportional to the
width of the ``window`` key gaps preceding it, a Gamma(window) variable of
relative spread ``1/sqrt(window)`` (6 % for the default 256). Averaged over
the keys' own randomness every eligible client has exactly the same chance,
but fixed keys would favour the same clients round after round. So, by
default, the chosen clients get fresh random keys in the same transaction
(``refresh_keys``): a client keeps its advantage or handicap only until it
is next chosen. The process treats all eligible clients alike, so over many
selections each one's frequency converges to exactly ``count / eligible``;
and since a deviation lasts at most as long as the client goes unchosen,
it inflates the variance of a client's count over any number of draws by a
factor of at most about ``1 + 2/window`` (with fixed keys the excess would
grow with the number of draws). Taking ``count`` of a larger pool, from
several starts, also keeps neighbours in key order from being chosen
together. The tests check the frequencies with a chi-square test and show
that the same test rejects the fixed-key variant.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shoal.config import SelectionSection
from shoal.core.errors import ConfigError, RegistryError
from shoal.registry.clients import (
    SAMPLE_KEY_LIMIT,
    ClientRecord,
    ClientRegistry,
    require_aware,
    utc_now,
)
from shoal.registry.schema import ClientStatus, clients
from shoal.registry.versioning import (
    Eligibility,
    Requirement,
    VersionMatrix,
    unmet_requirements,
    version_key,
)

DEFAULT_WINDOW = 256
DEFAULT_OVERSAMPLE = 2.0


TRANSIENT_CRITERIA = frozenset({"charging", "wifi", "idle", "battery", "ram"})
"""Criteria on what a device is doing now (power, network, use, free memory): a client that
fails only these is told to come back later; failing any other makes it incompatible."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectionCriteria:
    """What a client must be to be selected, beyond being ACTIVE and not expired.

    ``model`` names the versioning-matrix entry (the model's architecture
    version) whose requirements apply, together with ``requirements`` (the
    job's own, from its config); None applies only ``requirements``.
    ``min_battery`` is a share of a full battery (0.5 is 50 %).
    """

    model: str | None = None
    require_charging: bool = True
    require_wifi: bool = True
    require_idle: bool = False
    min_battery: float = 0.0
    min_app_version: str | None = None
    min_ram_gb: float = 0.0
    seen_within: timedelta | None = None
    device_classes: frozenset[str] | None = None
    requirements: tuple[Requirement, ...] = ()

    def __post_init__(self) -> None:
        if self.min_app_version is not None and version_key(self.min_app_version) is None:
            raise ConfigError(
                f"min_app_version {self.min_app_version!r} is not a dotted numeric version"
            )
        if not (math.isfinite(self.min_ram_gb) and self.min_ram_gb >= 0):
            raise ConfigError(f"min_ram_gb must be a finite number >= 0, got {self.min_ram_gb}")
        if not 0.0 <= self.min_battery <= 1.0:  # and NaN
            raise ConfigError(f"min_battery must lie in [0, 1], got {self.min_battery}")
        if self.seen_within is not None and self.seen_within <= timedelta(0):
            raise ConfigError(f"seen_within must be positive, got {self.seen_within}")
        if self.device_classes is not None and not self.device_classes:
            raise ConfigError("device_classes, when given, cannot be empty")

    @classmethod
    def from_section(
        cls,
        section: SelectionSection,
        *,
        model: str | None,
        seen_within: timedelta | None = None,
        requirements: tuple[Requirement, ...] = (),
    ) -> SelectionCriteria:
        """The criteria of a job's ``[selection]`` policy (every criterion off by default)."""
        classes = section.device_classes
        return cls(
            model=model,
            require_charging=section.require_charging,
            require_wifi=section.require_wifi,
            require_idle=section.require_idle,
            min_battery=section.min_battery,
            min_app_version=section.min_app_version,
            min_ram_gb=section.min_ram_gb,
            seen_within=seen_within,
            device_classes=None if classes is None else frozenset(classes),
            requirements=requirements,
        )


def eligible_clause(
    criteria: SelectionCriteria, requirements: tuple[Requirement, ...], *, now: datetime
) -> sa.ColumnElement[bool]:
    """The SQL condition on the clients table that :meth:`Selector.check` states in Python.

    A comparison with NULL (an unknown fact) is not true: unknown is not met.
    """
    conditions: list[sa.ColumnElement[bool]] = [
        clients.c.status == ClientStatus.ACTIVE,
        sa.or_(clients.c.expires_at.is_(None), clients.c.expires_at > now),
    ]
    if criteria.require_charging:
        conditions.append(clients.c.charging == sa.true())
    if criteria.require_wifi:
        conditions.append(clients.c.wifi == sa.true())
    if criteria.require_idle:
        conditions.append(clients.c.idle == sa.true())
    if criteria.min_battery > 0:
        conditions.append(clients.c.battery_level >= criteria.min_battery)
    if criteria.min_ram_gb > 0:
        conditions.append(clients.c.ram_gb >= criteria.min_ram_gb)
    if criteria.min_app_version is not None:
        conditions.append(clients.c.app_version_key >= version_key(criteria.min_app_version))
    if criteria.seen_within is not None:
        conditions.append(clients.c.last_seen >= now - criteria.seen_within)
    if criteria.device_classes is not None:
        conditions.append(clients.c.device_class.in_(sorted(criteria.device_classes)))
    conditions.extend(requirement.clause() for requirement in requirements)
    return sa.and_(*conditions)


def _flag_reason(value: bool | None, *, unknown: str, no: str) -> str | None:
    return unknown if value is None else None if value else no


def unmet_criteria(
    client: ClientRecord,
    criteria: SelectionCriteria,
    requirements: tuple[Requirement, ...],
    *,
    now: datetime,
) -> dict[str, str]:
    """Why ``client`` fails ``criteria``, by criterion (empty when it is eligible).

    The keys are the names of :meth:`SelectionSection.criteria`, plus
    ``versions`` (the versioning matrix and the job's requirements),
    ``status`` (suspended, retired or expired) and ``seen`` (not seen lately).
    """
    device, unmet = client.device, {}
    barred = client.barred_reasons(now=now)
    if barred:
        unmet["status"] = "; ".join(barred)
    if criteria.seen_within is not None and client.last_seen < now - criteria.seen_within:
        unmet["seen"] = (
            f"last seen at {client.last_seen.isoformat()}, not within {criteria.seen_within}"
        )
    flags = {
        "charging": (criteria.require_charging, device.charging, "charging", "not charging"),
        "wifi": (criteria.require_wifi, device.wifi, "WiFi", "not on WiFi"),
        "idle": (criteria.require_idle, device.idle, "idleness", "not idle"),
    }
    for name, (required, value, fact, no) in flags.items():
        reason = _flag_reason(value, unknown=f"{fact} is unknown", no=no) if required else None
        if reason is not None:
            unmet[name] = reason
    battery, least = device.battery_level, criteria.min_battery
    if least > 0 and battery is None:
        unmet["battery"] = f"the battery level is unknown, and the minimum is {least:.0%}"
    elif least > 0 and battery is not None and battery < least:
        unmet["battery"] = f"the battery at {battery:.0%} is below the minimum {least:.0%}"
    ram, ram_floor = device.ram_gb, criteria.min_ram_gb
    if ram_floor > 0 and ram is None:
        unmet["ram"] = f"RAM is unknown, and the minimum is {ram_floor:g} GB"
    elif ram_floor > 0 and ram is not None and ram < ram_floor:
        unmet["ram"] = f"{ram:g} GB of RAM is below the minimum {ram_floor:g}"
    if criteria.min_app_version is not None:
        app = _app_version_reason(device.app_version, criteria.min_app_version)
        if app is not None:
            unmet["app_version"] = app
    if criteria.device_classes is not None and device.device_class not in criteria.device_classes:
        unmet["device_class"] = f"device class {device.device_class} is not selected"
    model = criteria.model or "this job"
    versions = unmet_requirements(device, requirements, model=model)
    if versions:
        unmet["versions"] = "; ".join(versions)
    return unmet


def _app_version_reason(version: str, minimum: str) -> str | None:
    key, minimum_key = version_key(version), version_key(minimum)
    if key is None:
        return f"app version {version!r} is not a comparable version"
    if minimum_key is not None and key < minimum_key:
        return f"app version {version} is below the minimum {minimum}"
    return None


def ineligibility_reasons(
    client: ClientRecord,
    criteria: SelectionCriteria,
    requirements: tuple[Requirement, ...],
    *,
    now: datetime,
) -> list[str]:
    """Every reason ``client`` fails ``criteria`` (empty when it is eligible)."""
    return list(unmet_criteria(client, criteria, requirements, now=now).values())


class Selector:
    """Draws cohorts from a client registry, honouring a versioning matrix."""

    def __init__(
        self,
        registry: ClientRegistry,
        matrix: VersionMatrix | None = None,
        *,
        window: int = DEFAULT_WINDOW,
        oversample: float = DEFAULT_OVERSAMPLE,
    ) -> None:
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        if not (math.isfinite(oversample) and oversample >= 1):
            raise ConfigError(f"oversample must be >= 1, got {oversample}")
        self.registry = registry
        self.matrix = matrix if matrix is not None else VersionMatrix(registry.database)
        self.window = window
        self.oversample = oversample

    def requirements(self, criteria: SelectionCriteria) -> tuple[Requirement, ...]:
        """The matrix's requirements of the criteria's model (read now), then the job's own."""
        matrix = () if criteria.model is None else self.matrix.requirements(criteria.model)
        return matrix + criteria.requirements

    def check(
        self, client: ClientRecord, criteria: SelectionCriteria, *, now: datetime | None = None
    ) -> Eligibility:
        """Whether ``client`` could be selected under ``criteria``, and if not, why."""
        return Eligibility.rejected(list(self.unmet(client, criteria, now=now).values()))

    def unmet(
        self, client: ClientRecord, criteria: SelectionCriteria, *, now: datetime | None = None
    ) -> dict[str, str]:
        """Why ``client`` could not be selected under ``criteria``, by criterion
        (:func:`unmet_criteria`; empty when it could)."""
        now = require_aware(now or utc_now(), "now")
        return unmet_criteria(client, criteria, self.requirements(criteria), now=now)

    def population(self, criteria: SelectionCriteria, *, now: datetime | None = None) -> list[str]:
        """Every eligible client id, sorted: the population a DP round samples from.

        One index scan of the eligible rows (a DP population is listed whole,
        since its size is what privacy is accounted for); read-only.
        """
        now = require_aware(now or utc_now(), "now")
        condition = eligible_clause(criteria, self.requirements(criteria), now=now)
        query = sa.select(clients.c.client_id).where(condition).order_by(clients.c.client_id)
        with self.registry.database.read() as connection:
            return list(connection.execute(query).scalars())

    def count(
        self,
        criteria: SelectionCriteria,
        *,
        now: datetime | None = None,
        excluding: Collection[str] = (),
    ) -> int:
        """How many clients are eligible, ``excluding`` some (a count; nothing is listed)."""
        now = require_aware(now or utc_now(), "now")
        condition = eligible_clause(criteria, self.requirements(criteria), now=now)
        if excluding:
            condition = sa.and_(condition, clients.c.client_id.not_in(sorted(excluding)))
        query = sa.select(sa.func.count()).select_from(clients).where(condition)
        with self.registry.database.read() as connection:
            return int(connection.execute(query).scalar_one())

    def select(
        self,
        criteria: SelectionCriteria,
        count: int,
        *,
        rng: np.random.Generator | int | None = None,
        now: datetime | None = None,
        refresh_keys: bool = True,
    ) -> list[str]:
        """Up to ``count`` distinct eligible client ids, in random order.

        Fewer come back only when fewer are eligible. ``rng`` (a generator
        or a seed) makes the draw reproducible for a given database state.
        ``refresh_keys=False`` makes the selection read-only, at the price
        of the fixed-key bias the module docstring describes.
        """
        if count < 0:
            raise RegistryError(f"count must be >= 0, got {count}")
        now = require_aware(now or utc_now(), "now")
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        if count == 0:
            return []
        condition = eligible_clause(criteria, self.requirements(criteria), now=now)
        database = self.registry.database
        transaction = database.write() if refresh_keys else database.read()
        with transaction as connection:
            chosen = self._draw(connection, condition, count, generator)
            if refresh_keys and chosen:
                _assign_new_keys(connection, chosen, generator)
        return chosen

    def _draw(
        self,
        connection: Connection,
        condition: sa.ColumnElement[bool],
        count: int,
        rng: np.random.Generator,
    ) -> list[str]:
        """``count`` ids picked at random from a pool gathered by windows from random starts."""
        pool_size = max(count, math.ceil(self.oversample * count))
        pool: dict[str, None] = {}
        for _ in range(4 * math.ceil(pool_size / self.window) + 8):
            window = _window(connection, condition, _random_key(rng), self.window)
            pool.update(dict.fromkeys(window))
            if len(pool) >= pool_size or len(window) < self.window:
                break  # a window that wraps short has seen every eligible client
        else:
            # the windows kept overlapping: the eligible clients barely outnumber a window
            pool.update(dict.fromkeys(_window(connection, condition, _random_key(rng), pool_size)))
        ids = list(pool)
        picks = rng.choice(len(ids), size=min(count, len(ids)), replace=False)
        return [ids[index] for index in picks]


def _random_key(rng: np.random.Generator) -> int:
    return int(rng.integers(0, SAMPLE_KEY_LIMIT, dtype=np.int64))


def _window(
    connection: Connection, condition: sa.ColumnElement[bool], start: int, size: int
) -> list[str]:
    """The ids of the first ``size`` eligible clients from ``start`` in key order, wrapping."""
    query = sa.select(clients.c.client_id).order_by(clients.c.sample_key)
    ids = list(
        connection.execute(
            query.where(condition, clients.c.sample_key >= start).limit(size)
        ).scalars()
    )
    if len(ids) < size:
        wrapped = query.where(condition, clients.c.sample_key < start).limit(size - len(ids))
        ids.extend(connection.execute(wrapped).scalars())
    return ids


def _assign_new_keys(
    connection: Connection, client_ids: list[str], rng: np.random.Generator
) -> None:
    keys = rng.integers(0, SAMPLE_KEY_LIMIT, size=len(client_ids), dtype=np.int64)
    statement = (
        sa.update(clients)
        .where(clients.c.client_id == sa.bindparam("b_client_id"))
        .values(sample_key=sa.bindparam("b_sample_key"))
    )
    connection.execute(
        statement,
        [
            {"b_client_id": client_id, "b_sample_key": int(key)}
            for client_id, key in zip(client_ids, keys, strict=True)
        ],
    )
