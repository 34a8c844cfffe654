"""Loading a client app from ``MODULE:FACTORY``: the factory gets the options, returns a Client."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from shoal.client.api import Client
from shoal.core.errors import ConfigError

AppOptions = Mapping[str, str]
AppFactory = Callable[[AppOptions], Client]


def load_app(spec: str) -> AppFactory:
    """The factory named by ``module.path:function``; ConfigError if it cannot be found."""
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise ConfigError(f"an app is MODULE:FACTORY, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import the app module {module_name!r}: {exc}") from exc
    factory: Any = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"{module_name!r} has no callable {attribute!r}")
    return factory  # type: ignore[no-any-return]


def parse_options(items: list[str]) -> dict[str, str]:
    """``key=value`` pairs from the command line."""
    options = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ConfigError(f"--option expects key=value, got {item!r}")
        options[key] = value
    return options
