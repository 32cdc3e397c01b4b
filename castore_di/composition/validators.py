"""attrs validators for config fields whose values must also suit the backend at run time.

``castore check`` runs them (they run when a config class is built, from a mapping or a
URL), so a value that would only fail inside a service fails here, with the field's path.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import attrs

from castore_di.errors import ConfigError

__all__ = ["MAX_DURATION", "MAX_MAP_SIZE", "duration", "map_size", "path_text"]

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
