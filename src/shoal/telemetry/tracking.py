"""Tracks a run in MLflow: its parameters once, each round's metrics, then files and the model.

>>> with MlflowTracker(run_name="digits-fedavg", folder=run_folder) as tracker:  # doctest: +SKIP
...     tracker.log_params({"rounds": 20, "strategy": {"name": "fedavg"}})
...     tracker.log_round(1, loss=0.41, accuracy=0.88, epsilon=0.52, delta=1e-5)

Each round is logged at ``step=round``: ``loss`` and ``accuracy`` when
given, the privacy figures as ``privacy_epsilon`` and ``privacy_delta``, and
any other numbers passed in ``metrics``. Files (a summary, a report) are
attached with :meth:`MlflowTracker.log_artifact`, and a model version with
:meth:`MlflowTracker.log_model`: a safetensors file and ``shoal.model.*``
tags naming its version and sha256. The tracking store is the given
URI, or by default the SQLite file ``<folder>/mlflow.db`` with artifacts in
``<folder>/mlartifacts`` (MLflow 3 refuses its old file store); the
experiment is named after the run.

The tracker works through an :class:`mlflow.MlflowClient` and an explicit
MLflow run id, never through MLflow's fluent API and its process-wide
active run, so several trackers can live in one process. MLflow is
imported only when a tracker is created: a run without tracking never pays
for it, and without the ``mlflow`` extra that is a
:class:`~shoal.core.errors.MissingExtraError`. MLflow's own errors leave
the tracker as :class:`~shoal.core.errors.RunError`, and so do the
operating system's while it writes artifacts.

The times the tracker gives MLflow (each metric's timestamp, the run's
start and end) are floored to ``timestamp_granularity_s`` seconds
(``[metadata]``): a metrics reader learns when a round was logged only to
that granularity.

An http(s) tracking server is checked once, when the tracker is created: a
TCP connection to it (or to the proxy that the environment names for it)
must open within ``CONNECT_TIMEOUT_S`` seconds, else one
:class:`~shoal.core.errors.RunError` names the URI and the cause, at once
rather than after MLflow's retries. MLflow's client has no per-client
setting for those retries (7, with backoff: about four minutes before a
dead server's error) or for its request timeout (120 s): it reads them from
environment variables at each request. So creating a tracker of an http(s)
URI sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (2),
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` (1) and ``MLFLOW_HTTP_REQUEST_TIMEOUT``
(10 s) in ``os.environ`` (:data:`HTTP_REQUEST_LIMITS`), each one only where
the user has not set it, for the rest of the process and every MLflow
client in it: a request to a server that went away fails in seconds (a
refused connection), or in about half a minute (a server that never
answers).

MLflow's own log lines (its ``mlflow`` logger and the ``alembic`` logger of
its store's migrations) keep MLflow's levels unless
:func:`set_mlflow_log_level` asks for another: the ``shoal`` command holds
them to its own level, so that ``--quiet`` silences them too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from shoal.core.errors import ConfigError, MissingExtraError, RunError
from shoal.core.parameters import Parameters

DEFAULT_STORE_NAME = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
MODEL_FOLDER = "model"  # the artifacts folder of a logged model
MODEL_FILE = "model.safetensors"
LAYOUT_FILE = "layout.json"
MODEL_TAG = "shoal.model"  # the prefix of a logged model's tags
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
MAX_TAG_CHARS = 8000  # and on a tag's
PARAMS_PER_BATCH = 100  # and on the parameters of one log_batch call
METRICS_PER_BATCH = 1000  # and on its metrics

CONNECT_TIMEOUT_S = 5.0  # the reachability check of an http(s) tracking server
DEFAULT_PORTS = {"http": 80, "https": 443}  # the schemes of a tracking server
HTTP_REQUEST_LIMITS = {  # MLflow's HTTP settings, where the user set none (MLflow's: 7, 2, 120)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_T = TypeVar("_T")

MLFLOW_LOGGERS = ("mlflow", "alembic")  # MLflow gives both their own handler and level
_mlflow_log_level: int | None = None


def set_mlflow_log_level(level: int) -> None:
    """Hold MLflow's own log lines to ``level`` and above, from now on.

    MLflow sets its loggers up when it is imported: the level is applied at
    once if it is, else when :func:`import_mlflow` first imports it.
    """
    global _mlflow_log_level
    _mlflow_log_level = level
    if "mlflow" in sys.modules:
        _apply_mlflow_log_level()


def _apply_mlflow_log_level() -> None:
    if _mlflow_log_level is not None:
        for name in MLFLOW_LOGGERS:
            logging.getLogger(name).setLevel(_mlflow_log_level)


def import_mlflow() -> Any:
    """The ``mlflow`` module, or :class:`MissingExtraError` naming the ``mlflow`` extra."""
    try:
        import mlflow
        import mlflow.entities
        import mlflow.exceptions
    except ImportError as exc:
        raise MissingExtraError(
            extra="mlflow", package="mlflow-skinny", feature="MLflow tracking"
        ) from exc
    _apply_mlflow_log_level()
    return mlflow


def default_tracking_uri(folder: str | Path) -> str:
    """The tracking URI of the SQLite store kept in a run folder."""
    return f"sqlite:///{(Path(folder) / DEFAULT_STORE_NAME).resolve()}"


def check_reachable(uri: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`RunError` naming ``uri`` and the cause unless a TCP connection to its
    server opens within ``timeout_s`` seconds: to the proxy instead, where the environment
    names one for it (``HTTPS_PROXY``, ``NO_PROXY``: as MLflow's ``requests`` reads them).

    >>> check_reachable("http://127.0.0.1:9")  # doctest: +SKIP
    Traceback (most recent call last):
    shoal.core.errors.RunError: MLflow tracking server http://127.0.0.1:9 is not reachable: ...
    """
    host, port, via = _first_hop(urllib.parse.urlsplit(uri))
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        cause = f"no answer in {timeout_s:g} s" if isinstance(exc, TimeoutError) else exc.strerror
        raise RunError(
            f"MLflow tracking server {uri} is not reachable: {cause or exc} ({host}:{port}{via})"
        ) from exc


