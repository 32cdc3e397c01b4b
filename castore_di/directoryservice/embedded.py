"""The embedded on-disk directory service (``type: embedded``, URL ``embedded://`` or ``embedded:///abs/path``).

Directories are stored by digest in the data directory's LMDB environment (shared with the
embedded blob service when both use one path; see :mod:`castore_di._embedded`), in the
``dirs`` database: directory digest -> a stored value (:mod:`castore_di._embedded.codec`)
of the directory's canonical encoding. This module owns those records and their check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import ClassVar

import attrs

from castore_di._embedded import (
    Compression,
    EmbeddedStoreFields,
    Environment,
    StoreOptions,
    acquire,
    codec,
    release,
    url_fields,
)
from castore_di.composition.config import DirectoryServiceConfig
from castore_di.digests import B3_LEN, B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import ClosedError, IntegrityError, ValidationError
from castore_di.maintenance import FsckReport
from castore_di.nodes import Directory

__all__ = ["EmbeddedDirectoryService", "EmbeddedDirectoryServiceConfig"]

_ABSENT = B3Digest(bytes(32))  # a digest no store holds: a read that finds nothing


class _DirectoryRecords:
    """The ``dirs`` database of one environment; methods are synchronous and short."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.dirs_db = env.db(b"dirs")

    def put_directories(self, items: list[tuple[B3Digest, bytes]], compression: Compression) -> None:
        """Store encoded directories not yet present, all in one transaction."""
        enc = codec()
        with self.env.write() as txn:
            for digest, encoded in items:
                if txn.get(digest, db=self.dirs_db) is None:
                    txn.put(digest, enc.encode(encoded, compression), db=self.dirs_db)

    def get_directory_bytes(self, digest: B3Digest) -> bytes | None:
        """A directory's verified encoding; ``None`` when absent."""
        with self.env.read() as txn:
            raw = txn.get(digest, db=self.dirs_db)
            if raw is None:
                return None
            data = codec().decode(raw, f"directory {digest}")
        if blake3_digest(data) != digest:
            raise IntegrityError(f"directory {digest}: stored bytes do not match the digest")
        return data

    def digests_after(self, after: bytes | None, limit: int) -> list[B3Digest]:
        """Up to ``limit`` stored digests in key order, starting after ``after``."""
        out: list[B3Digest] = []
        with self.env.read() as txn:
            cursor = txn.cursor(db=self.dirs_db)
            found = cursor.first() if after is None else cursor.set_range(after)
            while found and len(out) < limit:
                key = bytes(cursor.key())
                if key != after and len(key) == B3_LEN:  # fsck reports malformed keys
                    out.append(B3Digest(key))
                found = cursor.next()
        return out

    def fsck(self) -> FsckReport:
        """Verify that every directory hashes to its key and is valid, in one read snapshot."""
        report = FsckReport()
        dec = codec()
        with self.env.read() as txn:
            for key, raw in txn.cursor(db=self.dirs_db):
                report.directories += 1
                name = f"directory {bytes(key).hex()}"
                try:
                    data = dec.decode(raw, name)
                except IntegrityError as e:
                    report.problems.append(str(e))
                    continue
                report.bytes_checked += len(data)
                if blake3_digest(data) != bytes(key):
                    report.problems.append(f"{name}: stored bytes do not match the digest")
                    continue
                try:
                    Directory.decode(data)
                except ValueError as e:
                    report.problems.append(f"{name}: invalid directory: {e}")
        return report


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
        self._engine: _DirectoryRecords | None = None
        self._closed = False

    def _store(self) -> _DirectoryRecords:
        if self._engine is None:
            if self._closed:
                raise ClosedError("embedded directory service is closed")
            env = acquire(self.path, self.options)
            try:
                self._engine = _DirectoryRecords(env)
            except BaseException:
                release(env)
                raise
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

    async def directory_digests(self) -> AsyncIterator[B3Digest]:
        """Every stored directory, in pages read in a thread (no transaction spans a yield)."""
        store = self._store()
        after: bytes | None = None
        while True:
            page = await asyncio.to_thread(store.digests_after, after, 1024)
            for digest in page:
                yield digest
            if not page:
                return
            after = page[-1]

    async def fsck(self) -> FsckReport:
        """Verify that every stored directory hashes to its key and is valid."""
        store = self._store()
        return await asyncio.to_thread(store.fsck)

    async def close(self) -> None:
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            release(engine.env)


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
