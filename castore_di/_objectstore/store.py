"""Object access: lazy store construction, the reference's sharded key layout, zstd helpers,
and the translation of obstore exceptions into :mod:`castore_di.errors` (absence becomes
``None``; everything else a :class:`~castore_di.errors.StorageError`). obstore and zstandard
are imported only when a store is built or data is (de)compressed.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import threading
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from castore_di._objectstore.config import split_options, validate_options, validate_store_url
from castore_di.digests import B3Digest
from castore_di.errors import ConfigError, IntegrityError, MissingDependencyError, StorageError, first_line, map_errors

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "EXTRA_HINT",
    "ObjectStoreAccess",
    "object_key",
    "zstd_compress",
    "zstd_compress_chunk",
    "zstd_decompress",
    "zstd_stream",
    "zstd_error",
    "read_exactly",
    "build_store",
    "import_obstore",
    "ZSTD_LEVEL",
    "worker_pool",
]

ZSTD_LEVEL = 3  # zstd's default level, as the reference writes
EXTRA_HINT = "install the objectstore extra: pip install 'castore_di[objectstore]'"


def object_key(area: str, digest: B3Digest) -> str:
    """``{area}/b3/{hex(d[0:2])}/{hex(d)}``: the reference's layout (shard = first two bytes)."""
    hexd = digest.hex()
    return f"{area}/b3/{hexd[:4]}/{hexd}"


def import_obstore() -> Any:
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
    obstore = import_obstore()
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
        raise ConfigError(f"cannot open object store {url!r}: {first_line(e)}") from e


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def worker_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The engine's worker threads (one pool per process, one thread more than the cores):
    hashing, compressing, and the requests of stores served in this process (see
    :attr:`ObjectStoreAccess.in_process`). The work releases the GIL. A job must never wait
    for another job of the pool.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=(os.cpu_count() or 1) + 1, thread_name_prefix="castore-objectstore"
            )
        return _pool


