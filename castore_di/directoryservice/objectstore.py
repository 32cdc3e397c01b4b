"""The object-store directory service (``type: objectstore``), on obstore.

Each closure put through ``put_multiple_start`` (or a single leaf put through ``put``) is
one object, keyed by its root as in the reference: ``{base}/dirs/b3/{hex(r[0:2])}/{hex(r)}``
holding the zstd (level 3) compression of frames, each a 4-byte big-endian length followed
by one canonical Directory encoding, root first in breadth-first order.

Consequences of batching, which the DirectoryService contract allows:

* ``get`` and ``get_recursive`` serve the **roots** of stored closures only; an inner
  directory of a closure is "absent" (``None`` / empty stream) unless it was also put as
  the root of a closure of its own.
* ``put`` refuses directories that have directory children
  (:class:`~castore_di.errors.UnsupportedOperationError`); put closures instead.

Reads check each frame's BLAKE3 against the digests the closure allows before decoding it;
damaged objects raise :class:`~castore_di.errors.IntegrityError`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import ClassVar

import attrs

from castore_di.composition.config import DirectoryServiceConfig
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import RootToLeaves
from castore_di.errors import (
    ClosureError,
    IntegrityError,
    StorageError,
    UnsupportedOperationError,
    ValidationError,
    map_errors,
)
from castore_di.nodes import Directory
from castore_di._objectstore.config import ObjectStoreFields, parse_objectstore_url
from castore_di._objectstore.store import (
    ObjectStoreAccess,
    import_obstore,
    object_key,
    read_exactly,
    zstd_compress,
    zstd_error,
    zstd_stream,
)

__all__ = ["ObjectStoreDirectoryService", "ObjectStoreDirectoryServiceConfig", "MAX_FRAME_LENGTH"]

MAX_FRAME_LENGTH = 1024 * 1024 * 1000  # the reference's limit for one Directory frame


def _dirs_key(root: B3Digest) -> str:
    return object_key("dirs", root)


def _root_first(root: B3Digest, directories: list[Directory]) -> list[Directory]:
    """Breadth-first from the root, each directory once (the reference's drain order)."""
    by_digest = {d.digest: d for d in directories}
    out: list[Directory] = []
    seen = {root}
    queue = deque([root])
    while queue:
        d = by_digest[queue.popleft()]
        out.append(d)
        for _name, node in d.directories():
            if node.digest not in seen:
                seen.add(node.digest)
                queue.append(node.digest)
    return out


def _encode_batch(directories: list[Directory]) -> bytes:
    frames = bytearray()
    for d in directories:
        raw = d.encode()
        frames += len(raw).to_bytes(4, "big")
        frames += raw
    return zstd_compress(bytes(frames))


def _frames(root: B3Digest, compressed: bytes) -> Iterator[bytes]:
    """The raw frames of a stored batch; damage raises IntegrityError."""
    what = f"directory batch {root}"

    def damaged(e: BaseException) -> IntegrityError:
        return IntegrityError(f"{what}: cannot decompress stored data: {e}")

    with map_errors({zstd_error(): damaged}):
        reader = zstd_stream(compressed)
        while True:
            header = read_exactly(reader, 4)
            if not header:
                return
            if len(header) < 4:
                raise IntegrityError(f"{what}: truncated frame header")
            length = int.from_bytes(header, "big")
            if length > MAX_FRAME_LENGTH:
                raise IntegrityError(f"{what}: frame of {length} bytes exceeds the limit")
            frame = read_exactly(reader, length)
            if len(frame) < length:
                raise IntegrityError(f"{what}: truncated frame")
            yield frame



class ObjectStoreDirectoryService(DirectoryService):
    """Directory closures as one object per root (see the module docstring)."""

    def __init__(self, object_store_url: str, object_store_options: dict[str, str] | None = None) -> None:
        self.access = ObjectStoreAccess(object_store_url, object_store_options or {})

    async def check_connectivity(self) -> str:
        """One listing of the store (see :class:`~castore_di.connectivity.Connectable`)."""
        return await self.access.check()

    async def get(self, digest: B3Digest) -> Directory | None:
        """The root of a stored closure (inner directories of a closure are not served)."""
        stream = self._stream(digest, first_only=True)
        try:
            async for d in stream:
                return d
            return None
        finally:
            await stream.aclose()

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return self._stream(root, first_only=False)

    async def _stream(self, root: B3Digest, first_only: bool) -> AsyncGenerator[Directory, None]:
        compressed = await self.access.get(_dirs_key(root))
        if compressed is None:
            return
        what = f"directory batch {root}"
        validator = RootToLeaves(root)
        for frame in _frames(root, compressed):
            digest = blake3_digest(frame)
            if not validator.allowed(digest):
                raise IntegrityError(f"{what}: holds unexpected directory {digest}")
            try:
                directory = Directory.decode(frame)
                validator.add(directory, digest)
            except (ValidationError, ClosureError) as e:
                raise IntegrityError(f"{what}: directory {digest} is invalid: {e}") from e
            yield directory
            if first_only:
                return
        try:
            validator.finish()
        except ClosureError as e:
            raise IntegrityError(f"{what}: {e}") from e
        if not validator.received_any():
            raise IntegrityError(f"{what}: the stored object holds no directories")

    async def put(self, directory: Directory) -> B3Digest:
        if directory.directories():
            raise UnsupportedOperationError(
                "only put_multiple_start is supported by the objectstore directory service "
                "for directories with children"
            )
        await self._store_closure(directory.digest, [directory])
        return directory.digest

    async def directory_digests(self) -> AsyncIterator[B3Digest]:
        """The roots of the stored closures (one object each)."""
        obstore = import_obstore()
        try:
            async for page in obstore.list(self.access.store, "dirs/", chunk_size=1000):
                for meta in page:
                    name = str(meta["path"]).rsplit("/", 1)[-1]
                    try:
                        yield B3Digest(bytes.fromhex(name))
                    except ValueError:
                        continue  # not one of ours; the object store fsck reports those
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"object store {self.access.url}: LIST dirs/ failed: {e}") from e

    async def _store_closure(self, root: B3Digest, directories: list[Directory]) -> None:
        key = _dirs_key(root)
        if await self.access.exists(key):
            return
        ordered = _root_first(root, directories)
        data = await asyncio.to_thread(_encode_batch, ordered)
        await self.access.put_new(key, data)


@attrs.frozen(kw_only=True)
class ObjectStoreDirectoryServiceConfig(ObjectStoreFields, DirectoryServiceConfig):
    """Directory closures in an object store, one object per root."""

    type_tag: ClassVar[str] = "objectstore"

    def build(self) -> ObjectStoreDirectoryService:
        return ObjectStoreDirectoryService(self.object_store_url, self.object_store_options)

    @classmethod
    def from_url(cls, url: str) -> "ObjectStoreDirectoryServiceConfig":
        """``objectstore+<url>``; the query becomes ``object_store_options``."""
        inner, options = parse_objectstore_url(url)
        return cls(object_store_url=inner, object_store_options=options)
