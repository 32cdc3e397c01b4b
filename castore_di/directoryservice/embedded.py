"""The embedded on-disk directory service (``type: embedded``, URL ``embedded://`` or ``embedded:///abs/path``).

Directories are stored by digest in the data directory's LMDB environment (shared with the
embedded blob service when both use one path). See :mod:`castore_di.embedded_store`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar

import attrs

from castore_di.composition.config import DirectoryServiceConfig
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.embedded_store import (
    Compression,
    EmbeddedStoreFields,
    FsckReport,
    StoreOptions,
    acquire,
    release,
    url_fields,
)
from castore_di.errors import ClosedError, IntegrityError, ValidationError
from castore_di.nodes import Directory

if TYPE_CHECKING:
    from castore_di.embedded_store import EmbeddedStore

__all__ = ["EmbeddedDirectoryService", "EmbeddedDirectoryServiceConfig"]

_ABSENT = B3Digest(bytes(32))  # a digest no store holds: a read that finds nothing


class EmbeddedDirectoryService(DirectoryService):
    """Directories by digest in LMDB; a closure is committed in one transaction.

    ``get`` serves every directory stored, roots and inner ones. As the reference's stores,
    ``put`` of a single directory does not check that its children exist; closures put
    through ``put_multiple_start`` are fully validated before anything is written.
    """

    def __init__(self, path: str, options: StoreOptions | None = None, *, compression: Compression = "auto") -> None:
        self.path = path
        self.options = options or StoreOptions()
        self.compression: Compression = compression
        self._engine: EmbeddedStore | None = None
        self._closed = False

    def _store(self) -> EmbeddedStore:
        if self._engine is None:
            if self._closed:
                raise ClosedError("embedded directory service is closed")
            self._engine = acquire(self.path, self.options)
        return self._engine

    async def check_connectivity(self) -> str:
        """Open the store's environment (in a thread) and read from it once."""

        def open_and_read() -> None:
            store = self._store()
            store.get_directory_bytes(_ABSENT)

        await asyncio.to_thread(open_and_read)
        return f"embedded store {self.path}: open"

    async def get(self, digest: B3Digest) -> Directory | None:
        raw = self._store().get_directory_bytes(digest)
        if raw is None:
            return None
        try:
            return Directory.decode(raw)
        except ValidationError as e:
            raise IntegrityError(f"directory {digest}: stored directory is invalid: {e}") from e

    async def put(self, directory: Directory) -> B3Digest:
        digest = directory.digest
        self._store().put_directories([(digest, directory.encode())], self.compression)
        return digest

    async def _store_closure(self, root: B3Digest, directories: list[Directory]) -> None:
        self._store().put_directories([(d.digest, d.encode()) for d in directories], self.compression)

    async def fsck(self) -> FsckReport:
        """Verify that every stored directory hashes to its key and is valid."""
        store = self._store()
        return await asyncio.to_thread(store.fsck, blobs=False, directories=True)

    async def close(self) -> None:
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            release(engine)


@attrs.frozen(kw_only=True)
class EmbeddedDirectoryServiceConfig(EmbeddedStoreFields, DirectoryServiceConfig):
    """Directories in the embedded on-disk store (the default). See :class:`EmbeddedStoreFields`."""

    type_tag: ClassVar[str] = "embedded"

    def build(self) -> EmbeddedDirectoryService:
        return EmbeddedDirectoryService(self.resolved_path(), self.store_options(), compression=self.compression)

    @classmethod
    def from_url(cls, url: str) -> "EmbeddedDirectoryServiceConfig":
        """``embedded://`` (the default path) or ``embedded:///abs/path``, with optional query
        parameters ``map_size``, ``durability``, ``sync_interval``, ``max_readers`` and
        ``compression``.
        """
        return cls(**url_fields(url, ("map_size", "durability", "sync_interval", "max_readers", "compression")))
