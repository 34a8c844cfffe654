"""The versioning matrix: which client software versions may train a given model.

For each model (named by its architecture version, such as
``mobilenet-v3``) the matrix holds at most one :class:`Requirement` per
:class:`Component` of the client's software: a minimum version, an explicit
set of allowed versions, or both. A client that fails any of them is never
selected for that model, and :meth:`VersionMatrix.check` says why:

>>> Requirement(Component.APP, minimum="2.4.0").check("2.3.0", model="mobilenet-v3")
'app version 2.3.0 is below the minimum 2.4.0 for model arch mobilenet-v3'

Versions are compared as versions ("2.10.0" > "2.4.1"): each is stored
beside its :func:`version_key`, a string whose byte order is the version
order, so the database compares them with an index. A model with no
requirement accepts every client.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from shoal.core.errors import ConfigError
from shoal.registry.database import Database
from shoal.registry.schema import clients, version_requirements

_VERSION = re.compile(r"[vV]?(\d+(?:\.\d+)*)")
_COMPONENT_WIDTH = 10
MAX_MODEL_NAME = 128
_MAX_COMPONENTS = 16


def version_key(version: str) -> str | None:
    """A string that sorts like the version, or None for a non-numeric version.

    Each dotted number becomes 10 zero-padded digits; trailing zeros are
    dropped so that "2.4" and "2.4.0" are equal. Pre-release tags and other
    text are not comparable: a minimum version never admits them.

    >>> version_key("2.10") > version_key("2.4.1")
    True
    >>> version_key("2.4.0") == version_key("2.4"), version_key("2.4.0-beta")
    (True, None)
    """
    match = _VERSION.fullmatch(version)
    if match is None:
        return None
    numbers = [int(part) for part in match.group(1).split(".")]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    if len(numbers) > _MAX_COMPONENTS or any(n >= 10**_COMPONENT_WIDTH for n in numbers):
        return None
    return "".join(f"{number:0{_COMPONENT_WIDTH}d}" for number in numbers)


class Component(enum.Enum):
    """A piece of the client's software that the matrix constrains."""

    APP = "app"
    RUNTIME = "runtime"
    MODEL_ARCHITECTURE = "model_architecture"
    FEATURE_EXTRACTOR = "feature_extractor"

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")

    @property
    def column(self) -> str:
        """The client record's field (and column) holding this version."""
        return _COLUMNS[self]


# read for every client of every round: named once (an enum's value and a format each time
# cost more than the lookup)
_COLUMNS = {component: f"{component.value}_version" for component in Component}
VERSION_COLUMNS = tuple(_COLUMNS.values())


