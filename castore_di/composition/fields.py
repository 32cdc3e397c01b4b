"""The config toolkit: shared field validators and URL query -> typed config fields.

Validators are attrs validators raising :class:`ConfigError` with the field's name. A URL's
query goes through :func:`parse_query` (a key given twice is refused, everywhere) and
:func:`config_from_url_fields`, which turns each text value into the field's type and then
structures the whole config with the one strict converter, so a URL and a config file are
checked by the same rules.
"""

from __future__ import annotations

import math
import re
import sys
import types
import typing
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import attrs

from castore_di.errors import ConfigError

__all__ = [
    "MAX_DURATION",
    "MAX_MAP_SIZE",
    "between",
    "duration",
    "map_size",
    "path_text",
    "config_from_url_fields",
    "matches",
    "non_blank",
    "non_negative",
    "one_of",
    "parse_query",
    "positive",
    "positive_or_none",
    "query_fields",
]

C = TypeVar("C")
Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name} must be positive, got {value!r}")


def positive_or_none(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{attribute.name} must be positive or null, got {value!r}")


def non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name} must not be negative, got {value!r}")


def non_blank(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """A string that is not empty or whitespace (``None`` passes: the field is optional)."""
    if value is not None and not value.strip():
        raise ConfigError(f"{attribute.name} must not be empty")


def one_of(*choices: str) -> Validator:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(choices)}, got {value!r}")

    return check


def between(low: int, high: int, why: str = "") -> Validator:
    """``low <= value <= high``; ``why`` explains the bounds in the message."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
        if not low <= value <= high:
            reason = f" ({why})" if why else ""
            raise ConfigError(f"{attribute.name} must be between {low} and {high}{reason}, got {value!r}")

    return check


def matches(pattern: str, what: str) -> Validator:
    """The whole string matches ``pattern``; ``what`` describes it in the message."""
    compiled = re.compile(pattern)

    def check(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if not compiled.fullmatch(value):
            raise ConfigError(f"{attribute.name} {value!r} is not {what}")

    return check


# --- URLs --------------------------------------------------------------------------------


# --- values that must also suit the backend at run time (castore check runs these) ---

MAX_DURATION = 1e9
"""Longest duration a config may give, in seconds (about 31 years; longer means "none": use null)."""
MAX_MAP_SIZE = min(sys.maxsize, 1 << 47)
"""Largest LMDB map: what a 64-bit process can map (128 TiB of user address space)."""


def _fail(attribute: attrs.Attribute[Any], message: str) -> ConfigError:
    return ConfigError(f"{attribute.name} {message}", path=attribute.name)


def duration(*, optional: bool = False, positive: bool = False) -> Any:
    """Seconds: a finite number, not negative (``positive``: above zero), at most :data:`MAX_DURATION`."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(attribute, f"must be a number of seconds, got {value!r}")
        if not math.isfinite(value):
            raise _fail(attribute, f"must be a finite number of seconds, got {value!r}"
                        + (" (use null for no limit)" if optional else ""))
        if value < 0 or (positive and value == 0):
            raise _fail(attribute, f"must be {'positive' if positive else 'zero or more'}, got {value!r}")
        if value > MAX_DURATION:
            raise _fail(attribute, f"must be at most {MAX_DURATION:g} s, got {value!r}"
                        + (" (use null for no limit)" if optional else ""))

    return check


def map_size(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    """A positive size that a process can map (at most :data:`MAX_MAP_SIZE`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(attribute, f"must be an integer, got {value!r}")
    if not 0 < value <= MAX_MAP_SIZE:
        raise _fail(attribute, f"must be between 1 and {MAX_MAP_SIZE} (what a process can map), got {value}")


def path_text(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """A filesystem path: no NUL character (the OS cannot take one)."""
    if value is not None and "\0" in value:
        raise _fail(attribute, "must not contain a NUL character")


def parse_query(url: str, query: str) -> dict[str, str]:
    """The query's parameters; a key given twice is refused (no silent last-one-wins)."""
    out: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key in out:
            raise ConfigError(f"invalid url {url!r}: query parameter {key!r} given twice")
        out[key] = value
    return out


_NULL = ("null", "none")


def _from_text(url: str, key: str, text: str, kind: Any) -> Any:
    """``text`` as a value of type ``kind`` (the strict converter checks it afterwards)."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) < len(typing.get_args(kind)) and text.lower() in _NULL:
            return None
        if len(args) == 1:
            return _from_text(url, key, text, args[0])
    if kind is str or origin is Literal:
        return text
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return text.lower() == "true"
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        name = "true or false" if kind is bool else f"a valid {kind.__name__}"
        raise ConfigError(f"invalid url {url!r}: {key}={text!r} is not {name}") from None
    raise ConfigError(f"invalid url {url!r}: {key} cannot be set in a URL")


def query_fields(cls: type, url: str, query: Mapping[str, str], allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """Typed config fields from query parameters; ``allowed`` defaults to every field of ``cls``."""
    hints = typing.get_type_hints(cls)
    known = sorted(allowed if allowed is not None else (f.name for f in attrs.fields(cls)))
    out: dict[str, Any] = {}
    for key, text in query.items():
        if key not in known:
            raise ConfigError(f"invalid url {url!r}: unknown query parameter {key!r} (known: {', '.join(known)})")
        out[key] = _from_text(url, key, text, hints[key])
    return out


def config_from_url_fields(cls: type[C], url: str, fields: Mapping[str, Any]) -> C:
    """Structure ``fields`` (from a URL) into ``cls`` with the strict converter; errors name the URL."""
    from castore_di.composition.converter import structure_config

    try:
        return structure_config(fields, cls, path="")
    except ConfigError as e:
        where = (e.path or "").lstrip(".")
        raise type(e)(f"invalid url {url!r}: {where + ': ' if where else ''}{e.detail}") from e
