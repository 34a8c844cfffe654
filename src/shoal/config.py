"""Run configuration: TOML validated by pydantic, with ``section.key=value`` overrides.

An unknown key or a bad value is a :class:`ConfigError` whose one-line
message names the key and what is allowed. Every section has defaults, so an
empty file is a valid (small) run.

Every number is checked the same way, whatever its section: a float must be
finite (``inf`` and ``nan`` are refused), an integer must fit in 64 bits,
neither is a boolean (lax pydantic reads ``true`` as 1), and a size-like key
has an upper bound that says why it exists (a
:class:`~shoal.core.limits.Limit`), as do the built-in model and data as a
whole (:data:`MAX_MODEL_PARAMETERS`, :data:`MAX_CLIENT_DATA_BYTES`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticKnownError

from shoal.core.compression import Compression
from shoal.core.errors import ConfigError, StrategyError
from shoal.core.limits import (
    INT64_MAX,
    MAX_LOCAL_EPOCHS,
    MAX_PORT,
    MAX_RETRY_AFTER_S,
    MAX_RUN_ID_CHARS,
    PLD_SMALLEST_DELTA,
    Limit,
    above_limit,
    is_loopback,
    pld_delta_problem,
    quorum_count,
    split_host_port,
    within_budget,
)
from shoal.core.settings import apply_overrides as apply_settings_overrides
from shoal.core.settings import format_validation_error, read_toml
from shoal.core.sharing import MAX_NEIGHBOURS, threshold_fraction_problem
from shoal.features import FeatureLimits
from shoal.preprocessing import MAX_FEATURES as MAX_STATISTICS_FEATURES
from shoal.preprocessing import FeatureBounds

if TYPE_CHECKING:
    from shoal.aggregation.aggregators import Aggregator

PositiveFloat = Annotated[float, Field(gt=0)]
log = logging.getLogger(__name__)

MIN_NOISE_MULTIPLIER = 1e-6


def _zero_or_audible(value: float | None) -> float | None:
    """A noise multiplier is 0 (no noise) or at least :data:`MIN_NOISE_MULTIPLIER`."""
    if value is not None and 0 < value < MIN_NOISE_MULTIPLIER:
        raise ValueError(
            f"a noise multiplier is 0 (none) or at least {MIN_NOISE_MULTIPLIER:g}: below it the "
            "noise protects next to nothing, and the accountant's 1 / z^2 leaves float range "
            "near 0"
        )
    return value


NoiseMultiplier = Annotated[float, Field(ge=0), AfterValidator(_zero_or_audible)]
DEFAULT_STATE_DIR = "coordinator-state"  # where a coordinator keeps its registries and blobs
Fraction = Annotated[float, Field(ge=0, le=1)]


# Upper bounds (see shoal.core.limits): each size-like key says why it stops where it does.
MAX_CLIENTS = 1_000_000
_CLIENTS = Limit(MAX_CLIENTS, "a simulation holds every client's profile in memory (about 3 KiB)")
_ROUNDS = Limit(1_000_000, "each round stores a model version; a million is past any real run")
_EXAMPLES = Limit(1_000_000, "the built-in data makes a client's examples in memory at once")
_FEATURES = Limit(65_536, "an example of the built-in data is a dense float32 vector")
_CLASSES = Limit(10_000, "the built-in models keep one output per class for every example")
_EPSILON = Limit(
    100,
    "a client changes the odds of anything the run releases by at most e^epsilon: past 100 "
    "that bounds nothing (the usual budgets are 1 to 10)",
)
_DELTA = Limit(
    0.5,
    "delta is the chance that the epsilon guarantee fails outright: past 1/2 it fails more "
    "often than it holds (the usual delta is below 1 / population)",
)
MAX_MODEL_PARAMETERS = 2**26
"""The built-in NumPy models' size (256 MiB as float32): bigger ones are a user's app (PyTorch)."""
MAX_CANARY_COPIES = 1_000_000
"""The most canary records (count x repeats) a holder keeps: about 256 MiB of 64-feature rows."""
MAX_CLIENT_DATA_BYTES = 2**26
"""The most memory one client's built-in (Gaussian) examples may take: 64 MiB."""


def _scalar_kinds(annotation: Any) -> list[Any]:
    """The members of ``annotation``: its union's, each without ``Annotated``, a ``Literal``'s
    values as their types."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar_kinds(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [kind for member in get_args(annotation) for kind in _scalar_kinds(member)]
    if origin is Literal:
        return [type(value) for value in get_args(annotation)]
    return [annotation]


_NumberError = Literal["int_type", "float_type"]  # pydantic's own, for a value of another type


def _boolean_for_a_number(annotation: Any, value: Any) -> _NumberError | None:
    """The pydantic error type (``int_type``, ``float_type``) when ``value`` holds a boolean
    where ``annotation`` wants a number and takes no boolean, in a list or a table too; else
    None. Lax pydantic would read ``true`` as 1 (``run.rounds = true`` ran one round)."""
    kinds = _scalar_kinds(annotation)
    if isinstance(value, bool):
        if bool in kinds or Any in kinds:
            return None
        return "float_type" if float in kinds else "int_type" if int in kinds else None
    for kind in kinds:
        for item_annotation, item in _items(kind, value):
            error = _boolean_for_a_number(item_annotation, item)
            if error is not None:
                return error
    return None


def _items(annotation: Any, value: Any) -> Iterable[tuple[Any, Any]]:
    """Each item of ``value`` with the annotation it is validated against, where ``value`` is
    the list, tuple or table that ``annotation`` wants; nothing otherwise."""
    origin, arguments = get_origin(annotation), get_args(annotation)
    if isinstance(value, dict) and origin is dict:
        return ((arguments[1], item) for item in value.values())
    if not (isinstance(value, list | tuple) and origin in (list, tuple) and arguments):
        return ()
    if origin is tuple and arguments[-1] is not Ellipsis:  # tuple[float, float]: by position
        return zip(arguments, value, strict=False)  # a wrong length is pydantic's to refuse
    return ((arguments[0], item) for item in value)


class _Section(BaseModel):
    # allow_inf_nan=False: every float of every section is finite, from a file or from --set
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """A number of the config is never a boolean: ``true`` is no count and no rate."""
        field = None if info.field_name is None else cls.model_fields.get(info.field_name)
        error = None if field is None else _boolean_for_a_number(field.annotation, value)
        if error is not None:
            raise PydanticKnownError(error)  # pydantic's own "Input should be a valid integer"
        return value

    @field_validator("*")
    @classmethod
    def _fits_in_64_bits(cls, value: Any) -> Any:
        """Every integer of the config fits in 64 bits, as a TOML integer must."""
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise above_limit(maximum=INT64_MAX, why="a TOML integer has 64 bits")
        return value


class RunSection(_Section):
    """[run]: naming, seeding and length of the run."""

    name: str = "shoal"
    seed: int = Field(0, ge=0)
    rounds: Annotated[int, Field(ge=1), _ROUNDS] = 10

    @field_validator("name")
    @classmethod
    def _usable_name(cls, name: str) -> str:
        """The run's name names its folder, its model in the registry and its MLflow run."""
        if not 1 <= len(name) <= 128:
            raise ValueError("a run name has 1 to 128 characters")
        if not name.isprintable() or any(mark in name for mark in "/\\") or name in (".", ".."):
            raise ValueError(
                "a run name is printable characters without '/' or '\\' (it names a folder)"
            )
        return name


class DataSection(_Section):
    """[data]: the federated dataset and how it is split across clients."""

    dataset: Literal["digits", "synthetic", "synthetic_iid", "gaussian"] = "digits"
    num_clients: Annotated[int, Field(ge=1), _CLIENTS] = 100
    partition: Literal["iid", "dirichlet", "shards", "power_law"] = "dirichlet"
    dirichlet_alpha: PositiveFloat = 0.5
    shards_per_client: Annotated[int, Field(ge=1), _EXAMPLES] = 2  # a shard holds an example
    power_law_exponent: PositiveFloat = 1.5
    min_samples: Annotated[int, Field(ge=1), _EXAMPLES] = 2
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    local_eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    synthetic_alpha: float = Field(1.0, ge=0)
    synthetic_beta: float = Field(1.0, ge=0)
    max_samples_per_client: Annotated[int, Field(ge=1), _EXAMPLES] | None = None
    samples_per_client: Annotated[int, Field(ge=1), _EXAMPLES] = 200
    num_features: Annotated[int, Field(ge=1), _FEATURES] = 64
    num_classes: Annotated[int, Field(ge=2), _CLASSES] = 10

    @property
    def shape(self) -> tuple[int, int]:
        """(features, classes) of the built-in dataset's examples."""
        if self.dataset == "digits":
            return 64, 10
        if self.dataset == "gaussian":
            return self.num_features, self.num_classes
        return 60, 10  # FedProx's synthetic data