class HasVersions(Protocol):
    """What the matrix reads from a client: its four software versions."""

    @property
    def app_version(self) -> str: ...
    @property
    def runtime_version(self) -> str: ...
    @property
    def model_architecture_version(self) -> str: ...
    @property
    def feature_extractor_version(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Whether a client may train, and if not, the reason it is told."""

    can_train: bool
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.can_train == (self.reason is not None):
            raise ConfigError("an eligible client has no rejection reason; a rejected one has one")

    @classmethod
    def allowed(cls) -> Eligibility:
        return cls(True)

    @classmethod
    def rejected(cls, reasons: Sequence[str]) -> Eligibility:
        """Allowed when ``reasons`` is empty, else rejected for all of them."""
        return cls(False, "; ".join(reasons)) if reasons else cls(True)


@dataclass(frozen=True, slots=True)
class Requirement:
    """What one component's version must be: at least ``minimum``, one of ``allowed``, or both."""

    component: Component
    minimum: str | None = None
    allowed: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.minimum is None and self.allowed is None:
            raise ConfigError(f"a {self.component.label} requirement needs a minimum or a set")
        if self.minimum is not None and version_key(self.minimum) is None:
            raise ConfigError(
                f"minimum {self.component.label} version {self.minimum!r} is not a dotted "
                "numeric version such as 2.4.0"
            )
        if self.allowed is not None and not self.allowed:
            raise ConfigError(f"the allowed {self.component.label} versions cannot be empty")

    def check(self, version: str | None, *, model: str) -> str | None:
        """None when ``version`` satisfies the requirement, else the reason it does not."""
        label, where = f"{self.component.label} version", f"for model arch {model}"
        if version is None:
            return f"{label} is unknown, and model arch {model} requires one"
        if self.allowed is not None and version not in self.allowed:
            return f"{label} {version} is not one of {', '.join(sorted(self.allowed))} {where}"
        if self.minimum is None:
            return None
        key, minimum_key = version_key(version), version_key(self.minimum)
        if key is None:
            return f"{label} {version!r} is not comparable to the minimum {self.minimum} {where}"
        if minimum_key is not None and key < minimum_key:
            return f"{label} {version} is below the minimum {self.minimum} {where}"
        return None

    def clause(self) -> sa.ColumnElement[bool]:
        """The same test as :meth:`check`, on the clients table."""
        conditions: list[sa.ColumnElement[bool]] = []
        if self.allowed is not None:
            conditions.append(clients.c[self.component.column].in_(sorted(self.allowed)))
        if self.minimum is not None:
            key_column = clients.c[f"{self.component.column}_key"]
            conditions.append(key_column >= version_key(self.minimum))
        return sa.and_(*conditions)


def unmet_requirements(
    client: HasVersions, requirements: Iterable[Requirement], *, model: str
) -> list[str]:
    """The reason for each requirement of ``model`` that the client's versions fail."""
    reasons = []
    for requirement in requirements:
        reason = requirement.check(getattr(client, requirement.component.column), model=model)
        if reason is not None:
            reasons.append(reason)
    return reasons


class VersionMatrix:
    """The versioning matrix of every model, kept in the registry database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def require(
        self,
        model: str,
        component: Component,
        *,
        minimum: str | None = None,
        allowed: Iterable[str] | None = None,
    ) -> Requirement:
        """Set (or replace) the requirement of ``model`` on ``component``."""
        _check_model_name(model)
        requirement = Requirement(
            component, minimum, None if allowed is None else frozenset(allowed)
        )
        table = version_requirements
        with self.database.write() as connection:
            connection.execute(
                table.delete().where(table.c.model == model, table.c.component == component.value)
            )
            connection.execute(
                table.insert().values(
                    model=model,
                    component=component.value,
                    minimum_version=minimum,
                    minimum_key=None if minimum is None else version_key(minimum),
                    allowed_versions=None
                    if requirement.allowed is None
                    else sorted(requirement.allowed),
                )
            )
        return requirement

    def requirements(self, model: str) -> tuple[Requirement, ...]:
        """The requirements of ``model``, in the order of :class:`Component` (may be empty)."""
        table = version_requirements
        with self.database.read() as connection:
            rows = connection.execute(sa.select(table).where(table.c.model == model)).all()
        found = {
            Component(row.component): Requirement(
                Component(row.component),
                row.minimum_version,
                None if row.allowed_versions is None else frozenset(row.allowed_versions),
            )
            for row in rows
        }
        return tuple(found[component] for component in Component if component in found)

    def remove(self, model: str, component: Component | None = None) -> int:
        """Drop one requirement of ``model`` (or all of them); returns how many went."""
        table = version_requirements
        condition = table.c.model == model
        if component is not None:
            condition = sa.and_(condition, table.c.component == component.value)
        with self.database.write() as connection:
            return connection.execute(table.delete().where(condition)).rowcount

    def models(self) -> list[str]:
        """Every model that has at least one requirement, sorted."""
        table = version_requirements
        with self.database.read() as connection:
            query = sa.select(table.c.model).distinct().order_by(table.c.model)
            return list(connection.execute(query).scalars())

    def check(self, client: HasVersions, *, model: str) -> Eligibility:
        """Whether ``client`` may train ``model`` as far as its versions go, and why not."""
        return Eligibility.rejected(
            unmet_requirements(client, self.requirements(model), model=model)
        )


def _check_model_name(model: str) -> None:
    if not model or len(model) > MAX_MODEL_NAME:
        raise ConfigError(f"a model name has 1 to {MAX_MODEL_NAME} characters, got {model!r}")
