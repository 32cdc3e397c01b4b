"""The embedded on-disk directory service (``type: embedded``, URL ``embedded://`` or ``embedded:///abs/path``).

Directories are stored by digest in the data directory's LMDB environment (shared with the
embedded blob service when both use one path; see :mod:`castore_di._embedded`), in the
``dirs`` database: directory digest -> a stored value (:mod:`castore_di._embedded.codec`)
of the directory's canonical encoding, and the ``roots`` database of named roots
(:mod:`castore_di.roots`). This module owns those records, their check and their prune.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, ClassVar, cast

import attrs

from castore_di._loopless import to_thread
from castore_di._embedded import (
    Compression,
    EmbeddedStoreFields,
    Environment,
    StoreOptions,
    Handle,
    codec,
    config_from_url,
)
from castore_di.composition.config import DirectoryServiceConfig
from castore_di.digests import B3_LEN, B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import RootToLeaves
from castore_di.errors import IntegrityError, StorageError, ValidationError
from castore_di.nodes import Directory

if TYPE_CHECKING:
    import lmdb

    from castore_di.maintenance import FsckReport
    from castore_di.roots import NamedRoot

__all__ = ["EmbeddedDirectoryService", "EmbeddedDirectoryServiceConfig", "exclusive_use"]

_ABSENT = B3Digest(bytes(32))  # a digest no store holds: a read that finds nothing


_CLOSURE_BATCH = 1024  # directories a closure walk reads per worker-thread call


def _decode(raw: bytes, digest: B3Digest) -> Directory:
    try:
        return Directory.decode(raw)
    except ValidationError as e:
        raise IntegrityError(f"directory {digest}: stored directory is invalid: {e}") from e


def _decode_verified(raw: bytes, digest: B3Digest) -> Directory:
    if blake3_digest(raw) != digest:
        raise IntegrityError(f"directory {digest}: stored bytes do not match the digest")
    directory = _decode(raw, digest)
    # The store holds only what ``encode()`` produced (``put`` re-encodes), under its digest,
    # just checked: keep both, so ``directory.digest`` need not encode the directory again.
    directory._encoded = raw
    directory._digest = digest
    return directory


class _DirectoryRecords:
    """The ``dirs`` database of one environment; methods are synchronous and short."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.dirs_db = env.db(b"dirs")
        self.roots_db = env.db(b"roots")

    async def put_directories(self, items: list[tuple[B3Digest, bytes]], compression: Compression) -> None:
        """Store encoded directories not yet present, all in one transaction (on the writer thread)."""

        def put(txn: lmdb.Transaction) -> None:
            enc = codec()
            for digest, encoded in items:
                if txn.get(digest, db=self.dirs_db) is None:
                    txn.put(digest, enc.encode(encoded, compression), db=self.dirs_db)

        await self.env.transact(put)

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

    def get_directories(self, digests: list[B3Digest]) -> list[Directory | None]:
        """Verified, decoded directories (``None`` when absent), read in one read transaction
        (blocking: the closure walk calls it in a worker thread)."""
        dec = codec()
        raws: list[bytes | None] = []
        with self.env.read() as txn:
            for digest in digests:
                raw = txn.get(digest, db=self.dirs_db)
                raws.append(None if raw is None else dec.decode(raw, lambda d=digest: f"directory {d}"))  # type: ignore[misc]
        return [None if raw is None else _decode_verified(raw, digest) for digest, raw in zip(digests, raws)]

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
        from castore_di.maintenance import FsckReport  # not loaded by reading commands

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


    # named roots: name (UTF-8) -> JSON {"digest": hex, "created": unix time, "size", "entries"}

    def put_root(self, name: bytes, value: bytes) -> bytes | None:
        """Record a named root; the value it replaced."""
        with self.env.write() as txn:
            old = txn.get(name, db=self.roots_db)
            old = None if old is None else bytes(old)
            txn.put(name, value, db=self.roots_db)
        return old

    def delete_root(self, name: bytes) -> bytes | None:
        """Drop a named root; its value, or ``None`` when there was none."""
        with self.env.write() as txn:
            old = txn.get(name, db=self.roots_db)
            old = None if old is None else bytes(old)
            if old is not None:
                txn.delete(name, db=self.roots_db)
        return old

    def roots(self) -> list[tuple[bytes, bytes]]:
        """Every named root (name, value), sorted by name."""
        with self.env.read() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.roots_db)]


@contextlib.asynccontextmanager
async def exclusive_use(env: Environment, wait: float | None = None) -> AsyncIterator[None]:
    """Exclusive use of ``env`` for a prune (waits in a thread for the other users, ``wait`` s at most)."""
    await to_thread(env.enter_exclusive, wait)
    try:
        yield
    finally:
        env.leave_exclusive()


def _encode_root(root: NamedRoot) -> bytes:
    import json  # not loaded by reading commands

    return json.dumps({"digest": root.digest.hex(), "created": root.created, "size": root.size,
                       "entries": root.entries}).encode()