class ModelSection(_Section):
    """[model]: the reference NumPy model the clients train."""

    kind: Literal["softmax", "mlp"] = "softmax"
    hidden: int = Field(32, ge=1)  # bounded with the model's size (MAX_MODEL_PARAMETERS)

    def num_parameters(self, *, features: int, classes: int) -> int:
        """How many parameters the model has on examples of ``features`` and ``classes``."""
        if self.kind == "mlp":
            return self.hidden * (features + 1 + classes) + classes
        return classes * (features + 1)


class StrategySection(_Section):
    """[strategy]: a preset by name, with any of its settings overridden."""

    name: str = "fedavg"
    server_learning_rate: PositiveFloat | None = None
    server_momentum: Annotated[float, Field(ge=0, lt=1)] | None = None
    beta1: Annotated[float, Field(ge=0, lt=1)] | None = None
    beta2: Annotated[float, Field(ge=0, lt=1)] | None = None
    tau: PositiveFloat | None = None
    proximal_mu: Annotated[float, Field(ge=0)] | None = None
    aggregator: str | None = None
    trim_ratio: Annotated[float, Field(ge=0, lt=0.5)] | None = None
    num_byzantine: Annotated[int, Field(ge=0), _CLIENTS] | None = None
    num_selected: Annotated[int, Field(ge=1), _CLIENTS] | None = None

    @field_validator("name")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        from shoal.aggregation.strategy import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(PRESETS)}")
        return name

    @field_validator("aggregator")
    @classmethod
    def _known_aggregator(cls, name: str | None) -> str | None:
        from shoal.aggregation.strategy import AGGREGATORS

        if name is not None and name not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {name!r}; allowed: {', '.join(AGGREGATORS)}")
        return name


class ClientSection(_Section):
    """[client]: local training on every client."""

    epochs: Annotated[
        float, Field(gt=0), Limit(MAX_LOCAL_EPOCHS, "a client refuses a task that asks more")
    ] = 1.0
    batch_size: Annotated[
        int, Field(ge=0), Limit(2**32 - 1, "a batch size travels as a 32-bit unsigned integer")
    ] = 16  # 0: the full batch
    learning_rate: PositiveFloat = 0.1
    # record-level DP-SGD: per-example clipping and Gaussian noise in every local step
    dp_sgd: bool = False
    dp_sgd_clip_norm: PositiveFloat = 1.0
    dp_sgd_noise_multiplier: NoiseMultiplier = 1.0
    dp_sgd_delta: Annotated[float, Field(gt=0, lt=1)] | None = None  # unset: 1 / examples
    # the coordinator's model-signing public key (PEM) a deployed client pins: it trains
    # only on versions signed by it (`shoal client run --coordinator-key` overrides it)
    coordinator_key: str | None = None


class RoundSection(_Section):
    """[round]: cohort size, over-selection, quorum, deadline, and what a round does when its
    cohort drops."""

    clients_per_round: int = Field(10, ge=1)
    over_selection: Annotated[float, Field(ge=1)] = 1.3
    quorum: Annotated[float, Field(gt=0, le=1)] = 0.8
    deadline_s: PositiveFloat = 600.0
    # when more than drop_fallback_at of a round's cohort has dropped: re-select replacements
    # from the eligible clients not yet asked (while drop_reselect_min_left of the deadline is
    # left), extend the deadline once by drop_extend_s (unset: deadline_s), abort the round and
    # keep the model, or none (wait for the deadline, as without a fallback)
    drop_fallback: Literal["reselect", "extend", "abort", "none"] = "reselect"
    drop_fallback_at: Annotated[float, Field(ge=0, lt=1)] = 0.5
    drop_extend_s: PositiveFloat | None = None
    drop_reselect_min_left: Annotated[float, Field(gt=0, le=1)] = 0.5

    @property
    def fewest_updates(self) -> int:
        """The fewest updates a fit round commits with: its quorum of ``clients_per_round``
        (a round closes at the deadline with what came, and aborts below the quorum), as
        the engine counts it."""
        return quorum_count(self.quorum, self.clients_per_round)


class EvaluationSection(_Section):
    """[evaluation]: federated evaluation rounds and the central held-out test."""

    every: int = Field(5, ge=0)
    clients: Annotated[int, Field(ge=1), _CLIENTS] = 10
    centralized: bool = True


_VERSION_TEXT = r"[vV]?\d+(\.\d+)*"
_SHARES_TOLERANCE = 1e-6
LocalHour = Annotated[float, Field(ge=0, lt=24)]


def _check_mix(mix: dict[str, float] | None, what: str) -> dict[str, float] | None:
    """A mix of named shares: at least one, none negative, summing to 1."""
    if mix is None:
        return None
    if not mix:
        raise ValueError(f"a {what} mix needs at least one entry")
    if any(not 0 <= share <= 1 for share in mix.values()):
        raise ValueError(f"each share of a {what} mix lies in [0, 1]")
    total = sum(mix.values())
    if abs(total - 1.0) > _SHARES_TOLERANCE:
        raise ValueError(f"the shares of a {what} mix sum to 1, got {total:g}")
    return mix


def utc_offset_hours(name: str) -> float:
    """The UTC offset a time-zone key names, in hours: "+5.5", "-8", "0" (from -12 to +14)."""
    try:
        hours = float(name)
    except ValueError:
        raise ValueError(
            f"a time zone is a UTC offset in hours such as '-5' or '+5.5', got {name!r}"
        ) from None
    if not -12 <= hours <= 14 or hours * 4 != int(hours * 4):
        raise ValueError(f"a UTC offset lies in [-12, +14] in quarter hours, got {name!r}")
    return hours


def _check_time_zones(zones: dict[str, float] | None) -> dict[str, float] | None:
    if zones is not None:
        for name in zones:
            utc_offset_hours(name)
    return _check_mix(zones, "time-zone")


class DeviceStates(_Section):
    """``[devices.classes.states]``: a class's diurnal cycle of charging, WiFi, idleness, battery.

    Hours are the device's local hours (its time zone). Most nights a phone
    is plugged in from about ``charging_hours[0]`` to ``charging_hours[1]``
    (each night's start and end move by up to ``charging_jitter_h``), and
    lies idle and on WiFi there; by day it charges, idles or sees WiFi now
    and then, one draw per device and local hour. Off the charger the
    battery drains ``drain_per_hour``; training drains
    ``training_drain_per_hour`` more for the hours it computes, and a night
    on the charger fills the battery up again (``charge_per_hour`` while it
    charges). A morning after a night off the charger starts between 15 %
    and 60 %.
    """

    charging_hours: tuple[LocalHour, LocalHour] = (22.0, 7.0)
    charging_jitter_h: Annotated[float, Field(ge=0, le=6)] = 1.0
    nightly_charging: Fraction = 0.85
    daytime_charging: Fraction = 0.05
    wifi_at_night: Fraction = 0.9
    wifi_by_day: Fraction = 0.35
    idle_at_night: Fraction = 0.95
    idle_by_day: Fraction = 0.15
    drain_per_hour: Annotated[float, Field(ge=0, le=1)] = 0.05
    training_drain_per_hour: Annotated[float, Field(ge=0, le=10)] = 0.3
    charge_per_hour: Annotated[float, Field(gt=0, le=10)] = 0.35

    @field_validator("charging_hours")
    @classmethod
    def _a_window(cls, hours: tuple[float, float]) -> tuple[float, float]:
        if hours[0] == hours[1]:
            raise ValueError("the charging window starts and ends at different hours")
        return hours


