"""Config of the embedded engine: environment options, the fields both ``embedded`` kinds
share, and ``embedded://`` URLs."""

from __future__ import annotations

import os
import urllib.parse
from typing import Literal, TypeVar

import attrs

from castore_di._embedded.codec import Compression
from castore_di.composition.fields import (
    between,
    config_from_url_fields,
    duration,
    map_size,
    non_blank,
    one_of,
    parse_query,
    path_text,
    query_fields,
)
from castore_di.errors import ConfigError

__all__ = [
    "DEFAULT_MAP_SIZE",
    "Durability",
    "EmbeddedStoreFields",
    "StoreOptions",
    "default_data_dir",
    "config_from_url",
    "parse_embedded_url",
]

Durability = Literal["process", "full"]
C = TypeVar("C", bound=attrs.AttrsInstance)

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
    query = parse_query(url, parts.query)
    path = urllib.parse.unquote(parts.path)
    if path in ("", "/"):
        return None, query
    return path, query


@attrs.frozen(kw_only=True)
class EmbeddedStoreFields:
    """Config fields of both ``embedded`` kinds (they may share one data directory)."""

    path: str | None = attrs.field(default=None, validator=[non_blank, path_text])
    """Data directory; default ``$XDG_DATA_HOME/castore`` (platformdirs ``user_data_dir``)."""
    map_size: int = attrs.field(default=DEFAULT_MAP_SIZE, validator=map_size)
    """Largest size the LMDB map may grow to, in bytes (reserved address space, not disk)."""
    durability: Durability = attrs.field(default="process", validator=one_of("process", "full"))
    """``process``: commit per close, fsync every ``sync_interval`` s; ``full``: fsync per commit."""
    sync_interval: float = attrs.field(default=1.0, validator=duration())
    """Seconds between fsyncs with ``durability: process``."""
    max_readers: int = attrs.field(default=126, validator=between(1, (1 << 31) - 1, "LMDB's reader table"))
    """Concurrent read transactions across all processes (LMDB's reader table)."""
    compression: Compression = attrs.field(default="auto", validator=one_of("auto", "fast", "none"))
    """``auto``: zstd (level 1) when it saves at least 1/8; ``fast``: zstd level -1 likewise (less CPU, about 12% more stored); ``none``: store raw."""

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


def config_from_url(cls: type[C], url: str) -> C:
    """A config of an ``embedded`` kind from ``embedded://`` or ``embedded:///abs/path?field=value…``.

    Every field but ``path`` may be given as a query parameter.
    """
    path, query = parse_embedded_url(url)
    fields = query_fields(cls, url, query, [f.name for f in attrs.fields(cls) if f.name != "path"])
    if path is not None:
        fields["path"] = path
    return config_from_url_fields(cls, url, fields)
