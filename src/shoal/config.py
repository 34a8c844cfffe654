"""Run configuration: TOML validated by pydantic, with ``section.key=value`` overrides.

An unknown key or a bad value is a :class:`ConfigError` whose one-line
message names the key and what is allowed. Every section has defaults, so an
empty file is a valid (small) run.
"""

from __future__ import annotations

import copy
import datetime as dt
import difflib
import tomllib
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shoal.core.errors import ConfigError
from shoal.core.sharing import threshold_fraction_problem

PositiveFloat = Annotated[float, Field(gt=0)]
DEFAULT_STATE_DIR = "coordinator-state"  # where a coordinator keeps its registries and blobs
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RunSection(_Section):
    """[run]: naming, seeding and length of the run."""

    name: str = "shoal"
    seed: int = Field(0, ge=0)
    rounds: int = Field(10, ge=1)


class DataSection(_Section):
    """[data]: the federated dataset and how it is split across clients."""

    dataset: Literal["digits", "synthetic", "synthetic_iid", "gaussian"] = "digits"
    num_clients: int = Field(100, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "power_law"] = "dirichlet"
    dirichlet_alpha: PositiveFloat = 0.5
    shards_per_client: int = Field(2, ge=1)
    power_law_exponent: PositiveFloat = 1.5
    min_samples: int = Field(2, ge=1)
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    local_eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    synthetic_alpha: float = Field(1.0, ge=0)
    synthetic_beta: float = Field(1.0, ge=0)
    max_samples_per_client: int | None = Field(None, ge=1)
    samples_per_client: int = Field(200, ge=1)
    num_features: int = Field(64, ge=1)
    num_classes: int = Field(10, ge=2)


class ModelSection(_Section):
    """[model]: the reference NumPy model the clients train."""

    kind: Literal["softmax", "mlp"] = "softmax"
    hidden: int = Field(32, ge=1)


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
    num_byzantine: Annotated[int, Field(ge=0)] | None = None
    num_selected: Annotated[int, Field(ge=1)] | None = None

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

    epochs: PositiveFloat = 1.0
    batch_size: int = Field(16, ge=0)
    learning_rate: PositiveFloat = 0.1
    # record-level DP-SGD: per-example clipping and Gaussian noise in every local step
    dp_sgd: bool = False
    dp_sgd_clip_norm: PositiveFloat = 1.0
    dp_sgd_noise_multiplier: Annotated[float, Field(ge=0)] = 1.0
    dp_sgd_delta: Annotated[float, Field(gt=0, lt=1)] | None = None  # unset: 1 / examples


class RoundSection(_Section):
    """[round]: cohort size, over-selection, quorum, deadline, and the bounds on every update."""

    clients_per_round: int = Field(10, ge=1)
    over_selection: Annotated[float, Field(ge=1)] = 1.3
    quorum: Annotated[float, Field(gt=0, le=1)] = 0.8
    deadline_s: PositiveFloat = 600.0
    # the floor every update clears, whoever sent it (the norm policy of governance goes further):
    # the weight a client claims, and the magnitude of each value (finite, always)
    max_examples_per_client: int = Field(10_000_000, ge=1)
    max_update_abs: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e6


class EvaluationSection(_Section):
    """[evaluation]: federated evaluation rounds and the central held-out test."""

    every: int = Field(5, ge=0)
    clients: int = Field(10, ge=1)
    centralized: bool = True


class DeviceClass(_Section):
    """One class of device in the population (``[[devices.classes]]``)."""

    name: str
    share: PositiveFloat
    examples_per_second: PositiveFloat = 200.0
    download_mbps: PositiveFloat = 20.0
    upload_mbps: PositiveFloat = 5.0
    latency_s: Annotated[float, Field(ge=0)] = 0.2
    availability: Fraction = 1.0
    dropout: Fraction = 0.0


def _default_device_classes() -> list[DeviceClass]:
    return [DeviceClass(name="uniform", share=1.0)]


class DevicesSection(_Section):
    """[devices]: device classes, per-round speed jitter, and straggler policy."""

    classes: list[DeviceClass] = Field(default_factory=_default_device_classes, min_length=1)
    speed_jitter: Annotated[float, Field(ge=0)] = 0.3
    straggler_fraction: Fraction = 0.0
    straggler_policy: Literal["drop", "partial"] = "drop"
    # the training examples a device is timed by when its app does not say (ClientApp.num_examples)
    nominal_examples: int = Field(100, ge=1)

    @field_validator("classes")
    @classmethod
    def _unique_names(cls, classes: list[DeviceClass]) -> list[DeviceClass]:
        names = [device.name for device in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"device class names must be unique, got {names}")
        return classes


class SimulationSection(_Section):
    """[simulation]: how and where local training is executed."""

    workers: int = Field(2, ge=0)
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
    run_id: str = Field("run-1", min_length=1, max_length=128)
    state_dir: str = DEFAULT_STATE_DIR
    certificates: str | None = None
    mutual_tls: bool = False
    registry_url: str | None = None
    blob_url: str | None = None
    # each a bare secret, or a table with max_uses and ttl_days or expires; read as tables
    enrollment_tokens: list[EnrollmentTokenEntry] = Field(default_factory=list)
    max_update_mb: PositiveFloat = 64.0
    retry_after_s: PositiveFloat = 2.0
    grace_s: Annotated[float, Field(ge=0)] = 5.0
    # after the last round, how long check-ins are still answered "the run has finished"
    linger_s: Annotated[float, Field(ge=0)] = 10.0

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


