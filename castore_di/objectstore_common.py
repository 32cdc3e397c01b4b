"""Shared plumbing of the ``objectstore`` blob and directory services.

URL parsing (``objectstore+<inner url>``, query -> options), the split of options into
obstore's store config and HTTP client options, lazy store construction, the reference's
sharded key layout, zstd helpers, and the translation of obstore exceptions into
:mod:`castore_di.errors` (absence becomes ``None``; everything else a
:class:`~castore_di.errors.StorageError`). obstore and zstandard are imported only when a
store is built or data is (de)compressed.
"""

from __future__ import annotations

import io
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from castore_di.digests import B3Digest
from castore_di.errors import ConfigError, IntegrityError, MissingDependencyError, StorageError

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "URL_PREFIX",
    "CLIENT_OPTION_KEYS",
    "ObjectStoreAccess",
    "parse_objectstore_url",
    "validate_store_url",
    "validate_options",
    "split_options",
    "object_key",
    "zstd_compress",
    "zstd_decompress",
    "zstd_stream",
    "zstd_error",
    "read_exactly",
    "build_store",
    "ZSTD_LEVEL",
]

URL_PREFIX = "objectstore+"
ZSTD_LEVEL = 3  # zstd's default level, as the reference writes
EXTRA_HINT = "install the objectstore extra: pip install 'castore_di[objectstore]'"

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
    options = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
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


def object_key(area: str, digest: B3Digest) -> str:
    """``{area}/b3/{hex(d[0:2])}/{hex(d)}``: the reference's layout (shard = first two bytes)."""
    hexd = digest.hex()
    return f"{area}/b3/{hexd[:4]}/{hexd}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _import_obstore() -> Any:
    try:
        import obstore
        import obstore.store
    except ImportError as e:
        raise MissingDependencyError(f"the objectstore backend needs obstore: {EXTRA_HINT}") from e
    return obstore


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as e:
        raise MissingDependencyError(f"the objectstore backend needs zstandard: {EXTRA_HINT}") from e
    return zstandard


def build_store(url: str, options: Mapping[str, str], retry_config: Any = None) -> "ObjectStore":
    """An obstore store for ``url``. Only ``file://`` touches the disk (it creates the root)."""
    obstore = _import_obstore()
    config, client = split_options(options)
    scheme = urllib.parse.urlsplit(url).scheme
    kwargs: dict[str, Any] = {}
    if retry_config is not None:
        kwargs["retry_config"] = retry_config
    if config:
        kwargs["config"] = config
    if client:
        kwargs["client_options"] = client
    try:
        if scheme == "file":
            return obstore.store.LocalStore(urllib.parse.unquote(urllib.parse.urlsplit(url).path), mkdir=True)  # type: ignore[no-any-return]
        if scheme == "memory" and url == "memory://":
            url = "memory:///"
        return obstore.store.from_url(url, **kwargs)  # type: ignore[no-any-return]
    except ConfigError:
        raise
    except BaseException as e:  # obstore reports some bad configs as a Rust panic (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise ConfigError(f"cannot open object store {url!r}: {_first_line(e)}") from e


class ObjectStoreAccess:
    """The obstore store behind a service, built on first use, with translated errors."""

    def __init__(self, url: str, options: Mapping[str, str]) -> None:
        validate_store_url(url)
        validate_options(options, url)
        self.url = url
        self.options = dict(options)
        self._store: ObjectStore | None = None
        if urllib.parse.urlsplit(url).scheme != "file":
            # No I/O: obstore's constructors only parse; building now reports bad options early.
            self._store = build_store(url, self.options)

    @property
    def store(self) -> "ObjectStore":
        if self._store is None:
            try:
                self._store = build_store(self.url, self.options)
            except ConfigError as e:
                raise StorageError(str(e)) from e
        return self._store

    async def check(self) -> str:
        """One listing request (at most one key), not retried: reachable, bucket and credentials good."""
        import datetime

        obstore = _import_obstore()
        no_retries = {
            "max_retries": 0,
            "retry_timeout": datetime.timedelta(seconds=1),
            "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                        "max_backoff": datetime.timedelta(milliseconds=100), "base": 2.0},
        }
        try:
            store = build_store(self.url, self.options, None if self.url.startswith("file:") else no_retries)
            async for _batch in obstore.list(store, chunk_size=1):
                break
        except Exception as e:
            raise StorageError(f"object store {self.url}: LIST failed: {_first_line(e)}") from e
        return f"object store {self.url}: listed"

    def _error(self, op: str, key: str, e: BaseException) -> StorageError:
        return StorageError(f"object store {self.url}: {op} {key} failed: {_first_line(e)}")

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` when absent."""
        obstore = _import_obstore()
        store = self.store
        try:
            result = await obstore.get_async(store, key)
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._error("GET", key, e) from e

    async def exists(self, key: str) -> bool:
        obstore = _import_obstore()
        store = self.store
        try:
            await obstore.head_async(store, key)
            return True
        except FileNotFoundError:
            return False
        except Exception as e:
            raise self._error("HEAD", key, e) from e

    async def put_new(self, key: str, data: bytes) -> bool:
        """Store ``data`` unless ``key`` exists; ``False`` when it already existed.

        Uses a create-only put where the store has one; every backend's single-request put
        is atomic, so no partial object is ever visible under ``key``.
        """
        obstore = _import_obstore()
        exceptions = obstore.exceptions
        store = self.store
        try:
            await obstore.put_async(store, key, data, mode="create", use_multipart=False)
            return True
        except exceptions.AlreadyExistsError:
            return False
        except exceptions.PreconditionError:
            return False
        except exceptions.NotSupportedError:
            pass  # e.g. HTTP/WebDAV: fall back to an overwriting (still atomic) put
        except Exception as e:
            raise self._error("PUT", key, e) from e
        try:
            await obstore.put_async(store, key, data, use_multipart=False)
            return True
        except Exception as e:
            raise self._error("PUT", key, e) from e

    async def put(self, key: str, data: bytes) -> None:
        """Overwrite ``key`` (used by tests that reach storage behind the API)."""
        obstore = _import_obstore()
        store = self.store
        try:
            await obstore.put_async(store, key, data, use_multipart=False)
        except Exception as e:
            raise self._error("PUT", key, e) from e


def zstd_error() -> type[Exception]:
    """zstandard's error class (for ``except`` clauses of code that streams)."""
    error: type[Exception] = _zstd().ZstdError
    return error


def zstd_compress(data: bytes) -> bytes:
    result: bytes = _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    return result


def zstd_stream(data: bytes) -> io.RawIOBase:
    """A reader of the decompressed contents of ``data`` (all frames)."""
    reader: io.RawIOBase = _zstd().ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return reader


def read_exactly(reader: io.RawIOBase, n: int) -> bytes:
    """``n`` bytes from ``reader``, fewer only at its end."""
    parts: list[bytes] = []
    want = n
    while want > 0:
        piece = reader.read(want)
        if not piece:
            break
        parts.append(piece)
        want -= len(piece)
    return b"".join(parts)


def zstd_decompress(data: bytes, limit: int, what: str) -> bytes:
    """Decompress ``data`` into at most ``limit`` bytes; damage raises IntegrityError naming ``what``."""
    zstandard = _zstd()
    try:
        out = read_exactly(zstd_stream(data), limit + 1)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{what}: cannot decompress stored data: {e}") from e
    if len(out) > limit:
        raise IntegrityError(f"{what}: stored data decompresses to more than {limit} bytes")
    return out