class ObjectStoreAccess:
    """The obstore store behind a service, built on first use, with translated errors.

    Requests have an async form (for the event loop) and, for :attr:`in_process` stores, a
    blocking form for worker threads, where a request costs microseconds instead of an
    event-loop round trip (obstore's sync calls release the GIL).
    """

    def __init__(self, url: str, options: Mapping[str, str]) -> None:
        validate_store_url(url)
        validate_options(options, url)
        self.url = url
        self.options = dict(options)
        self._store: ObjectStore | None = None
        scheme = urllib.parse.urlsplit(url).scheme
        self.in_process = scheme in ("memory", "file")
        """Served in this process (memory, local files): no network wait worth overlapping."""
        if scheme != "file":
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

    def _errors(self, op: str, key: str) -> Any:
        """Every obstore failure of one request becomes a :class:`StorageError` naming it."""
        return map_errors({Exception: StorageError}, f"object store {self.url}: {op} {key} failed")

    async def check(self) -> str:
        """One listing request (at most one key), not retried: reachable, bucket and credentials good."""
        import datetime

        obstore = import_obstore()
        no_retries = {
            "max_retries": 0,
            "retry_timeout": datetime.timedelta(seconds=1),
            "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                        "max_backoff": datetime.timedelta(milliseconds=100), "base": 2.0},
        }
        with map_errors({Exception: StorageError}, f"object store {self.url}: LIST failed"):
            store = build_store(self.url, self.options, None if self.url.startswith("file:") else no_retries)
            async for _batch in obstore.list(store, chunk_size=1):
                break
        return f"object store {self.url}: listed"

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` when absent."""
        obstore = import_obstore()
        store = self.store
        with self._errors("GET", key):
            try:
                result = await obstore.get_async(store, key)
                return bytes(await result.bytes_async())
            except FileNotFoundError:
                return None

    async def exists(self, key: str) -> bool:
        obstore = import_obstore()
        store = self.store
        with self._errors("HEAD", key):
            try:
                await obstore.head_async(store, key)
                return True
            except FileNotFoundError:
                return False

    async def put_new(self, key: str, data: bytes) -> bool:
        """Store ``data`` unless ``key`` exists; ``False`` when it already existed.

        Uses a create-only put where the store has one; every backend's single-request put
        is atomic, so no partial object is ever visible under ``key``.
        """
        obstore = import_obstore()
        exceptions = obstore.exceptions
        store = self.store
        with self._errors("PUT", key):
            try:
                await obstore.put_async(store, key, data, mode="create", use_multipart=False)
                return True
            except (exceptions.AlreadyExistsError, exceptions.PreconditionError):
                return False
            except exceptions.NotSupportedError:
                pass  # e.g. HTTP/WebDAV: fall back to an overwriting (still atomic) put
            await obstore.put_async(store, key, data, use_multipart=False)
            return True

    def exists_sync(self, key: str) -> bool:
        """:meth:`exists`, blocking: for worker threads only."""
        obstore = import_obstore()
        store = self.store
        with self._errors("HEAD", key):
            try:
                obstore.head(store, key)
                return True
            except FileNotFoundError:
                return False

    def put_new_sync(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        """:meth:`put_new`, blocking: for worker threads only. ``data`` is not copied."""
        obstore = import_obstore()
        exceptions = obstore.exceptions
        store = self.store
        with self._errors("PUT", key):
            try:
                obstore.put(store, key, data, mode="create", use_multipart=False)
                return True
            except (exceptions.AlreadyExistsError, exceptions.PreconditionError):
                return False
            except exceptions.NotSupportedError:
                pass
            obstore.put(store, key, data, use_multipart=False)
            return True

    async def put(self, key: str, data: bytes) -> None:
        """Overwrite ``key`` (used by tests that reach storage behind the API)."""
        obstore = import_obstore()
        store = self.store
        with self._errors("PUT", key):
            await obstore.put_async(store, key, data, use_multipart=False)


def zstd_error() -> type[Exception]:
    """zstandard's error class (for ``except`` clauses of code that streams)."""
    error: type[Exception] = _zstd().ZstdError
    return error


_compressors = threading.local()


def zstd_compress(data: bytes | bytearray | memoryview) -> bytes:
    compressor = getattr(_compressors, "c", None)
    if compressor is None:  # one per thread: a context is not thread-safe, and costly to make per chunk
        compressor = _compressors.c = _zstd().ZstdCompressor(level=ZSTD_LEVEL)
    result: bytes = compressor.compress(data)
    return result


_PROBE_MIN = 64 * 1024  # smaller chunks are compressed without a probe
_PROBES = 16  # samples per probe, spread evenly over the chunk
_PROBE_SIZE = 512  # bytes per sample


def zstd_compress_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """A chunk as one zstd frame: at :data:`ZSTD_LEVEL`, or at zstd's fastest level when a
    probe says compression would not pay (random bytes, media, archives).

    The probe compresses :data:`_PROBES` samples of :data:`_PROBE_SIZE` bytes spread over the
    chunk (a few microseconds); if that saves less than 1/64, the fastest level stores the
    chunk at memory speed (as raw blocks, which is also what level 3 makes of such data, after
    a match search over every byte: most of a store's cost on random data). A compressible
    stretch in random bytes is found when it holds two samples (1/8 of the chunk); a shorter
    one stays uncompressed: on the benchmark's mixed data that costs under 0.1% of the
    stored size.
    """
    n = len(data)
    compressors = getattr(_compressors, "chunk", None)
    if compressors is None:  # per thread, as in zstd_compress
        zstandard = _zstd()
        compressors = _compressors.chunk = (
            zstandard.ZstdCompressor(level=-1),
            zstandard.ZstdCompressor(level=-(1 << 17)),  # ZSTD_minCLevel()
        )
    if n >= _PROBE_MIN:
        view = memoryview(data)
        step = n // _PROBES
        sample = b"".join([view[at : at + _PROBE_SIZE] for at in range(0, step * _PROBES, step)])
        if len(compressors[0].compress(sample)) >= len(sample) - len(sample) // 64:
            stored: bytes = compressors[1].compress(data)
            return stored
    return zstd_compress(data)


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
    with map_errors({_zstd().ZstdError: IntegrityError}, f"{what}: cannot decompress stored data"):
        out = read_exactly(zstd_stream(data), limit + 1)
    if len(out) > limit:
        raise IntegrityError(f"{what}: stored data decompresses to more than {limit} bytes")
    return out