class SecureAggregationSection(_Section):
    """[secure_aggregation]: the coordinator learns only the sum (SecAgg+, or CKKS across silos)."""

    protocol: Literal["none", "secagg+", "ckks"] = "none"
    degree: int | None = Field(None, ge=1)  # neighbours per client; unset: about 2 log2 n
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
    # `shoal keyholder serve`), the CA that pins it, the silos' receipt keys, its minimum
    key_holder: str | None = None
    key_holder_ca: str | None = None
    silo_keys: str | None = None
    min_contributors: int = Field(2, ge=2)

    @property
    def enabled(self) -> bool:
        return self.protocol != "none"

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
    epsilon: PositiveFloat | None = None  # the run's budget: training stops before it is spent
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None  # unset: 1 / population
    noise_multiplier: Annotated[float, Field(ge=0)] | None = None  # unset: calibrated to epsilon
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
    client_min_noise_multiplier: Annotated[float, Field(ge=0)] = 0.1
    # False: seeded noise and DP cohorts, reproducible and predictable: simulations only
    secure_noise: bool = True
    alert_command: str | None = None  # run when the budget is exhausted (event JSON on stdin)
    alert_hook: str | None = None  # "module:function" called with the event

    @property
    def enabled(self) -> bool:
        return self.placement != "none"


class TrackingSection(_Section):
    """[tracking]: MLflow (extra `mlflow`); unset URI: a SQLite store in the run folder."""

    mlflow: bool = False
    tracking_uri: str | None = None
    experiment: str | None = None


BUILTIN_CLIENT_APP = "shoal.apps.builtin:client_app"
BUILTIN_SERVER_APP = "shoal.apps.builtin:server_app"


class AppSection(_Section):
    """[app]: the user's code, ``MODULE:ATTRIBUTE`` (see ``shoal.client.app``, ``coordinator.app``).

    The folder of the config file and the current directory are importable.
    ``server`` unset: the built-in server side with the built-in client app,
    every default with any other.
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
    app: AppSection = AppSection()

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
        if privacy.enabled and privacy.epsilon is None and privacy.noise_multiplier is None:
            raise ValueError("privacy: set epsilon (the budget) or noise_multiplier, or both")
        return self


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{location}: unknown key{_known_keys_hint(first['loc'])}"
    if first["type"] in {"literal_error", "enum"}:
        return f"{location}: {message}, got {first.get('input')!r}"
    return f"{location}: {message}"


def _section_at(path: Sequence[str | int]) -> type[BaseModel] | None:
    """The section (a model class) that ``path`` leads to from the top; None if none does."""
    model: type[BaseModel] = Config
    for part in path:
        if isinstance(part, int):
            continue  # an item of a list of sections, such as devices.classes
        field = model.model_fields.get(part)
        found = None if field is None else _model_in(field.annotation)
        if found is None:
            return None
        model = found
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):  # list[DeviceClass], Section | None
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _known_keys_hint(location: Sequence[str | int]) -> str:
    """`` (did you mean KEY?)`` for the closest key of the section, else the keys it allows."""
    section = _section_at(location[:-1])
    if section is None:
        return ""
    known = list(section.model_fields)
    closest = difflib.get_close_matches(str(location[-1]), known, n=1)
    return f" (did you mean {closest[0]}?)" if closest else f"; allowed: {', '.join(known)}"


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a mapping (as read from TOML) into a :class:`Config`."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is a ConfigError."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as TOML literals."""
    merged: dict[str, Any] = copy.deepcopy(dict(data))  # TOML's dates are no JSON
    for override in overrides:
        path, separator, raw = override.partition("=")
        keys = [key.strip() for key in path.split(".")]
        if not separator or len(keys) < 2 or not all(keys):
            raise ConfigError(f"--set expects section.key=value, got {override!r}")
        node = merged
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[:-1])}: is a value, not a section")
            node = child
        node[keys[-1]] = _parse_value(raw.strip(), _takes_only_text(keys))
    return merged


def _parse_value(raw: str, text: bool = False) -> Any:
    """A TOML literal, or ``raw`` itself: for a bare word, and for a scalar given to a text field.

    ``run.name=2024`` names the run "2024": TOML would read a number (or a
    boolean, or a date) where the field wants text.
    """
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word such as fedprox is taken as a string
    if text and isinstance(value, bool | int | float | dt.date | dt.time):
        return raw
    return value


def _takes_only_text(keys: Sequence[str]) -> bool:
    """Whether the field at ``keys`` holds text only (str, a Literal of strings, or None)."""
    section = _section_at(keys[:-1])
    field = None if section is None else section.model_fields.get(keys[-1])
    return field is not None and _is_text(field.annotation)


def _is_text(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if annotation is str:
        return True
    if origin is Literal:
        return all(isinstance(value, str) for value in get_args(annotation))
    if origin is Annotated:
        return _is_text(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        return bool(members) and all(_is_text(member) for member in members)
    return False


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