def limit_http_requests() -> None:
    """Bound MLflow's HTTP retries, backoff and request timeout from now on, in the whole
    process (:data:`HTTP_REQUEST_LIMITS`), each one that the user did not set."""
    for name, value in HTTP_REQUEST_LIMITS.items():
        os.environ.setdefault(name, value)


def _first_hop(parts: urllib.parse.SplitResult) -> tuple[str, int, str]:
    """(host, port, a note naming the proxy or nothing) where a request to ``parts`` goes first."""
    host, port = _address(parts)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):
        return host, port, ""
    proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return (*_address(proxy_parts), f" through the proxy {proxy}")


def _address(parts: urllib.parse.SplitResult) -> tuple[str, int]:
    """The host and port of an http(s) URL (the scheme's port by default)."""
    url = parts.geturl()
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(f"{url} is not an http(s) URL")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{url} has an invalid port: {exc}") from exc
    if not parts.hostname:
        raise ConfigError(f"{url} names no host")
    return parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def flatten_params(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, str]:
    """MLflow's flat string parameters: nested keys joined by dots, values as text.

    >>> flatten_params({"rounds": 3, "strategy": {"name": "fedavg", "lr": 0.1}})
    {'rounds': '3', 'strategy.name': 'fedavg', 'strategy.lr': '0.1'}
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten_params(value, prefix=f"{name}.")
        elif isinstance(value, str):
            flat[name] = value[:MAX_PARAM_CHARS]
        elif isinstance(value, bool | int | float) or value is None:
            flat[name] = str(value)
        else:
            flat[name] = json.dumps(value, sort_keys=True, default=str)[:MAX_PARAM_CHARS]
    return flat


class MlflowTracker:
    """One MLflow run: parameters logged once, metrics per round, ended exactly once.

    ``tracking_uri`` None means the SQLite store in ``folder`` (created if
    missing). ``experiment_name`` defaults to ``run_name``. ``resume_run_id``
    reopens that MLflow run (a resumed Shoal run stays one MLflow run); the
    parameters it already holds are known, so logging them again is a no-op.
    """

    def __init__(
        self,
        *,
        run_name: str,
        folder: str | Path | None = None,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
        timestamp_granularity_s: int = 1,
    ) -> None:
        if not run_name:
            raise ConfigError("MLflow tracking needs a run name")
        store_folder: Path | None = None
        if tracking_uri is not None:
            uri = tracking_uri
        elif folder is not None:
            store_folder = Path(folder)
            uri = default_tracking_uri(store_folder)
        else:
            raise ConfigError("MLflow tracking needs a tracking URI or a run folder")
        if timestamp_granularity_s < 1:
            raise ConfigError(
                f"a timestamp granularity is at least 1 s, got {timestamp_granularity_s}"
            )
        self.granularity_ms = 1000 * timestamp_granularity_s
        mlflow = import_mlflow()
        if urllib.parse.urlsplit(uri).scheme in DEFAULT_PORTS:  # a server: fail fast, and bounded
            check_reachable(uri)
            limit_http_requests()
        artifact_location = None
        if store_folder is not None:
            store_folder.mkdir(parents=True, exist_ok=True)
            artifact_location = (store_folder / ARTIFACTS_FOLDER).resolve().as_uri()
        self._entities = mlflow.entities
        self._mlflow_error: type[Exception] = mlflow.exceptions.MlflowException
        self.tracking_uri = uri
        self.experiment_name = experiment_name or run_name
        self._client = self._call("open the tracking store", mlflow.MlflowClient, uri)
        self.experiment_id = self._experiment_id(artifact_location)
        self._params: dict[str, str] = {}
        if resume_run_id is not None:
            run = self._call("reopen the run", self._client.get_run, resume_run_id)
            self._params = dict(run.data.params)
            self._call("reopen the run", self._client.update_run, resume_run_id, "RUNNING")
        else:
            run = self._call(
                "start a run",
                self._client.create_run,
                self.experiment_id,
                start_time=self._now_ms(),
                run_name=run_name,
                tags=dict(tags or {}),
            )
        self.run_id: str = run.info.run_id
        self._status: RunStatus | None = None

    @property
    def ended(self) -> bool:
        """Whether the MLflow run has been closed."""
        return self._status is not None

    def log_params(self, params: Mapping[str, Any], *, resumed: bool = False) -> None:
        """Log the run's parameters (nested mappings flattened with dots).

        A parameter is logged once: logging it again with the same value is
        a no-op, with another value a :class:`ConfigError`, unless the run
        is ``resumed`` (a resume may extend ``run.rounds``): the new value
        then goes into a tag ``resumed.KEY``, since MLflow keeps parameters
        as first logged.
        """
        self._require_open()
        flat = flatten_params(params)
        changed = sorted(
            key for key, value in flat.items() if self._params.get(key, value) != value
        )
        if changed and not resumed:
            raise ConfigError(f"MLflow parameters cannot change once logged: {changed}")
        for key in changed:
            self._call(
                "tag the run", self._client.set_tag, self.run_id, f"resumed.{key}", flat[key]
            )
            del flat[key]
        new = [
            self._entities.Param(key, value)
            for key, value in flat.items()
            if key not in self._params
        ]
        for start in range(0, len(new), PARAMS_PER_BATCH):
            batch = new[start : start + PARAMS_PER_BATCH]
            self._call("log parameters", self._client.log_batch, self.run_id, params=batch)
        self._params |= flat

    def log_round(
        self,
        round: int,
        *,
        loss: float | None = None,
        accuracy: float | None = None,
        epsilon: float | None = None,
        delta: float | None = None,
        metrics: Mapping[str, float | None] | None = None,
    ) -> None:
        """Log one round's metrics at ``step=round``; None values are left out."""
        self._require_open()
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ConfigError(f"round must be an integer >= 0, got {round!r}")
        named = {
            "loss": loss,
            "accuracy": accuracy,
            "privacy_epsilon": epsilon,
            "privacy_delta": delta,
        }
        values = dict(metrics or {})
        for key, value in named.items():
            if value is not None and values.get(key) is not None:
                raise ConfigError(f"metric {key!r} is given twice, by name and in metrics")
            if value is not None:
                values[key] = value
        timestamp_ms = self._now_ms()
        logged = [
            self._entities.Metric(key, value, timestamp_ms, round)
            for key, value in _numbers(values)
        ]
        for start in range(0, len(logged), METRICS_PER_BATCH):
            batch = logged[start : start + METRICS_PER_BATCH]
            self._call("log metrics", self._client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, *, folder: str | None = None) -> None:
        """Attach the file at ``path`` to the run (under ``folder`` of its artifacts);
        a file attached again under the same name replaces the first."""
        self._require_open()
        self._call("log an artifact", self._client.log_artifact, self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tag the run; a tag set again takes the new value (unlike a parameter)."""
        self._require_open()
        batch = [self._entities.RunTag(key, value) for key, value in tags.items()]
        if batch:
            self._call("tag the run", self._client.log_batch, self.run_id, tags=batch)

    def log_model(
        self, parameters: Parameters, *, name: str, version: int, details: Mapping[str, str]
    ) -> dict[str, str]:
        """Attach a model version as ``model/model.safetensors`` and tag the run with it.

        The file's ``__metadata__`` holds the layout and content sha256
        (``shoal.layout``, ``shoal.sha256``: what
        :meth:`~shoal.core.parameters.Parameters.from_bytes` checks) and
        ``shoal.model``, ``shoal.version`` and ``shoal.KEY`` for each of
        ``details``; ``model/layout.json`` holds the layout. The run's tags
        ``shoal.model.*`` (returned) say the same, with the file's own
        sha256: tags, not parameters, since a resumed run logs a later
        version in their place.
        """
        self._require_open()
        metadata = {"shoal.model": name, "shoal.version": str(version)}
        metadata |= {f"shoal.{key}": value for key, value in details.items()}
        data = parameters.to_bytes(metadata)
        layout = parameters.layout.to_json()
        with tempfile.TemporaryDirectory(prefix="shoal-model-") as folder:
            (Path(folder) / MODEL_FILE).write_bytes(data)
            (Path(folder) / LAYOUT_FILE).write_text(layout + "\n")
            self._call(
                "log the model", self._client.log_artifacts, self.run_id, folder, MODEL_FOLDER
            )
        tags = {
            f"{MODEL_TAG}.name": name,
            f"{MODEL_TAG}.version": str(version),
            f"{MODEL_TAG}.sha256": parameters.sha256(),
            f"{MODEL_TAG}.file_sha256": hashlib.sha256(data).hexdigest(),
            f"{MODEL_TAG}.parameters": str(len(parameters.vector)),
            f"{MODEL_TAG}.tensors": str(len(parameters.layout.specs)),
            f"{MODEL_TAG}.layout": layout
            if len(layout) <= MAX_TAG_CHARS
            else f"too long for a tag: see {MODEL_FOLDER}/{LAYOUT_FILE}",
            **{f"{MODEL_TAG}.{key}": value for key, value in details.items()},
        }
        self.set_tags(tags)
        return tags

    def end(self, *, status: RunStatus = "FINISHED") -> None:
        """Close the MLflow run with ``status``; ending it again changes nothing."""
        if self._status is not None:
            return
        end_time = self._now_ms()
        self._call("end the run", self._client.set_terminated, self.run_id, status, end_time)
        self._status = status

    def _now_ms(self) -> int:
        """Now, in milliseconds since the epoch, floored to the granularity."""
        now = int(time.time() * 1000)
        return now - now % self.granularity_ms

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.end()
        else:
            self.end(status="KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _experiment_id(self, artifact_location: str | None) -> str:
        name = self.experiment_name
        experiment = self._call("find the experiment", self._client.get_experiment_by_name, name)
        if experiment is None:
            try:
                return str(
                    self._client.create_experiment(name, artifact_location=artifact_location)
                )
            except self._mlflow_error as exc:  # perhaps created meanwhile by another tracker
                experiment = self._call(
                    "find the experiment", self._client.get_experiment_by_name, name
                )
                if experiment is None:
                    raise self._error("create the experiment", exc) from exc
        if experiment.lifecycle_stage != "active":
            raise RunError(
                f"MLflow experiment {name!r} at {self.tracking_uri} is deleted: "
                "restore it or track under another name"
            )
        return str(experiment.experiment_id)

    def _require_open(self) -> None:
        if self._status is not None:
            raise RunError(f"MLflow run {self.run_id} has ended ({self._status})")

    def _call(self, action: str, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return function(*args, **kwargs)
        except (self._mlflow_error, OSError) as exc:  # OSError: a local artifact store's
            raise self._error(action, exc) from exc

    def _error(self, action: str, exc: Exception) -> RunError:
        """Shoal's error for an MLflow one (the caller raises it ``from exc``)."""
        lines = str(exc).strip().splitlines()
        detail = lines[0] if lines else type(exc).__name__
        return RunError(f"MLflow could not {action} at {self.tracking_uri}: {detail}")


def _numbers(values: Mapping[str, float | None]) -> Iterator[tuple[str, float]]:
    """The metrics to log: None left out, numbers as floats (NaN kept: a diverged loss shows)."""
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"metric {key!r} must be a number, got {value!r}")
        yield key, float(value)