class DeviceClass(_Section):
    """One class of device in the population (``[[devices.classes]]``).

    ``availability``: the chance, each round, that a device of the class is
    online at all (its app running, a network reachable); an online device
    must also meet the ``[selection]`` policy in the state it is in at the
    round's virtual time (``states`` models that state; without it, power,
    network and idleness are unknown, and never meet a criterion). ``ram_gb``, ``app_versions`` and
    ``runtime_versions`` (mixes of version shares, summing to 1), and
    ``time_zones`` (UTC offsets in hours with their shares; unset: the
    fleet's) describe what each device reports; unset facts are unknown, and
    unset versions are :class:`~shoal.core.device.DeviceState`'s defaults.
    """

    name: str
    share: PositiveFloat
    examples_per_second: PositiveFloat = 200.0
    download_mbps: PositiveFloat = 20.0
    upload_mbps: PositiveFloat = 5.0
    latency_s: Annotated[float, Field(ge=0)] = 0.2
    availability: Fraction = 1.0
    dropout: Fraction = 0.0
    ram_gb: Annotated[float, Field(ge=0, le=1_048_576)] | None = None
    app_versions: dict[Annotated[str, Field(pattern=_VERSION_TEXT)], float] | None = None
    runtime_versions: dict[Annotated[str, Field(pattern=_VERSION_TEXT)], float] | None = None
    time_zones: dict[str, float] | None = None
    states: DeviceStates | None = None

    @field_validator("app_versions", "runtime_versions")
    @classmethod
    def _version_mix(cls, mix: dict[str, float] | None) -> dict[str, float] | None:
        return _check_mix(mix, "version")

    @field_validator("time_zones")
    @classmethod
    def _zones(cls, zones: dict[str, float] | None) -> dict[str, float] | None:
        return _check_time_zones(zones)


class DropoutWave(_Section):
    """A simulated dropout wave (``[[devices.dropout_waves]]``): in round ``round`` each
    device of the cohort also drops with probability ``dropout`` (an outage, a bad release)."""

    round: Annotated[int, Field(ge=1), _ROUNDS]
    dropout: Fraction


def _default_device_classes() -> list[DeviceClass]:
    return [DeviceClass(name="uniform", share=1.0)]


class DevicesSection(_Section):
    """[devices]: device classes, per-round speed jitter, and straggler policy.

    ``time_zones``: the fleet's mix of UTC offsets (a class may have its
    own); ``start_utc_hour``: the UTC hour at virtual time 0, so that a
    device's local hour is ``start_utc_hour + virtual hours + its offset``.
    """

    classes: list[DeviceClass] = Field(default_factory=_default_device_classes, min_length=1)
    speed_jitter: Annotated[
        float,
        Field(ge=0),
        Limit(
            10.0,
            "a device's speed is divided by a lognormal draw of this sigma: past 10, "
            "draws leave float range",
        ),
    ] = 0.3
    straggler_fraction: Fraction = 0.0
    straggler_policy: Literal["drop", "partial"] = "drop"
    # the training examples a device is timed by when its app does not say (ClientApp.num_examples)
    nominal_examples: Annotated[int, Field(ge=1), _EXAMPLES] = 100
    time_zones: dict[str, float] = Field(default_factory=lambda: {"0": 1.0})
    start_utc_hour: LocalHour = 0.0
    dropout_waves: list[DropoutWave] = Field(default_factory=list)

    @field_validator("dropout_waves")
    @classmethod
    def _one_wave_per_round(cls, waves: list[DropoutWave]) -> list[DropoutWave]:
        rounds = [wave.round for wave in waves]
        if len(set(rounds)) != len(rounds):
            raise ValueError(f"one dropout wave per round, got rounds {rounds}")
        return waves

    @field_validator("classes")
    @classmethod
    def _unique_names(cls, classes: list[DeviceClass]) -> list[DeviceClass]:
        names = [device.name for device in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"device class names must be unique, got {names}")
        return classes

    @field_validator("time_zones")
    @classmethod
    def _zones(cls, zones: dict[str, float]) -> dict[str, float]:
        _check_time_zones(zones)
        return zones

    @property
    def models_states(self) -> bool:
        """Whether any class models a diurnal cycle (and so a battery that training drains)."""
        return any(device.states is not None for device in self.classes)


class SelectionSection(_Section):
    """[selection]: who may train, the eligibility policy both shells apply before a cohort.

    Each criterion is off by default. A criterion on a fact a device did not
    report (charging, WiFi, idle, battery, RAM) is not met: unknown is never
    taken for yes. The names of :meth:`criteria` are the keys of the
    ``excluded`` counts in each round's metrics row.
    """

    require_charging: bool = False
    require_wifi: bool = False  # an unmetered network
    require_idle: bool = False
    min_battery: Fraction = 0.0  # a share of a full battery: 0.5 is 50 %
    min_ram_gb: Annotated[float, Field(ge=0, le=1_048_576)] = 0.0
    min_app_version: str | None = Field(None, pattern=_VERSION_TEXT)
    device_classes: list[str] | None = Field(None, min_length=1)

    def criteria(self) -> tuple[str, ...]:
        """The names of the criteria this policy applies, in a fixed order."""
        active = {
            "charging": self.require_charging,
            "wifi": self.require_wifi,
            "idle": self.require_idle,
            "battery": self.min_battery > 0,
            "ram": self.min_ram_gb > 0,
            "app_version": self.min_app_version is not None,
            "device_class": self.device_classes is not None,
        }
        return tuple(name for name, on in active.items() if on)


class VersionRequirementEntry(_Section):
    """One ``[[versions.require]]`` entry: what one component's version must be.

    ``from_round`` (simulation and a live run alike) makes the requirement
    apply from that round on, so a requirement can change mid-run.
    """

    component: Literal["app", "runtime", "model_architecture", "feature_extractor"]
    minimum: str | None = Field(None, pattern=_VERSION_TEXT)
    allowed: list[str] | None = Field(None, min_length=1)
    from_round: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _says_something(self) -> VersionRequirementEntry:
        if self.minimum is None and self.allowed is None:
            raise ValueError(f"a {self.component} requirement needs a minimum or allowed versions")
        return self


class VersionsSection(_Section):
    """[versions]: the versioning matrix of the job's model (OTA compatibility)."""

    require: list[VersionRequirementEntry] = Field(default_factory=list)


class SimulationSection(_Section):
    """[simulation]: how and where local training is executed."""

    workers: Annotated[
        int, Field(ge=0), Limit(1024, "each worker is a process with its own copy of the data")
    ] = 2
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None


class EnrollmentTokenEntry(_Section):
    """One of ``coordinator.enrollment_tokens`` written as a table: a secret and its limits.

    Unset ``max_uses`` and ``ttl_days`` take the registry's defaults (100
    enrollments, 7 days after the first start that lists the token), as a
    bare secret does; ``expires`` (a TOML date-time with its UTC offset)
    replaces the time-to-live.
    """

    token: str = Field(min_length=1, max_length=256)
    max_uses: int | None = Field(None, ge=1, le=10_000_000)
    ttl_days: Annotated[float, Field(gt=0, le=3650)] | None = None
    expires: dt.datetime | None = None

    @model_validator(mode="after")
    def _one_expiry(self) -> EnrollmentTokenEntry:
        if self.expires is not None and self.ttl_days is not None:
            raise ValueError("give expires or ttl_days, not both")
        if self.expires is not None and self.expires.utcoffset() is None:
            raise ValueError("expires must name its UTC offset, e.g. 2026-06-30T00:00:00Z")
        return self


