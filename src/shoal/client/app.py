"""The client app: the unit a user writes, run unchanged in simulation and on deployed clients.

A client app is a factory that receives a :class:`ClientContext` and returns
a :class:`~shoal.client.api.Client`. It is named ``MODULE:ATTRIBUTE`` in the
job's ``[app]`` section (``client = "my_app:client_fn"``), and may be a plain
function or a :class:`ClientApp` that also says how many examples a client
holds (the simulator uses it to time devices before training them)::

    def client_fn(context: ClientContext) -> Client:
        x, y = load_my_share(context.partition_index, context.num_partitions)
        return MyClient(x, y)

A :class:`ClientApp` may also report the device's state: ``device_state``
is called with the context before enrollment and at every check-in, and
returns a :class:`~shoal.core.device.DeviceState` or a mapping of some of
its fields (battery, charging, WiFi, idle, free RAM, device class and the
app, runtime, model-architecture and feature-extractor versions); a fact it
leaves out is reported as unknown, which no eligibility criterion on it
accepts::

    def device_state(context: ClientContext) -> dict[str, object]:
        return {"charging": power.plugged_in(), "wifi": network.unmetered()}

    app = ClientApp(client_fn, device_state=device_state)

Modules are looked up on ``sys.path`` and, before it, in the folder that
holds the job's config, the folders of its ``[app] path`` (a relative one
from the config's folder) and the current directory, so ``my_app.py`` next
to ``job.toml`` needs no ``PYTHONPATH``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.client.api import Client
from shoal.client.clustered import ClusteredClient
from shoal.client.statistics import StatisticsClient
from shoal.config import Config
from shoal.core.device import DeviceState
from shoal.core.errors import ConfigError, ProtocolError
from shoal.features import FeatureModule


@dataclass(frozen=True, slots=True)
class ClientContext:
    """What a client app is told about the client it builds.

    ``partition_index`` and ``num_partitions`` place the client in the
    population: in simulation, its position and the population size; on a
    deployed client, what ``shoal client run --partition-index/--num-partitions``
    gave (None when not given). ``options`` are the job's ``[app] options``
    with the command line's ``--option key=value`` on top. ``seed`` is the
    run's seed, ``config`` the whole job config. ``features`` is the run's feature module
    (``[features]``; None without one): what turns the client's raw records into the
    model's features, the same module on every client, simulated or deployed.
    """

    client_id: str
    partition_index: int | None = None
    num_partitions: int | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    config: Config = field(default_factory=Config)
    features: FeatureModule | None = None

    def require_partition(self) -> tuple[int, int]:
        """``(partition_index, num_partitions)``; a ConfigError when the client was not placed."""
        if self.partition_index is None or self.num_partitions is None:
            raise ConfigError(
                f"client {self.client_id!r} has no partition: give `shoal client run` "
                "--partition-index and --num-partitions"
            )
        return self.partition_index, self.num_partitions


ClientFn = Callable[[ClientContext], Client]
ExampleCounts = Callable[[ClientContext], tuple[int, int]]
DeviceStateProvider = Callable[[ClientContext], DeviceState | Mapping[str, Any]]
DEVICE_FIELDS = tuple(item.name for item in dataclasses.fields(DeviceState))


def device_state_of(value: DeviceState | Mapping[str, Any]) -> DeviceState:
    """A :class:`DeviceState` from what a provider returned; a ConfigError names what is wrong.

    >>> device_state_of({"charging": True}).charging, device_state_of({}).wifi
    (True, None)
    """
    if isinstance(value, DeviceState):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"the device-state provider returned {type(value).__name__}, "
            "not a DeviceState or a mapping"
        )
    unknown = sorted(set(value) - set(DEVICE_FIELDS))
    if unknown:
        raise ConfigError(
            f"the device-state provider returned unknown fields {', '.join(map(str, unknown))} "
            f"(allowed: {', '.join(DEVICE_FIELDS)})"
        )
    try:
        return DeviceState(**value)
    except (ProtocolError, TypeError) as exc:
        raise ConfigError(f"the device-state provider returned a bad state: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ClientApp:
    """A client factory, and optionally how many (train, evaluate) examples a client holds
    and what state its device is in.

    Without ``num_examples`` the simulator times every device as if it held
    ``devices.nominal_examples`` training examples (the number the client
    reports after training is what weighs its update). Without
    ``device_state`` a deployed client reports every fact of its device as
    unknown (and the default versions).
    """

    client_fn: ClientFn
    num_examples: ExampleCounts | None = None
    device_state: DeviceStateProvider | None = None

    def report_device_state(self, context: ClientContext) -> DeviceState:
        """The device's state now, as ``device_state`` tells it (checked)."""
        if self.device_state is None:
            return DeviceState()
        try:
            value = self.device_state(context)
        except ConfigError:
            raise
        except Exception as exc:  # the user's code: one clear line
            raise ConfigError(
                f"the device-state provider failed: {type(exc).__name__}: {exc}"
            ) from exc
        return device_state_of(value)

    def __call__(self, context: ClientContext) -> Client:
        """The app's client for ``context``; under ``[clustering] clusters`` above 1, wrapped
        to train and be evaluated as one of the cluster models (:mod:`shoal.client.clustered`);
        in a statistics run, to count its features (:mod:`shoal.client.statistics`)."""
        client = self.client_fn(context)
        if not isinstance(client, Client):
            raise ConfigError(
                f"the client app returned {type(client).__name__}, not a shoal Client"
            )
        statistics = context.config.statistics
        if statistics.enabled:  # counted, never trained: the config refuses clusters with it
            return StatisticsClient(client, statistics.bounds())
        clusters = context.config.clustering.clusters
        return client if clusters == 1 else ClusteredClient(client, clusters=clusters)


