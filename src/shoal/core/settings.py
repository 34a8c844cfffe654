"""Settings files: TOML read into pydantic models, ``a.b=value`` overrides, one-line errors.

The mechanism under :mod:`shoal.config`, written for any root model: a
file that is missing, a folder, not UTF-8 or not TOML, an override that is
not ``section.key=value``, and every validation error become one line that
names the key (``round.quorum: Input should be ...``), with the closest
known key for a typo and the limit and its reason for a value above a
:class:`~shoal.core.limits.Limit`.
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

from pydantic import BaseModel, ValidationError

from shoal.core.errors import ConfigError
from shoal.core.limits import ABOVE_LIMIT


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a file that is missing, unreadable, not UTF-8 or not TOML is a
    ConfigError (TOML's own message gives the line and column)."""
    try:
        # utf-8-sig: a byte-order mark, as some editors write one, is not TOML's first key
        return tomllib.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} on line {line}); "
            "a TOML file is UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def format_validation_error(error: ValidationError, *, root: type[BaseModel]) -> str:
    """The first error of ``error`` (raised validating ``root``) as one line naming its key."""
    errors = error.errors()
    first = errors[0]
    tagged = next((at for at, part in enumerate(first["loc"]) if _union_tag(part)), None)
    if tagged is not None:  # a union's members each failed: the one that got furthest says why
        members = [e for e in errors if e["loc"][:tagged] == first["loc"][:tagged]]
        first = max(members, key=lambda e: len(e["loc"]))
    location = ".".join(str(part) for part in first["loc"] if not _union_tag(part)) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == ABOVE_LIMIT:
        context = first.get("ctx", {})
        key, value = context.get("key", location), context.get("value", first["input"])
        return f"{key} = {value!r} is above the limit of {context['limit']:,}: {context['why']}"
    if first["type"] == "finite_number":
        return f"{location} = {first['input']!r}: every number of the config must be finite"
    if first["type"] == "extra_forbidden":
        return f"{location}: unknown key{_known_keys_hint(root, first['loc'])}"
    if first["type"] in {"literal_error", "enum"}:
        return f"{location}: {message}, got {first.get('input')!r}"
    return f"{location}: {message}"


def _union_tag(part: object) -> bool:
    """Whether a part of an error's location names the member of a union it was checked
    against (``low: float | list[float]`` fails at ``statistics.low.float``), not a key."""
    return isinstance(part, str) and (part in {"float", "int", "str", "bool"} or "[" in part)


def apply_overrides(
    data: Mapping[str, Any], overrides: Iterable[str], *, root: type[BaseModel]
) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as TOML literals.

    A scalar given to a field of ``root`` that holds only text stays text.
    """
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
        node[keys[-1]] = _parse_value(raw.strip(), _takes_only_text(root, keys))
    return merged


def _section_at(root: type[BaseModel], path: Sequence[str | int]) -> type[BaseModel] | None:
    """The section (a model class) that ``path`` leads to from ``root``; None if none does."""
    model = root
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


def _known_keys_hint(root: type[BaseModel], location: Sequence[str | int]) -> str:
    """`` (did you mean KEY?)`` for the closest key of the section, else the keys it allows."""
    section = _section_at(root, location[:-1])
    if section is None:
        return ""
    known = list(section.model_fields)
    closest = difflib.get_close_matches(str(location[-1]), known, n=1)
    return f" (did you mean {closest[0]}?)" if closest else f"; allowed: {', '.join(known)}"


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


def _takes_only_text(root: type[BaseModel], keys: Sequence[str]) -> bool:
    """Whether the field at ``keys`` holds text only (str, a Literal of strings, or None)."""
    section = _section_at(root, keys[:-1])
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