class CoordinatorSection(_Section):
    """[coordinator]: the network coordinator of ``shoal coordinator serve``."""

    listen: str = "127.0.0.1:50051"
    run_id: str = Field("run-1", min_length=1, max_length=MAX_RUN_ID_CHARS)
    state_dir: str = DEFAULT_STATE_DIR
    certificates: str | None = None
    # the Ed25519 key (PEM) every committed version is signed with; unset: the deployment's
    # model-signing.key in `certificates` if it holds one, else one made in the state folder
    signing_key: str | None = None
    mutual_tls: bool = False
    registry_url: str | None = None
    blob_url: str | None = None
    # each a bare secret, or a table with max_uses and ttl_days or expires; read as tables
    enrollment_tokens: list[EnrollmentTokenEntry] = Field(default_factory=list)
    max_update_mb: Annotated[
        float, Field(gt=0), Limit(65_536, "the coordinator holds each update whole in memory")
    ] = 64.0
    # the longest wait for an upload's next part: a stalled stream holds what it sent
    upload_idle_s: Annotated[
        float, Field(gt=0), Limit(3600, "a stalled upload holds its bytes for that long")
    ] = 60.0
    # calls served at once, more are told RESOURCE_EXHAUSTED (clients retry): each may hold a
    # message of up to 1 MiB before it is authenticated, so this bounds strangers' memory
    max_concurrent_rpcs: Annotated[
        int, Field(ge=1), Limit(65_536, "each call may hold 1 MiB before it is authenticated")
    ] = 1024
    # bad enrollment tokens one address (an IPv6 /64) may send within the window; past them
    # its enrollments are refused untried until the window moves (coordinator/guesses.py)
    enrollment_guesses: Annotated[
        int, Field(ge=1), Limit(1_000_000, "each is a guess at a token, unthrottled past it")
    ] = 10
    enrollment_guess_window_s: Annotated[
        float, Field(gt=0), Limit(86_400, "a longer wait locks out an address's clients too")
    ] = 60.0
    # the proxies in front of the service (addresses or CIDR blocks) whose x-forwarded-for
    # names the client's address; any other peer's header is ignored
    trusted_proxies: list[str] = Field(default_factory=list)
    retry_after_s: Annotated[
        float, Field(gt=0), Limit(MAX_RETRY_AFTER_S, "a client waits no longer between check-ins")
    ] = 2.0
    grace_s: Annotated[float, Field(ge=0)] = 5.0
    # after the last round, how long check-ins are still answered "the run has finished"
    linger_s: Annotated[float, Field(ge=0)] = 10.0
    # client attestation (shoal.governance.attestation): the evidence kinds a client may present
    # ("none": clients need not attest), the PEM release public keys the built-in "manifest"
    # kind trusts, and the verifier of any other kind as "module:object"
    attestation: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]] = Field(
        default_factory=list
    )
    release_keys: list[str] = Field(default_factory=list)
    attestation_verifiers: dict[str, str] = Field(default_factory=dict)
    # Prometheus' /metrics (shoal.telemetry.prometheus): 0 = not served; beyond this machine
    # only with metrics_allow_remote (the figures describe the fleet: keep them behind a proxy)
    metrics_port: Annotated[int, Field(ge=0, le=MAX_PORT)] = 0
    metrics_host: str = Field("127.0.0.1", min_length=1)
    metrics_allow_remote: bool = False

    @field_validator("enrollment_tokens", mode="before")
    @classmethod
    def _bare_secrets_as_tables(cls, tokens: Any) -> Any:
        if not isinstance(tokens, list):
            return tokens
        return [{"token": token} if isinstance(token, str) else token for token in tokens]

    @field_validator("enrollment_tokens")
    @classmethod
    def _distinct_tokens(cls, tokens: list[EnrollmentTokenEntry]) -> list[EnrollmentTokenEntry]:
        secrets = [entry.token for entry in tokens]
        if len(set(secrets)) != len(secrets):
            raise ValueError("each token may be listed once")
        return tokens

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an address or CIDR block: {exc}") from None
        return proxies

    @field_validator("listen")
    @classmethod
    def _address(cls, listen: str) -> str:
        split_host_port(listen)  # a port past 65535 would wrap around in gRPC
        return listen

    @model_validator(mode="after")
    def _metrics_on_this_machine(self) -> CoordinatorSection:
        if not self.metrics_allow_remote and not is_loopback(self.metrics_host):
            raise ValueError(
                f"coordinator.metrics_host = {self.metrics_host!r} would serve the fleet's "
                "metrics beyond this machine: use 127.0.0.1 or ::1, or set "
                "coordinator.metrics_allow_remote = true (behind a proxy that authenticates)"
            )
        return self

    @field_validator("attestation", mode="before")
    @classmethod
    def _one_kind_or_many(cls, kinds: Any) -> Any:
        if kinds == "none":
            return []
        return [kinds] if isinstance(kinds, str) else kinds

    @model_validator(mode="after")
    def _attestation_verifiable(self) -> CoordinatorSection:
        kinds = self.attestation
        if len(set(kinds)) != len(kinds) or "none" in kinds:
            raise ValueError(f"coordinator.attestation lists distinct kinds, or is 'none': {kinds}")
        for kind in kinds:
            if kind != "manifest" and kind not in self.attestation_verifiers:
                raise ValueError(
                    f"coordinator.attestation: no verifier for {kind!r}; name it in "
                    f"coordinator.attestation_verifiers ({kind!r} = 'module:object')"
                )
        if "manifest" in kinds and not self.release_keys:
            raise ValueError(
                "coordinator.attestation = 'manifest' needs coordinator.release_keys: "
                "the PEM public keys of the releases this coordinator trusts"
            )
        return self


class SecureAggregationSection(_Section):
    """[secure_aggregation]: the coordinator learns only the sum (SecAgg+, or CKKS across silos)."""

    protocol: Literal["none", "secagg+", "ckks"] = "none"
    degree: (  # neighbours per client; unset: about 2 log2 n
        Annotated[
            int,
            Field(ge=1),
            Limit(MAX_NEIGHBOURS, "a client refuses to share its secrets among more"),
        ]
        | None
    ) = None
    reconstruction_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5  # the floor: 0.5
    clip: PositiveFloat = 4.0
    bits: int | None = Field(None, ge=1, le=31)  # unset: the most the cohort size allows
    max_weight: int = Field(1000, ge=1)
    advertise_keys_s: PositiveFloat = 30.0
    share_keys_s: PositiveFloat = 30.0
    unmask_s: PositiveFloat = 30.0
    stage_dropout: Fraction = 0.0  # simulation only: chance to vanish at each protocol stage
    # the share of a cohort expected to drop during a round; unset: the devices' mean dropout.
    # A degree whose rounds would abort more often than 5% at this dropout is refused.
    expected_dropout: Fraction | None = None
    # ckks: the key holder (unset: one made in the run folder; else the address of
    # `shoal keyholder serve`), the CA that pins it, the coordinator's client certificate
    # and key for a key holder that requires mutual TLS, the silos' receipt keys, its minimum
    key_holder: str | None = None
    key_holder_ca: str | None = None
    key_holder_certificate: str | None = None
    key_holder_key: str | None = None
    silo_keys: str | None = None
    min_contributors: int = Field(2, ge=2)

    @property
    def enabled(self) -> bool:
        return self.protocol != "none"

    @model_validator(mode="after")
    def _client_certificate_whole(self) -> SecureAggregationSection:
        """A client certificate for the key holder comes with its key and the CA it pins."""
        if (self.key_holder_certificate is None) != (self.key_holder_key is None):
            raise ValueError(
                "key_holder_certificate and key_holder_key: give both (the coordinator's "
                "certificate for a key holder that requires mutual TLS, and its key), or neither"
            )
        if self.key_holder_certificate is not None and self.key_holder_ca is None:
            raise ValueError("key_holder_certificate needs key_holder_ca (mutual TLS is TLS)")
        return self

    @field_validator("reconstruction_threshold")
    @classmethod
    def _safe_threshold(cls, fraction: float) -> float:
        problem = threshold_fraction_problem(fraction)
        if problem is not None:
            raise ValueError(problem)
        return fraction


class PrivacySection(_Section):
    """[privacy]: user-level differential privacy, with the budget as a resource."""

    placement: Literal["none", "central", "local", "distributed"] = "none"
    # the run's budget: training stops before it is spent
    epsilon: Annotated[float, Field(gt=0), _EPSILON] | None = None
    delta: Annotated[float, Field(gt=0), _DELTA] | None = None  # unset: 1 / population
    noise_multiplier: NoiseMultiplier | None = None  # unset: calibrated to epsilon
    clip_norm: PositiveFloat = 1.0
    adaptive_clipping: bool = False
    target_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.5
    clip_learning_rate: PositiveFloat = 0.2
    clipped_count_std: PositiveFloat | None = None  # unset: clients_per_round / 20
    accountant: Literal["rdp", "pld"] = "rdp"
    conversion: Literal["improved", "classic"] = "improved"
    # fixed: ceil(clients_per_round * over_selection) of the eligible clients; poisson: each
    # eligible client joins with q = clients_per_round / eligible (no over-selection)
    sampling: Literal["poisson", "fixed"] = "fixed"
    client_epsilon: PositiveFloat | None = None  # a client past it is no longer selected
    # a deployed client refuses a local or distributed DP task whose noise, over a cohort of
    # clients_per_round, is below this multiple of the clip norm (the coordinator sends both)
    client_min_noise_multiplier: NoiseMultiplier = 0.1
    # False: seeded noise and DP cohorts, reproducible and predictable: simulations only
    secure_noise: bool = True
    alert_command: str | None = None  # run when the budget is exhausted (event JSON on stdin)
    alert_hook: str | None = None  # "module:function" called with the event

    @property
    def enabled(self) -> bool:
        return self.placement != "none"

    @model_validator(mode="after")
    def _delta_the_accountant_resolves(self) -> PrivacySection:
        if self.accountant == "pld" and self.delta is not None and self.delta < PLD_SMALLEST_DELTA:
            raise ValueError(pld_delta_problem(self.delta))
        return self

    @model_validator(mode="after")
    def _sampling_the_accountant_accounts(self) -> PrivacySection:
        """Refused here, in the config's words: the accountant would refuse it at the first
        fit round, naming its own arguments (method, sampling)."""
        if self.accountant == "pld" and self.sampling == "fixed":
            raise ValueError(
                "accountant = 'pld' accounts no fixed-size sampling of clients (dp-accounting's "
                "PLD has none), and privacy.sampling is 'fixed': set privacy.sampling = "
                "'poisson', or privacy.accountant = 'rdp'"
            )
        return self


