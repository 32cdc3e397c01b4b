"""Config side of the object-store engine: URL parsing (``objectstore+<inner url>``, query ->
options), option checks, the split into obstore's store config and HTTP client options, and
the config fields both ``objectstore`` kinds share. Imports no obstore.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping

import attrs

from castore_di.composition.fields import parse_query
from castore_di.errors import ConfigError

__all__ = [
    "URL_PREFIX",
    "CLIENT_OPTION_KEYS",
    "ObjectStoreFields",
    "parse_objectstore_url",
    "validate_store_url",
    "validate_options",
    "split_options",
]

URL_PREFIX = "objectstore+"

# obstore takes HTTP client settings separately from the store config (passing them in the
# store config panics inside obstore for S3); the Rust crate accepts both in one map.
CLIENT_OPTION_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "http2_max_frame_size",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "timeout",
        "user_agent",
    }
)

# Schemes obstore's from_url understands (the reference's object_store::parse_url_opts set).
_SCHEMES = frozenset({"memory", "file", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https"})


def parse_objectstore_url(url: str) -> tuple[str, dict[str, str]]:
    """Split ``objectstore+<url>?k=v`` into the inner URL (query removed) and the options."""
    if not url.startswith(URL_PREFIX):
        raise ConfigError(f"Missing objectstore uri: {url!r} must start with {URL_PREFIX!r}")
    inner = url[len(URL_PREFIX) :]
    parts = urllib.parse.urlsplit(inner)
    options = parse_query(url, parts.query)
    bare = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", parts.fragment))
    # urlunsplit drops the empty authority of memory:/// and file:///; keep the original form.
    if parts.scheme in ("memory", "file") and not parts.netloc:
        bare = f"{parts.scheme}://{parts.path}"
    validate_store_url(bare)
    return bare, options


def validate_store_url(url: str) -> None:
    """Refuse URLs obstore cannot open, without touching the network or the disk."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"unsupported object store URL {url!r}: the scheme must be one of {', '.join(sorted(_SCHEMES))}"
        )
    if parts.query:
        raise ConfigError(f"object store URL {url!r}: put options in object_store_options, not the query")
    if parts.scheme == "memory" and (parts.netloc or parts.path not in ("", "/")):
        raise ConfigError(f"object store URL {url!r}: memory:/// takes no host or path")
    if parts.scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
        raise ConfigError(f"object store URL {url!r}: file:// needs an absolute path and no host (file:///abs/path)")
    if parts.scheme in ("s3", "s3a", "gs") and not parts.netloc:
        raise ConfigError(f"object store URL {url!r}: the bucket is missing")
    if parts.scheme in ("http", "https") and not parts.netloc:
        raise ConfigError(f"object store URL {url!r}: the host is missing")


def validate_options(options: Mapping[str, object], url: str | None = None) -> None:
    """Options are a flat string-to-string map, as in the reference; file:// takes none."""
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"object_store_options must map strings to strings, got {key!r}: {value!r}")
    if url is not None and options and urllib.parse.urlsplit(url).scheme == "file":
        raise ConfigError(f"{url}: file:// takes no object_store_options (got {', '.join(sorted(options))})")


def split_options(options: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(store config, client options)``; an ``aws_``/``azure_``/``google_`` prefix is kept."""
    config: dict[str, str] = {}
    client: dict[str, str] = {}
    for key, value in options.items():
        (client if key.lower() in CLIENT_OPTION_KEYS else config)[key.lower()] = value
    return config, client


def _url_validator(_inst: object, _attr: object, value: str) -> None:
    validate_store_url(value)


def _options_validator(inst: object, _attr: object, value: dict[str, str]) -> None:
    validate_options(value, getattr(inst, "object_store_url", None))


@attrs.frozen(kw_only=True)
class ObjectStoreFields:
    """Config fields of both ``objectstore`` kinds.

    Attributes:
        object_store_url: Where: ``s3://bucket/prefix``, ``gs://…``, ``az://container/prefix``,
            ``https://host/path``, ``file:///abs/path``, ``memory:///``.
        object_store_options: obstore store and HTTP-client options (all strings), e.g.
            ``endpoint``, ``region``, ``access_key_id``, ``allow_http``, ``use_emulator``.
    """

    object_store_url: str = attrs.field(validator=[attrs.validators.instance_of(str), _url_validator])
    object_store_options: dict[str, str] = attrs.field(factory=dict, validator=_options_validator)
