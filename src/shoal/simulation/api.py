"""``shoal.simulate``: the simulator from a notebook or a script, with the user's apps as objects.

>>> result = shoal.simulate("job.toml", client_app=client_fn, rounds=5)  # doctest: +SKIP
>>> result.summary["final_accuracy"], len(result.rows), result.folder  # doctest: +SKIP

Apps defined in the notebook or a ``python -`` script work with the process
pool too: they are sent to the workers by value. ``config`` may be a path to
a TOML file, a mapping of sections, a :class:`~shoal.config.Config`, or None
for the embedded default job of ``shoal simulate`` (the same defaults); with
``resume=True`` and an ``out`` folder, None is the run's own job, as for
``shoal simulate --resume`` (``rounds`` may change). A run goes on only with
the app its versions were made by: apps given as objects are given again.

``on_round`` gets each round's metrics row once it is recorded. By then the next round
may have started (its config asked of the server app, its cohort drawn, its training
under way while the round's version committed): a row is for watching the run. To steer
the next round, use the server app, whose ``fit_config``, ``fit_metrics`` and ``evaluate``
run before it starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.client.app import app_search_path, with_config_folder
from shoal.config import Config, apply_overrides, load_config, parse_config
from shoal.core.parameters import Parameters
from shoal.simulation.runner import Simulation, final_parameters, resumed_config
from shoal.telemetry.metrics import MetricsLog

Row = dict[str, Any]


@dataclass(frozen=True)
class SimulationResult:
    """What a simulation left: its rows, its summary, the final model and the run folder."""

    folder: Path
    summary: dict[str, Any]
    parameters: Parameters
    rows: list[Row] = field(default_factory=list)


def job_config(
    config: Config | Mapping[str, Any] | str | Path | None, overrides: Iterable[str] = ()
) -> Config:
    """A job config from any form ``simulate`` takes, with ``section.key=value`` on top."""
    if isinstance(config, Config):
        data = config.model_dump(mode="json", exclude_none=True)
        return parse_config(apply_overrides(data, overrides))
    if isinstance(config, Mapping):
        return parse_config(apply_overrides(config, overrides))
    return with_config_folder(load_config(config, overrides), config)


def simulate(
    config: Config | Mapping[str, Any] | str | Path | None = None,
    *,
    client_app: Any = None,
    server_app: Any = None,
    out: str | Path | None = None,
    rounds: int | None = None,
    overrides: Iterable[str] = (),
    resume: bool = False,
    on_round: Callable[[Row], None] | None = None,
) -> SimulationResult:
    """Run a simulation and return its result; see the module docstring.

    ``client_app`` and ``server_app`` replace the apps named in ``[app]``;
    ``out`` is the run folder (default ``runs/NAME-TIMESTAMP``, as the CLI).
    """
    extra = [*overrides, *([] if rounds is None else [f"run.rounds={rounds}"])]
    if resume and config is None and out is not None:  # the run's own job, as the CLI's --resume
        job = resumed_config(out, extra)
    else:
        job = job_config(config, extra)
    folder = Path(out) if out is not None else _default_folder(job)
    simulation = Simulation(
        job,
        folder,
        resume=resume,
        client_app=client_app,
        server_app=server_app,
        search_path=app_search_path(job),
    )
    summary = simulation.run(on_round=on_round)
    return SimulationResult(
        folder=folder,
        summary=summary,
        parameters=final_parameters(folder),
        rows=MetricsLog(folder / "metrics.jsonl").rows(),
    )


def _default_folder(config: Config) -> Path:
    return Path("runs") / f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