class CompressionSection(_Section):
    """[compression]: how each client encodes its update on the way up
    (:mod:`shoal.core.compression`): ``int8`` (4x smaller), ``ternary`` (about 20x) or
    ``topk`` (the ``fraction`` of values largest in magnitude, their positions Golomb-Rice
    coded; a client adds what it left out to its next update). The coordinator decodes every
    upload before the policy and the aggregate see it; a round that aggregates securely
    sends its update masked or encrypted, never compressed."""

    kind: Literal["none", "int8", "ternary", "topk"] = "none"
    fraction: Annotated[float, Field(gt=0, le=1)] = 0.01

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def codec(self) -> Compression:
        """The codec each fit task asks its client for."""
        return Compression(self.kind, self.fraction)


class FeaturesSection(_Section):
    """[features]: the run's portable feature module (:mod:`shoal.features`): WebAssembly
    that computes every client's features from its raw records, the same bits on every
    platform. ``module`` is a ``.wasm`` binary (or ``.wat`` text), relative to the config
    file's folder; the coordinator records its sha256 with every model version (signed with
    it) and ships the module to deployed clients, which refuse a task or a module of any
    other. ``sha256`` pins the module: the run refuses to start, and a deployed client to
    train, with any other. The limits bound each batch of records the module computes, and
    what a deployed client spends compiling a module the coordinator sent."""

    def limits(self) -> FeatureLimits:
        """The limits a feature module runs (and a peer's compiles) within."""
        return FeatureLimits(
            fuel_per_record=self.fuel_per_record,
            memory_bytes=self.memory_mb * 2**20,
            batch_records=self.batch_records,
            compile_seconds=self.compile_seconds,
            compile_memory_bytes=self.compile_memory_mb * 2**20,
        )

    module: Annotated[str, Field(min_length=1)] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    fuel_per_record: int = Field(100_000, ge=1, le=10**9)
    memory_mb: int = Field(64, ge=1, le=4096)
    batch_records: int = Field(4096, ge=1, le=1_000_000)
    # what compiling a module from the coordinator may take on a deployed client
    compile_seconds: int = Field(30, ge=1, le=3600)
    compile_memory_mb: int = Field(2048, ge=512, le=65536)


class StatisticsSection(_Section):
    """[statistics]: the run computes its clients' feature statistics (pass 1 of federated
    preprocessing, :mod:`shoal.preprocessing`) instead of training a model. Each client's
    app gives its records' features (``local_features()``); every value is clipped into
    its feature's ``low`` and ``high`` (a number for every feature, or a list of one a
    feature; ``features`` counts them where both are numbers), and the coordinator averages
    the clients' moments weighted by their records, under ``[secure_aggregation]`` without
    seeing any client's. The run's one round writes ``statistics.json`` (each feature's
    mean, variance and standard deviation) in the run folder, for a training run's
    ``[preprocessing] statistics``."""

    enabled: bool = False
    features: Annotated[int, Field(ge=1, le=MAX_STATISTICS_FEATURES)] | None = None
    low: float | list[float] = 0.0
    high: float | list[float] = 1.0

    def bounds(self) -> FeatureBounds:
        """Each feature's bounds (a ConfigError when they are not one low and high a feature)."""
        return FeatureBounds.of(self.low, self.high, features=self.features)


class PreprocessingSection(_Section):
    """[preprocessing]: pass 2 of federated preprocessing. ``statistics`` names a statistics
    run's ``statistics.json`` (or its run folder), relative to the config file's folder; the
    coordinator sends the scaler they give (each feature's mean and standard deviation) with
    every task, and each client standardizes its features with it (``config.scaler``; the
    built-in NumPy clients do so themselves), as the central evaluation does
    (``ServerContext.scaler``). ``sha256`` pins the file; a run records the sha256 of the
    one it started with and resumes with no other."""

    statistics: Annotated[str, Field(min_length=1)] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None


class PolicySection(_Section):
    """[policy]: the Rego policy every update passes: the bundled default and the job's own files.

    The bounds are the default policy's (``data.shoal.bounds`` to a policy);
    ``files`` are the job's own ``.rego`` files (package ``shoal.policy``),
    relative to the config file's folder. ``enabled = false`` leaves only the
    protocol's checks (finite values of the right shape): no bound at all.
    """

    enabled: bool = True
    max_l2_norm: PositiveFloat = 100.0  # an update's L2 norm
    max_relative_l2_norm: PositiveFloat = 10.0  # an update's L2 norm over the round's median
    # the examples a client may claim as its weight (an evaluation's too)
    max_examples: int = Field(10_000_000, ge=1)
    files: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)


class DivergenceSection(_Section):
    """[divergence]: each plaintext fit round measures every update against the round's
    aggregate and its coordinate-wise median (L2 and cosine), stores it per client, and flags
    outliers: a distance to the median whose modified z-score exceeds ``max_z``, or a cosine
    similarity to the median below ``min_cosine``. Rounds with fewer than ``min_clients``
    updates flag nobody."""

    enabled: bool = True
    max_z: PositiveFloat = 3.5
    min_cosine: Annotated[float, Field(ge=-1, le=1)] = -0.5
    min_clients: int = Field(4, ge=1)


class DriftSection(_Section):
    """[drift]: each plaintext fit round projects the counted updates to 2-D (``pca``, or
    ``tsne``) into the run folder's ``drift.jsonl`` and clusters them (k-means, k in
    2..``max_clusters`` chosen by silhouette); a silhouette at or above ``bimodal_threshold``
    flags distinct populations (``drift_bimodal`` in the row). On the digits, one population's
    rounds score 0.1 to 0.15 and a day/night population (two labelling rules) 0.35 to 0.47."""

    enabled: bool = True
    method: Literal["pca", "tsne"] = "pca"
    max_clusters: int = Field(4, ge=2, le=32)
    bimodal_threshold: Annotated[float, Field(ge=-1, le=1)] = 0.3


class ClusteringSection(_Section):
    """[clustering]: clustered (personalized) FL, IFCA (Ghosh et al. 2020): the global model is
    ``clusters`` models; each client trains, and is evaluated with, the one whose loss on its
    own data is lowest, and each is averaged over the clients that chose it. ``start``:
    ``always`` trains the clusters from round 1; ``flagged`` trains one model until a fit
    round's drift flags distinct populations (``[drift]``, which it needs on), then splits it at
    that round's commit into one model per group the drift found (at most ``clusters``), each
    the previous model stepped by its own group's mean update. 1: one global model."""

    clusters: int = Field(1, ge=1, le=16)
    start: Literal["always", "flagged"] = "always"


class MetadataSection(_Section):
    """[metadata]: what stored telemetry reveals about clients. ``pseudonyms``: clients appear
    in stored round records under per-round pseudonyms (a keyed hash only the coordinator's
    key resolves; the key lives apart from the metrics); ``timestamp_granularity_s``: stored
    times are floored to this many seconds (1: exact to the second)."""

    pseudonyms: bool = True
    timestamp_granularity_s: Annotated[int, Field(ge=1), Limit(86_400 * 7, "a week")] = 3600


AttackKind = Literal[
    "sign_flip", "scaling", "gaussian_noise", "label_flip", "backdoor", "free_rider"
]
# a 3x3 patch in the bottom-right corner of digits' 8x8 images (row * 8 + column): pixels
# that are blank in nearly every digit, so the trigger is what a backdoored model keys on
DEFAULT_TRIGGER = (45, 46, 47, 53, 54, 55, 61, 62, 63)
# which keys each kind reads beyond kind, fraction / clients, from_round and until_round
_ATTACK_KEYS: dict[str, frozenset[str]] = {
    "sign_flip": frozenset(),
    "scaling": frozenset({"scale"}),
    "gaussian_noise": frozenset({"noise_std"}),
    "label_flip": frozenset({"target_label", "num_classes"}),
    "backdoor": frozenset(
        {"scale", "target_label", "num_classes", "poison_fraction", "trigger", "trigger_value"}
    ),
    "free_rider": frozenset(),
}


