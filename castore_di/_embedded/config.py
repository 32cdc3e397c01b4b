"""Config of the embedded engine: environment options, the fields both ``embedded`` kinds
share, and ``embedded://`` URLs."""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, Literal

import attrs

from castore_di._embedded.codec import Compression
from castore_di.errors import ConfigError

__all__ = [
    "DEFAULT_MAP_SIZE",
    "Durability",
    "EmbeddedStoreFields",
    "StoreOptions",
    "default_data_dir",
    "parse_embedded_url",
    "url_fields",
]

Durability = Literal["process", "full"]

DEFAULT_MAP_SIZE = 1 << 40  # address space reserved for the map; the file grows as needed


@attrs.frozen(kw_only=True)
class StoreOptions:
    """Settings of one environment; every service sharing a path must agree on them."""

    map_size: int = DEFAULT_MAP_SIZE
    durability: Durability = "process"
    sync_interval: float = 1.0
    max_readers: int = 126


def default_data_dir() -> str:
    """``platformdirs.user_data_dir("castore")``: ``$XDG_DATA_HOME/castore`` on Linux."""
    import platformdirs

    return str(platformdirs.user_data_dir("castore", appauthor=False))


def parse_embedded_url(url: str) -> tuple[str | None, dict[str, str]]:
    """``embedded://`` -> ``(None, {})``; ``embedded:///abs/path?k=v`` -> ``("/abs/path", {"k": "v"})``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "embedded":
        raise ConfigError(f"invalid url {url!r}: expected embedded:// or embedded:///absolute/path")
    if parts.netloc:
        raise ConfigError(
            f"invalid url {url!r}: embedded URLs take no host (use embedded:///absolute/path, three slashes)"
        )
    if parts.fragment:
        raise ConfigError(f"invalid url {url!r}: no fragment allowed")
    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in query:
            raise ConfigError(f"invalid url {url!r}: query parameter {key!r} given twice")
        query[key] = value
    path = urllib.parse.unquote(parts.path)
    if path in ("", "/"):
        return None, query
    return path, query


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name} must be positive, got {value!r}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name} must not be negative, got {value!r}")


def _one_of(*choices: str) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(choices)}, got {value!r}")

    return check


def _path_field(_inst: object, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value.strip():
        raise ConfigError("path must not be empty (omit it for the default data directory)")


@attrs.frozen(kw_only=True)
class EmbeddedStoreFields:
    """Config fields of both ``embedded`` kinds (they may share one data directory)."""

    path: str | None = attrs.field(default=None, validator=_path_field)
    """Data directory; default ``$XDG_DATA_HOME/castore`` (platformdirs ``user_data_dir``)."""
    map_size: int = attrs.field(default=DEFAULT_MAP_SIZE, validator=_positive)
    """Largest size the LMDB map may grow to, in bytes (reserved address space, not disk)."""
    durability: Durability = attrs.field(default="process", validator=_one_of("process", "full"))
    """``process``: commit per close, fsync every ``sync_interval`` s; ``full``: fsync per commit."""
    sync_interval: float = attrs.field(default=1.0, validator=_non_negative)
    """Seconds between fsyncs with ``durability: process``."""
    max_readers: int = attrs.field(default=126, validator=_positive)
    """Concurrent read transactions across all processes (LMDB's reader table)."""
    compression: Compression = attrs.field(default="auto", validator=_one_of("auto", "none"))
    """``auto``: zstd when it saves at least 1/8; ``none``: store raw."""

    def store_options(self) -> StoreOptions:
        return StoreOptions(
            map_size=self.map_size,
            durability=self.durability,
            sync_interval=self.sync_interval,
            max_readers=self.max_readers,
        )

    def resolved_path(self) -> str:
        """The data directory, absolute (no I/O)."""
        return os.path.abspath(os.path.expanduser(self.path if self.path is not None else default_data_dir()))


_QUERY_TYPES: dict[str, type] = {
    "map_size": int,
    "durability": str,
    "sync_interval": float,
    "max_readers": int,
    "compression": str,
    "avg_chunk_size": int,
    "max_bytes": int,
}


def url_fields(url: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """Config fields from an ``embedded://`` URL (path plus query parameters in ``allowed``)."""
    path, query = parse_embedded_url(url)
    fields: dict[str, Any] = {}
    if path is not None:
        fields["path"] = path
    for key, text in query.items():
        if key not in allowed:
            raise ConfigError(f"invalid url {url!r}: unknown query parameter {key!r} (known: {', '.join(allowed)})")
        kind = _QUERY_TYPES[key]
        try:
            fields[key] = kind(text)
        except ValueError as e:
            raise ConfigError(f"invalid url {url!r}: {key}={text!r} is not a valid {kind.__name__}") from e
    return fields