def as_client_app(target: Any, *, name: str = "the client app") -> ClientApp:
    """A :class:`ClientApp` from what a user gave: a ClientApp or a plain factory function."""
    if isinstance(target, ClientApp):
        return target
    if callable(target):
        return ClientApp(target)
    raise ConfigError(f"{name} must be a function of a ClientContext or a ClientApp")


def load_attribute(spec: str, *, search_path: Iterable[str | Path] = ()) -> Any:
    """The object named ``MODULE:ATTRIBUTE``, with ``search_path`` importable first.

    An unimportable module is one ConfigError naming the module, the search
    path and the way to fix it.
    """
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise ConfigError(f"an app is MODULE:ATTRIBUTE, got {spec!r}")
    folders = add_search_path(search_path)
    _forget_shadowed(module_name.split(".")[0], folders)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise ConfigError(f"the app module {module_name!r} failed to import: {exc}") from exc
        searched = ", ".join(folders) or "sys.path"
        raise ConfigError(
            f"cannot import the app module {module_name!r} (searched {searched} and sys.path): "
            f"put {module_name.split('.')[0]}.py next to the job's config or in the current "
            "directory, or list its folder in [app] path (relative to the config's folder) "
            "or PYTHONPATH"
        ) from exc
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"the app module {module_name!r} failed to import: {exc}") from exc
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"the app module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    return target


def add_search_path(search_path: Iterable[str | Path]) -> list[str]:
    """Put the folders first on ``sys.path``, in order (once each, moved to the front where
    an earlier job put them further back); returns them as strings."""
    folders: list[str] = []
    for folder in search_path:
        text = str(Path(folder).resolve())
        if text not in folders:
            folders.append(text)
    for text in reversed(folders):
        while text in sys.path:
            sys.path.remove(text)
        sys.path.insert(0, text)
    return folders


def _forget_shadowed(top: str, folders: Iterable[str]) -> None:
    """Forget the module ``top`` (and its submodules) where it was imported from another file
    than the one the job's ``folders`` hold: two jobs in one process (a notebook, a test run)
    whose apps are both ``app.py`` in their own folders would otherwise both get the first
    one's, silently."""
    loaded = sys.modules.get(top)
    if loaded is None:
        return
    wanted = next(
        (
            candidate
            for folder in folders
            for candidate in (Path(folder) / f"{top}.py", Path(folder) / top / "__init__.py")
            if candidate.is_file()
        ),
        None,
    )
    origin = getattr(loaded, "__file__", None)
    if wanted is None or (origin is not None and Path(origin).resolve() == wanted.resolve()):
        return
    for name in [name for name in sys.modules if name == top or name.startswith(f"{top}.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def load_client_app(spec: str, *, search_path: Iterable[str | Path] = ()) -> ClientApp:
    """The client app named ``MODULE:ATTRIBUTE`` (see :func:`load_attribute`)."""
    return as_client_app(load_attribute(spec, search_path=search_path), name=spec)


def parse_options(items: Iterable[str]) -> dict[str, str]:
    """``key=value`` pairs from the command line."""
    options = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ConfigError(f"--option expects key=value, got {item!r}")
        options[key] = value
    return options


def with_config_folder(config: Config, config_path: str | Path | None) -> Config:
    """``config`` whose ``[app] path`` starts with its file's folder and whose relative
    ``[app] path`` folders, ``[policy] files``, ``[features] module`` and ``[preprocessing]
    statistics`` are found from it, whatever the current directory (all kept absolute, for a
    resume)."""
    if config_path is None:
        return config
    folder = Path(config_path).resolve().parent
    files = [str(folder / name) for name in config.policy.files]  # an absolute name stays
    policy = config.policy.model_copy(update={"files": files})
    module = config.features.module
    features = config.features.model_copy(
        update={"module": None if module is None else str(folder / module)}
    )
    statistics = config.preprocessing.statistics
    preprocessing = config.preprocessing.model_copy(
        update={"statistics": None if statistics is None else str(folder / statistics)}
    )
    folders = [str(folder / name) for name in config.app.path]  # an absolute folder stays
    if str(folder) not in folders:
        folders.insert(0, str(folder))
    section = config.app.model_copy(update={"path": folders})
    return config.model_copy(
        update={
            "policy": policy,
            "app": section,
            "features": features,
            "preprocessing": preprocessing,
        }
    )


def app_search_path(config: Config) -> list[str]:
    """Where a job's apps are imported from first: ``[app] path``, then the current directory."""
    return [*config.app.path, str(Path.cwd())]


def run_features(config: Config) -> FeatureModule | None:
    """The job's feature module (``[features] module``, checked and within its limits); None
    when the job names none. A module that does not hash to ``[features] sha256`` is refused."""
    section = config.features
    if section.module is None:
        if section.sha256 is not None:
            raise ConfigError("features.sha256 pins a module, and features.module names none")
        return None
    module = FeatureModule.load(section.module, limits=section.limits())  # ConfigError if not
    if section.sha256 is not None and module.sha256 != section.sha256:
        raise ConfigError(
            f"the feature module {module.name} {module.version} has sha256 {module.sha256}, "
            f"and features.sha256 pins {section.sha256}"
        )
    return module