def _default_of(section: type[BaseModel], key: str) -> Any:
    """The default value of ``section``'s field ``key`` (a factory's, made)."""
    return section.model_fields[key].get_default(call_default_factory=True)


class AttackEntry(_Section):
    """One ``[[attack]]`` entry: simulated attackers (simulation only; see
    :mod:`shoal.simulation.attacks`).

    ``fraction`` of the population (exactly, rounded: the clients with the lowest keyed
    hash of the run's seed, the entry's position and the client id) or the named ``clients`` attack
    in rounds ``from_round`` to ``until_round`` (inclusive; unset: to the
    end). ``scale``: the boost of a scaling or model-replacement attack
    (unset: clients_per_round over the server learning rate, n / eta as in
    Bagdasaryan et al.; a backdoor's default is 1). ``noise_std``: the
    Gaussian noise an attacker sends instead of its update. ``target_label``:
    the label a backdoor's triggered examples take (default 0), or that a
    label flip gives every example (unset: y becomes C - 1 - y), with
    ``num_classes`` C (unset: the ``[data]`` dataset's). ``poison_fraction``:
    the share of a backdoor attacker's training examples that get the
    trigger (features ``trigger`` set to ``trigger_value``; unset: the
    largest feature value of the examples it is put on) and the target label.
    A key that the entry's kind does not read is refused.
    """

    kind: AttackKind
    fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    clients: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    from_round: Annotated[int, Field(ge=1), _ROUNDS] = 1
    until_round: Annotated[int, Field(ge=1), _ROUNDS] | None = None
    scale: PositiveFloat | None = None
    noise_std: PositiveFloat = 1.0
    target_label: Annotated[int, Field(ge=0), _CLASSES] | None = None
    num_classes: Annotated[int, Field(ge=2), _CLASSES] | None = None
    poison_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    trigger: list[Annotated[int, Field(ge=0), _FEATURES]] = Field(
        default_factory=lambda: list(DEFAULT_TRIGGER), min_length=1
    )
    trigger_value: float | None = None

    @model_validator(mode="after")
    def _coherent(self) -> AttackEntry:
        if (self.fraction is None) == (self.clients is None):
            raise ValueError(f"a {self.kind} attack names its attackers: give fraction or clients")
        if self.clients is not None and len(set(self.clients)) != len(self.clients):
            raise ValueError("attack.clients lists each client once")
        if self.until_round is not None and self.until_round < self.from_round:
            raise ValueError(
                f"attack.until_round ({self.until_round}) comes before from_round "
                f"({self.from_round})"
            )
        stray = [  # a run's config.json holds every default: only a changed value is stray
            key
            for key in sorted(self.model_fields_set - _ATTACK_KEYS[self.kind] - _ATTACK_COMMON)
            if getattr(self, key) != _default_of(AttackEntry, key)
        ]
        if stray:
            raise ValueError(f"attack.{stray[0]} does not apply to a {self.kind} attack")
        if len(set(self.trigger)) != len(self.trigger):
            raise ValueError("attack.trigger lists each feature index once")
        return self

    def classes_or(self, default: int) -> int:
        """The number of classes a label attack assumes: ``num_classes``, else ``default``."""
        return default if self.num_classes is None else self.num_classes

    def active(self, round_number: int) -> bool:
        """Whether the attackers of this entry attack in ``round_number``."""
        until = self.until_round
        return self.from_round <= round_number and (until is None or round_number <= until)


_ATTACK_COMMON = frozenset({"kind", "fraction", "clients", "from_round", "until_round"})
PlaybookTrigger = Literal[
    "accuracy_drop", "loss", "divergence", "flagged_share", "flagged_harm", "step"
]
PLAYBOOK_TRIGGERS: tuple[PlaybookTrigger, ...] = (
    "accuracy_drop",
    "loss",
    "divergence",
    "flagged_share",
    "flagged_harm",
    "step",
)


class PlaybookSection(_Section):
    """[playbook]: the poisoned-model playbook, run on every committed version.

    A version is judged against the last one marked GOOD
    (:mod:`shoal.governance.playbook`): its accuracy falling more than
    ``max_accuracy_drop`` (relative: 0.3 is 30% of the GOOD accuracy) and by at least
    ``min_accuracy_drop`` (absolute, in accuracy: a relative drop near chance means nothing), a
    NaN or infinite loss or an evaluation loss above ``max_loss_ratio`` times
    the GOOD one, a median divergence above ``max_divergence_ratio`` times the
    GOOD round's, more than ``max_flagged_share`` of the participants flagged, a flagged
    participant together with an accuracy drop past ``max_accuracy_drop_flagged`` (relative)
    and ``min_accuracy_drop_flagged`` (absolute),
    or a model step above ``max_step_ratio`` times the GOOD one; ``triggers``
    lists the rules in force. ``evaluation``: whose accuracy and loss count
    (``auto``: the server app's central evaluation when it has one, else the
    federated evaluation rounds). A version that passes an evaluation is
    marked GOOD; a BAD one is marked BAD with its reasons, HEAD rolls back to
    the last GOOD version, and ``suspend`` says who is suspended: the clients
    flagged by the divergence measure, the round's whole cohort, or nobody;
    where no client could be measured (secure aggregation, divergence off),
    ``suspend_unmeasured`` says what ``flagged`` becomes.
    """

    enabled: bool = True
    evaluation: Literal["auto", "central", "federated"] = "auto"
    max_accuracy_drop: Fraction = 0.3
    min_accuracy_drop: Fraction = 0.1
    max_loss_ratio: Annotated[float, Field(ge=1)] = 3.0
    max_divergence_ratio: Annotated[float, Field(ge=1)] = 10.0
    max_flagged_share: Fraction = 0.5
    max_accuracy_drop_flagged: Fraction = 0.05
    min_accuracy_drop_flagged: Fraction = 0.05
    max_step_ratio: Annotated[float, Field(ge=1)] = 10.0
    triggers: list[PlaybookTrigger] = Field(default_factory=lambda: list(PLAYBOOK_TRIGGERS))
    suspend: Literal["flagged", "cohort", "none"] = "flagged"
    suspend_unmeasured: Literal["cohort", "none"] = "cohort"


class AlertsSection(_Section):
    """[alerts]: the job's alert hooks, told of every alert (a cohort that dropped, a spent
    privacy budget): shell commands (the alert as JSON on stdin) and ``module:function`` hooks."""

    commands: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    hooks: list[Annotated[str, Field(pattern=r"^[^:]+:[^:]+$")]] = Field(default_factory=list)
    timeout_s: Annotated[float, Field(gt=0), Limit(86_400, "a hook holds up its run")] = 30.0


class TelemetrySection(_Section):
    """[telemetry]: each round's fleet figures in its row (drop rate by stage and reason,
    round-trip and training percentiles, the straggler index, cohort fairness by device class,
    bytes per client) and in the summary; off, the engine books no per-client timing."""

    enabled: bool = True


class TrackingSection(_Section):
    """[tracking]: MLflow (extra `mlflow`); unset URI: a SQLite store in the run folder.

    ``log_model`` attaches the final model (HEAD) to the MLflow run as safetensors.
    """

    mlflow: bool = False
    tracking_uri: str | None = None
    experiment: str | None = None
    log_model: bool = True


class ReportSection(_Section):
    """[report]: the run's HTML report (``report.html`` in the run folder), written at its end."""

    enabled: bool = True


class CanariesSection(_Section):
    """[canaries]: random records planted in some clients' data, and their exposure at the end.

    Measures purpose limitation (Carlini et al. 2019): how much more likely
    the trained model makes a planted secret than candidates never planted.
    Each holder trains on every canary, ``repeats`` copies of each; the
    holders are ``holders`` clients, else the ``clients`` share of the
    population. The records and the holders derive from the run's seed.
    """

    enabled: bool = False
    count: Annotated[int, Field(ge=1), Limit(10_000, "each canary is measured on its own")] = 10
    clients: Fraction = 0.1
    holders: Annotated[int, Field(ge=0), _CLIENTS] | None = None
    repeats: Annotated[int, Field(ge=1), Limit(10_000, "a holder keeps every copy in memory")] = 1
    references: Annotated[
        int, Field(ge=3), Limit(1_000_000, "the model scores every reference at the end")
    ] = 1000
    distribution: Literal["skewnorm", "normal"] = "skewnorm"  # for the extrapolated exposure
    every_version: bool = False  # also measure each committed version (a column of metrics)

    @model_validator(mode="after")
    def _copies_fit_in_memory(self) -> CanariesSection:
        copies = self.count * self.repeats
        if copies > MAX_CANARY_COPIES:
            raise ValueError(
                f"count * repeats = {copies:,} canary copies is above the limit of "
                f"{MAX_CANARY_COPIES:,}: a holder keeps every copy of every canary in memory "
                "at once, as examples of the built-in data"
            )
        return self