def _decode_root(name: bytes, value: bytes) -> NamedRoot:
    import json

    from castore_di.roots import NamedRoot  # not loaded by reading commands

    try:
        fields = json.loads(value)
        return NamedRoot(name=name.decode(), digest=B3Digest(bytes.fromhex(fields["digest"])),
                         created=float(fields["created"]), size=int(fields["size"]),
                         entries=int(fields.get("entries", 0)))
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"named root {name!r}: stored record is invalid: {e}") from e


class EmbeddedDirectoryService(DirectoryService):
    """Directories by digest in LMDB; a closure is committed in one transaction.

    ``get`` serves every directory stored, roots and inner ones. As the reference's stores,
    ``put`` of a single directory does not check that its children exist; closures put
    through ``put_multiple_start`` are fully validated before anything is written.
    """

    loopless = True  # reads are short LMDB lookups; opening and closing go through to_thread

    def __init__(self, path: str, options: StoreOptions | None = None, *, compression: Compression = "auto") -> None:
        self.path = path
        self.options = options or StoreOptions()
        self.compression: Compression = compression
        self._handle = Handle(path, self.options, _DirectoryRecords, "embedded directory service")

    def _store(self) -> _DirectoryRecords:
        """The directory records, opening the environment if needed (blocks; tests and threads)."""
        return self._handle.get_blocking()

    async def check_connectivity(self) -> str:
        """Open the store's environment (in a thread) and read from it once."""

        def open_and_read() -> None:
            store = self._store()
            store.get_directory_bytes(_ABSENT)

        await to_thread(open_and_read)
        return f"embedded store {self.path}: open"

    async def get(self, digest: B3Digest) -> Directory | None:
        raw = (await self._handle.get()).get_directory_bytes(digest)
        if raw is None:
            return None
        return _decode(raw, digest)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        """As :func:`~castore_di.directoryservice.base.traverse` (root first, breadth-first,
        validated as it streams), each level read and decoded in a worker thread in batches
        of up to ``_CLOSURE_BATCH`` directories."""
        records = await self._handle.get()
        found = await to_thread(records.get_directories, [root])
        if found[0] is None:
            return
        validator = RootToLeaves(root)
        queued = {root}
        level: list[tuple[B3Digest, Directory | None]] = [(root, found[0])]
        while level:
            following: list[tuple[B3Digest, Directory | None]] = []
            for start in range(0, len(level), _CLOSURE_BATCH):
                batch = level[start : start + _CLOSURE_BATCH]
                wanted = [d for d, directory in batch if directory is None]
                fetched = iter(await to_thread(records.get_directories, wanted) if wanted else ())
                for digest, directory in batch:
                    if directory is None:
                        directory = next(fetched)
                        if directory is None:
                            raise StorageError(
                                f"directory {digest} is referenced in the closure of {root} but does not exist"
                            )
                    validator.add(directory, digest)
                    for _name, node in directory.directories():
                        if node.digest not in queued:
                            queued.add(node.digest)
                            following.append((node.digest, None))
                    yield directory
            level = following

    async def put(self, directory: Directory) -> B3Digest:
        digest = directory.digest
        await (await self._handle.get()).put_directories([(digest, directory.encode())], self.compression)
        return digest

    async def _store_closure(self, root: B3Digest, directories: list[Directory]) -> None:
        records = await self._handle.get()
        await records.put_directories([(d.digest, d.encode()) for d in directories], self.compression)

    async def directory_digests(self) -> AsyncIterator[B3Digest]:
        """Every stored directory, in pages read in a thread (no transaction spans a yield)."""
        store = await self._handle.get()
        after: bytes | None = None
        while True:
            page = await to_thread(store.digests_after, after, 1024)
            for digest in page:
                yield digest
            if not page:
                return
            after = page[-1]

    async def fsck(self) -> FsckReport:
        """Verify that every stored directory hashes to its key and is valid."""
        store = await self._handle.get()
        return await to_thread(store.fsck)

    # -- named roots and prune (castore_di.roots) -----------------------------------------

    async def set_root(self, root: NamedRoot) -> NamedRoot | None:
        old = self._store().put_root(root.name.encode(), _encode_root(root))
        return None if old is None else _decode_root(root.name.encode(), old)

    async def list_roots(self) -> list[NamedRoot]:
        return [_decode_root(name, value) for name, value in self._store().roots()]

    async def forget_root(self, name: str) -> NamedRoot | None:
        old = self._store().delete_root(name.encode())
        return None if old is None else _decode_root(name.encode(), old)

    def exclusive_use(self, wait: float | None = None) -> AbstractAsyncContextManager[None]:
        return exclusive_use(self._store().env, wait)

    async def prune(self, keep: set[B3Digest], *, dry_run: bool) -> tuple[int, int]:
        """Delete every directory not in ``keep``."""
        store = self._store()
        return await to_thread(store.env.sweep, store.dirs_db, cast(set[bytes], keep), dry_run=dry_run)

    async def close(self) -> None:
        await self._handle.close()


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
        return config_from_url(cls, url)