BUILTIN_CLIENT_APP = "shoal.apps.builtin:client_app"
BUILTIN_SERVER_APP = "shoal.apps.builtin:server_app"


class AppSection(_Section):
    """[app]: the user's code, ``MODULE:ATTRIBUTE`` (see ``shoal.client.app``, ``coordinator.app``).

    The apps are imported from the config file's folder first, then from the
    folders of ``path`` (a relative one is found from the config file's folder,
    as ``[policy] files`` are), then from the current directory. ``server``
    unset: the built-in server side with the built-in client app, every
    default with any other.
    """

    client: str = BUILTIN_CLIENT_APP
    server: str | None = None
    options: dict[str, str] = Field(default_factory=dict)
    path: list[str] = Field(default_factory=list)  # folders to import the apps from, first

    @field_validator("client", "server")
    @classmethod
    def _spec(cls, spec: str | None) -> str | None:
        if spec is not None:
            module, separator, attribute = spec.partition(":")
            if not separator or not module or not attribute:
                raise ValueError(f"an app is MODULE:ATTRIBUTE, got {spec!r}")
        return spec

    @property
    def server_spec(self) -> str | None:
        if self.server is None and self.client == BUILTIN_CLIENT_APP:
            return BUILTIN_SERVER_APP
        return self.server


_DIGITS = frozenset({"digits"})
_SYNTHETIC = frozenset({"synthetic", "synthetic_iid"})
_DATA_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # a [data] key of the built-in data: the datasets it applies to, and (digits) the partitions
    "partition": (_DIGITS, frozenset()),
    "dirichlet_alpha": (_DIGITS, frozenset({"dirichlet"})),
    "shards_per_client": (_DIGITS, frozenset({"shards"})),
    "power_law_exponent": (_DIGITS, frozenset({"power_law"})),
    "min_samples": (_DIGITS, frozenset({"dirichlet", "power_law"})),
    "test_fraction": (_DIGITS, frozenset()),
    "local_eval_fraction": (_DIGITS | {"gaussian"}, frozenset()),
    "synthetic_alpha": (frozenset({"synthetic"}), frozenset()),
    "synthetic_beta": (frozenset({"synthetic"}), frozenset()),
    "max_samples_per_client": (_SYNTHETIC, frozenset()),
    "samples_per_client": (frozenset({"gaussian"}), frozenset()),
    "num_features": (frozenset({"gaussian"}), frozenset()),
    "num_classes": (frozenset({"gaussian"}), frozenset()),
}
_DATASET_KEYS_WHY = {
    "digits": "digits has 64 features and 10 classes, split across clients by data.partition",
    "gaussian": (
        "each gaussian client draws its own data.samples_per_client examples (IID), with "
        "data.local_eval_fraction of them held out"
    ),
    "synthetic": (
        "FedProx's devices draw their own examples and held-out share, skewed by "
        "synthetic_alpha and synthetic_beta, at most max_samples_per_client each"
    ),
    "synthetic_iid": (
        "FedProx's IID devices share one model and draw their own examples and held-out share, "
        "at most max_samples_per_client each"
    ),
}


class Config(_Section):
    """A whole run: every section with its defaults."""

    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    strategy: StrategySection = StrategySection()
    client: ClientSection = ClientSection()
    round: RoundSection = RoundSection()
    evaluation: EvaluationSection = EvaluationSection()
    devices: DevicesSection = DevicesSection()
    simulation: SimulationSection = SimulationSection()
    coordinator: CoordinatorSection = CoordinatorSection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    privacy: PrivacySection = PrivacySection()
    tracking: TrackingSection = TrackingSection()
    telemetry: TelemetrySection = TelemetrySection()
    report: ReportSection = ReportSection()
    app: AppSection = AppSection()
    selection: SelectionSection = SelectionSection()
    versions: VersionsSection = VersionsSection()
    policy: PolicySection = PolicySection()
    compression: CompressionSection = CompressionSection()
    features: FeaturesSection = FeaturesSection()
    statistics: StatisticsSection = StatisticsSection()
    preprocessing: PreprocessingSection = PreprocessingSection()
    alerts: AlertsSection = AlertsSection()
    divergence: DivergenceSection = DivergenceSection()
    drift: DriftSection = DriftSection()
    clustering: ClusteringSection = ClusteringSection()
    metadata: MetadataSection = MetadataSection()
    canaries: CanariesSection = CanariesSection()
    attack: list[AttackEntry] = Field(default_factory=list)  # simulation only
    playbook: PlaybookSection = PlaybookSection()

    @model_validator(mode="after")
    def _fits_in_memory(self) -> Config:
        """The built-in model and a client's built-in data fit their budgets (one line each)."""
        model, data = self.model, self.data
        features, classes = data.shape
        model_budget = 4 * MAX_MODEL_PARAMETERS  # bytes, as float32
        mlp = model.model_copy(update={"kind": "mlp"})  # model.hidden is bounded as an MLP's
        within_budget(
            "model.hidden",
            model.hidden,
            needed=4 * mlp.num_parameters(features=features, classes=classes),
            budget=model_budget,
            bytes_each=4 * (features + 1 + classes),
            fixed_bytes=4 * classes,
            what="the model would need" if model.kind == "mlp" else "an MLP this wide would need",
        )
        if model.kind == "softmax":
            within_budget(
                "data.num_features",
                data.num_features,
                needed=4 * model.num_parameters(features=features, classes=classes),
                budget=model_budget,
                bytes_each=4 * classes,
                fixed_bytes=4 * classes,
                what="the model would need",
            )
        if data.dataset == "gaussian":
            each = 4 * features + 8  # float32 features and an int64 label
            within_budget(
                "data.samples_per_client",
                data.samples_per_client,
                needed=each * data.samples_per_client,
                budget=MAX_CLIENT_DATA_BYTES,
                bytes_each=each,
                what="a client's examples would need",
            )
        return self

    @model_validator(mode="after")
    def _statistics_run(self) -> Config:
        """A statistics run has bounds one a feature, plays one round, and averages the
        clients' moments as they are: no setting of a training run that would change them."""
        section = self.statistics
        if not section.enabled:
            return self
        try:
            features = section.bounds().features
        except ConfigError as exc:
            raise ValueError(f"statistics: {exc}") from None
        # every moment lies in [0, 1]: a client's vector is as long as sqrt(2 * features)
        largest = (2 * features) ** 0.5
        secure = self.secure_aggregation
        conflicts = [
            (self.run.rounds != 1, "run.rounds = 1: its one round is the statistics"),
            (self.strategy != StrategySection(), "no [strategy]: the moments are averaged"),
            (self.privacy.enabled, "no [privacy]: private statistics are not built"),
            (self.compression.enabled, "no [compression]: the moments go up whole"),
            (self.clustering.clusters != 1, "no [clustering]: one population's statistics"),
            (self.preprocessing.statistics is not None, "no [preprocessing]: it is pass 2's"),
            (
                secure.protocol == "secagg+" and secure.clip < 1,
                "secure_aggregation.clip >= 1: every moment lies in [0, 1]",
            ),
            (
                secure.protocol == "secagg+" and secure.bits is not None and secure.bits < 16,
                "secure_aggregation.bits >= 16 (or unset: the most the cohort allows): fewer "
                "round the moments past use",
            ),
            (
                self.policy.enabled and self.policy.max_l2_norm < largest,
                f"policy.max_l2_norm >= {largest:.6g}: the moments of {features} features "
                "may be that long",
            ),
        ]
        wrong = [why for conflict, why in conflicts if conflict]
        if wrong:
            raise ValueError(f"a statistics run ([statistics] enabled) needs {'; '.join(wrong)}")
        return self

    @model_validator(mode="after")
    def _attack_labels(self) -> Config:
        """A label attack's target is one of the classes (the simulator checks named clients)."""
        classes = self.data.shape[1]
        for index, entry in enumerate(self.attack):
            label, count = entry.target_label, entry.classes_or(classes)
            if label is not None and label >= count:
                raise ValueError(
                    f"attack.{index}.target_label ({label}) is not below the {count} classes "
                    "(set num_classes for an app with other labels)"
                )
        return self

    @model_validator(mode="after")
    def _data_keys_apply(self) -> Config:
        """A [data] key the built-in data ignores, changed from its default, is said to be
        ignored (a warning: a run whose stored config holds one still resumes; a user's client
        app reads the config as it likes, so its keys are its own)."""
        if self.app.client != BUILTIN_CLIENT_APP:
            return self
        data = self.data
        for key in sorted(_DATA_KEYS):
            value = getattr(data, key)
            if value == _default_of(DataSection, key):
                continue
            datasets, partitions = _DATA_KEYS[key]
            if data.dataset not in datasets:
                log.warning(
                    "data.%s = %r is ignored: it does not apply to the %s dataset: %s",
                    key,
                    value,
                    data.dataset,
                    _DATASET_KEYS_WHY[data.dataset],
                )
            elif partitions and data.partition not in partitions:
                named = " or ".join(repr(partition) for partition in sorted(partitions))
                log.warning(
                    "data.%s = %r is ignored: it applies to data.partition = %s, not %r",
                    key,
                    value,
                    named,
                    data.partition,
                )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.round.clients_per_round > self.data.num_clients:
            raise ValueError(
                f"round.clients_per_round ({self.round.clients_per_round}) exceeds "
                f"data.num_clients ({self.data.num_clients})"
            )
        privacy, secure = self.privacy, self.secure_aggregation
        if privacy.placement == "distributed" and secure.protocol != "secagg+":
            raise ValueError(
                "privacy.placement = 'distributed' adds each client's share of the noise inside "
                "secure aggregation, so that no one sees a less noised value: set "
                "secure_aggregation.protocol = 'secagg+'"
            )
        if privacy.enabled and privacy.adaptive_clipping and secure.enabled:
            raise ValueError(
                "privacy.adaptive_clipping counts the clients whose update was not clipped, "
                "which secure aggregation hides: switch one of them off"
            )
        if privacy.enabled and privacy.sampling == "poisson" and secure.bits is not None:
            raise ValueError(
                "privacy.sampling = 'poisson' draws cohorts of no fixed size, which fixed "
                "secure_aggregation.bits could overflow: leave bits unset (fitted each round)"
            )
        if self.compression.kind == "topk" and self.clustering.clusters > 1:
            raise ValueError(
                "compression.kind = 'topk' keeps what a client left out for its next update, "
                "which lands in the cluster it trained last when it chooses another: use "
                "'int8' or 'ternary' with clustering.clusters > 1"
            )
        if self.compression.enabled and secure.enabled:
            raise ValueError(
                f"compression.kind = {self.compression.kind!r} encodes each update in the "
                "clear, and secure aggregation masks or encrypts the whole update instead: "
                "set compression.kind = 'none', or secure_aggregation.protocol = 'none'"
            )
        if self.clustering.clusters > 1 and (secure.enabled or privacy.enabled):
            raise ValueError(
                "clustering.clusters > 1 averages each cluster model over the clients that "
                "chose it, which needs each client's update in the clear and its own weight: "
                "switch secure_aggregation and privacy off, or set clustering.clusters = 1"
            )
        clustering = self.clustering
        lacking = []  # only what fails: "clusters >= 2 (got 2)" sent users to a fine setting
        if clustering.clusters < 2:
            lacking.append(f"clustering.clusters >= 2 (got {clustering.clusters})")
        if not self.drift.enabled:
            lacking.append("drift.enabled = true (got false)")
        if clustering.start == "flagged" and lacking:
            raise ValueError(
                "clustering.start = 'flagged' splits the model when the drift flags distinct "
                f"populations: it needs {' and '.join(lacking)}"
            )
        if privacy.enabled and privacy.epsilon is None and privacy.noise_multiplier is None:
            raise ValueError("privacy: set epsilon (the budget) or noise_multiplier, or both")
        return self

    @model_validator(mode="after")
    def _robust_rule_fits_the_round(self) -> Config:
        """A robust aggregator can do its work with the fewest updates a round commits with:
        else Krum would refuse that round only once every client of it has trained, and a
        median or trimmed mean would be a plain mean."""
        from shoal.aggregation.strategy import fewest_updates, make_strategy

        if self.secure_aggregation.enabled or self.privacy.enabled:
            return self  # both refuse every rule but the mean (shoal.coordinator.setup)
        try:
            strategy = make_strategy(
                self.strategy.name, **self.strategy.model_dump(exclude={"name"})
            )
        except StrategyError:
            return self  # refused where the strategy is built, naming the option
        needed, closing = fewest_updates(strategy.aggregator), self.round.fewest_updates
        if closing < needed:
            raise ValueError(
                f"strategy {strategy.name!r} needs at least {needed} updates a round "
                f"({_what_the_rule_needs(strategy.aggregator)}), but a round may close with "
                f"{closing} (round.quorum = {self.round.quorum:g} of round.clients_per_round = "
                f"{self.round.clients_per_round}): raise those to close with {needed} or more"
                f"{_or_fewer_needed(strategy.aggregator, closing)}"
            )
        return self

    @model_validator(mode="after")
    def _canary_holders(self) -> Config:
        holders = self.canaries.holders
        if holders is not None and holders > self.data.num_clients:
            raise ValueError(
                f"canaries.holders ({holders}) exceeds data.num_clients ({self.data.num_clients})"
            )
        return self


def _what_the_rule_needs(rule: Aggregator) -> str:
    """Why a robust aggregator needs the updates it does, in its own numbers."""
    from shoal.aggregation.aggregators import Krum, TrimmedMean

    if isinstance(rule, Krum):
        selected = "auto, 1 at the least" if rule.num_selected is None else rule.num_selected
        return f"2f + 2 < n - m, with f = {rule.num_byzantine} and m = {selected}"
    if isinstance(rule, TrimmedMean):
        return f"to trim one from each side at trim_ratio = {rule.trim_ratio:g}; fewer: a mean"
    return "to outvote one attacker; the median of two is their mean"


def _or_fewer_needed(rule: Aggregator, closing: int) -> str:
    """The aggregator's settings that would fit a round of ``closing`` updates, if any do."""
    from shoal.aggregation.aggregators import Krum, TrimmedMean

    if isinstance(rule, Krum):
        selected = 1 if rule.num_selected is None else rule.num_selected
        byzantine = (closing - selected - 3) // 2  # the most f with 2f + m + 3 <= closing
        fits = [f"f = {byzantine}"] if byzantine >= 0 else []
        if rule.num_selected is None or rule.num_selected == 1:
            keys = "strategy.num_byzantine"
        else:
            keys = "strategy.num_byzantine or strategy.num_selected"
            if closing - 2 * rule.num_byzantine - 3 >= 1:
                fits.append(f"m = {closing - 2 * rule.num_byzantine - 3}")
        return f", or lower {keys}" + (f" ({' or '.join(fits)} fits)" if fits else "")
    if isinstance(rule, TrimmedMean) and closing >= 3:  # 1 / closing stays below 1/2
        return f", or raise strategy.trim_ratio to 1/{closing} or more"
    return ""


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a mapping (as read from TOML) into a :class:`Config`."""
    if not isinstance(data, Mapping):  # a run folder's config.json may hold anything
        raise ConfigError(f"a config is a table of sections, not {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, root=Config)) from None


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as TOML literals
    (a scalar given to a text field stays text: ``run.name=2024``)."""
    return apply_settings_overrides(data, overrides, root=Config)


def default_config_path() -> Path:
    """The embedded default job (digits, cross-device): ``shoal simulate`` without a config."""
    return Path(__file__).with_name("default.toml")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """The config in ``path`` with ``overrides`` applied.

    ``None`` is the embedded default job, the one ``shoal simulate`` and
    ``make run`` start from when no config is given; a file starts from
    every section's defaults (an empty file is a valid, small run).
    """
    data = read_toml(default_config_path() if path is None else path)
    return parse_config(apply_overrides(data, overrides))


def config_to_dict(config: Config) -> dict[str, Any]:
    """A plain, JSON-ready mapping of the config, None values dropped."""
    return config.model_dump(mode="json", exclude_none=True)
