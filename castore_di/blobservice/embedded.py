"""The embedded on-disk blob service (``type: embedded``, URL ``embedded://`` or ``embedded:///abs/path``).

Blobs are cut with FastCDC 2020 (``pyfastcdc``; min = avg/2, max = 2*avg, as the object store
and the reference) so equal chunks are stored once. Storage, durability and the measurements
behind the choice of LMDB: :mod:`castore_di.embedded_store`.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar, cast

import attrs

from castore_di.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesReader,
    ChunkedReader,
    ChunkMeta,
    HashingWriter,
)
from castore_di.composition.config import BlobServiceConfig
from castore_di.digests import B3Digest, blake3_digest
from castore_di.embedded_store import (
    BATCH_BYTES,
    Compression,
    EmbeddedStoreFields,
    FsckReport,
    GcReport,
    StoreOptions,
    acquire,
    encode_index,
    release,
    url_fields,
)
from castore_di.errors import ClosedError, ConfigError, IntegrityError, MissingDependencyError

if TYPE_CHECKING:
    from castore_di.embedded_store import EmbeddedStore, WriterLease

__all__ = ["EmbeddedBlobService", "EmbeddedBlobServiceConfig"]

DEFAULT_AVG_CHUNK_SIZE = 256 * 1024


class EmbeddedBlobService(BlobService):
    """Blobs as deduplicated chunks in the data directory's LMDB environment.

    A blob of one chunk is stored as that chunk; a longer blob also gets a chunk index,
    committed after its chunks, so it becomes visible only when its writer's ``close()``
    has committed. Every chunk read is verified against its digest.
    """

    def __init__(
        self,
        path: str,
        options: StoreOptions | None = None,
        *,
        avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE,
        compression: Compression = "auto",
    ) -> None:
        self.path = path
        self.options = options or StoreOptions()
        self.avg_chunk_size = avg_chunk_size
        self.min_chunk_size = avg_chunk_size // 2
        self.max_chunk_size = avg_chunk_size * 2
        self.compression: Compression = compression
        self._engine: EmbeddedStore | None = None
        self._closed = False
        self._cdc: Any = None

    def _store(self) -> EmbeddedStore:
        if self._engine is None:
            if self._closed:
                raise ClosedError("embedded blob service is closed")
            self._engine = acquire(self.path, self.options)
        return self._engine

    def _chunker(self) -> Any:
        if self._cdc is None:
            try:
                import pyfastcdc
            except ImportError as e:  # pragma: no cover - a core dependency
                raise MissingDependencyError(
                    "the embedded blob service needs 'pyfastcdc' (pip install castore_di)"
                ) from e
            self._cdc = pyfastcdc.FastCDC(
                self.avg_chunk_size, min_size=self.min_chunk_size, max_size=self.max_chunk_size
            )
        return self._cdc

    async def has(self, digest: B3Digest) -> bool:
        return self._store().has_blob(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        store = self._store()
        data, index = store.read_blob(digest)
        if data is not None:
            return BytesReader(data)
        if index is None:
            return None

        async def fetch(chunk: B3Digest) -> bytes | None:
            return store.get_chunk_unverified(chunk, digest)

        return ChunkedReader(digest, [ChunkMeta(d, size) for d, size in index], fetch)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        is_chunk, index = self._store().lookup_blob(digest)
        if is_chunk:
            return []
        if index is None:
            return None
        return [ChunkMeta(d, size) for d, size in index]

    def open_write(self) -> BlobWriter:
        if self._closed:
            raise ClosedError("embedded blob service is closed")
        return _EmbeddedWriter(self)

    def exclusive_use(self) -> AbstractAsyncContextManager[None]:
        from castore_di.directoryservice.embedded import exclusive_use

        return exclusive_use(self._store())

    async def prune(self, keep: set[B3Digest], *, dry_run: bool) -> tuple[int, int]:
        """Delete every blob (index and chunks) not in ``keep`` and every chunk no kept blob uses."""
        store = self._store()

        def sweep() -> tuple[int, int]:
            chunks: set[bytes] = set()
            for digest in keep:
                is_chunk, index = store.lookup_blob(digest)
                if is_chunk:
                    chunks.add(digest)
                elif index is not None:
                    chunks.update(d for d, _size in index)
            indexes, index_bytes = store.sweep(store.blobs_db, cast(set[bytes], keep), dry_run=dry_run)
            dropped, chunk_bytes = store.sweep(store.chunks_db, chunks, dry_run=dry_run, also=(store.loose_db,))
            return indexes + dropped, index_bytes + chunk_bytes

        return await asyncio.to_thread(sweep)

    async def fsck(self) -> FsckReport:
        """Verify every chunk and chunk index (directories: the directory service's ``fsck``)."""
        store = self._store()
        return await asyncio.to_thread(store.fsck, blobs=True, directories=False)

    async def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove chunks of writes that never committed (safe with concurrent writers)."""
        store = self._store()
        return await asyncio.to_thread(store.gc, dry_run=dry_run)

    async def close(self) -> None:
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            release(engine)


class _EmbeddedWriter(HashingWriter):
    """Buffers at most a few chunks, cuts them as soon as their cut point is final.

    Chunks of a large blob are committed in batches of ``BATCH_BYTES`` (they are complete
    chunks under their own digests); the blob's index is committed last, in ``close()``.
    The first such batch registers the writer (a :class:`WriterLease`) so that ``gc``
    keeps the chunks it stored or found loose until the index is committed.
    """

    def __init__(self, service: EmbeddedBlobService) -> None:
        super().__init__()
        self._svc = service
        self._parts: list[bytes] = []
        self._buffered = 0
        self._cut_at = 4 * service.max_chunk_size
        self._chunks: list[tuple[B3Digest, int]] = []
        self._pending: list[tuple[B3Digest, bytes]] = []
        self._pending_bytes = 0
        self._lease: WriterLease | None = None
        self._flushed = 0  # self._chunks[:self._flushed] were stored ahead of the index

    async def _write(self, data: bytes) -> None:
        self._hash(data)
        self._parts.append(data)
        self._buffered += len(data)
        if self._buffered >= self._cut_at:
            self._cut(final=False)
            if self._pending_bytes >= BATCH_BYTES:
                self._flush()

    def _cut(self, final: bool) -> None:
        buf = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        max_size = self._svc.max_chunk_size
        consumed = 0
        for chunk in self._svc._chunker().cut_buf(buf):
            # A cut point depends on at most max_size bytes after the chunk's start, so it
            # is final once that many bytes are buffered (or the stream ended).
            if not final and len(buf) - chunk.offset < max_size:
                break
            end = chunk.offset + chunk.length
            data = buf[chunk.offset : end]
            digest = blake3_digest(data)
            self._chunks.append((digest, len(data)))
            self._pending.append((digest, data))
            self._pending_bytes += len(data)
            consumed = end
        rest = buf[consumed:]
        self._parts = [rest] if rest else []
        self._buffered = len(rest)

    def _flush(self) -> None:
        store = self._svc._store()
        if self._lease is None:
            self._lease = store.new_lease()
        with store.write() as txn:
            store.put_chunks(txn, self._pending, self._svc.compression, self._lease)
        self._pending = []
        self._pending_bytes = 0
        self._flushed = len(self._chunks)

    def _end_lease(self, store: EmbeddedStore, drop_claims: bool) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            if drop_claims:
                with store.write() as txn:
                    store.drop_claims(txn, lease.token)
        finally:
            lease.release()

    async def _finish(self) -> B3Digest:
        digest = self._hashed_digest()
        store = self._svc._store()
        if not self._chunks and self._buffered <= self._svc.min_chunk_size:
            # One chunk (or the empty blob): the blob is its own chunk, no index.
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts = []
            with store.write() as txn:
                store.put_chunks(txn, [(digest, data)], self._svc.compression)
                store.claim_chunks(txn, [digest])
            return digest
        self._cut(final=True)
        if len(self._chunks) == 1:
            if self._chunks[0][0] != digest:  # pragma: no cover - would be a hashing bug
                raise IntegrityError(f"blob {digest}: its single chunk hashes differently")
            with store.write() as txn:
                store.put_chunks(txn, self._pending, self._svc.compression)
                store.claim_chunks(txn, [digest])
        else:
            with store.write() as txn:
                earlier = [d for d, _ in self._chunks[: self._flushed]]
                store.check_chunks_exist(txn, earlier, digest)
                store.put_chunks(txn, self._pending, self._svc.compression)
                store.claim_chunks(txn, [d for d, _ in self._chunks])
                if txn.get(digest, db=store.blobs_db) is None:
                    txn.put(digest, encode_index(self._chunks), db=store.blobs_db)
                if self._lease is not None:
                    store.drop_claims(txn, self._lease.token)
        self._end_lease(store, drop_claims=False)
        self._pending = []
        self._pending_bytes = 0
        return digest

    async def _abort(self) -> None:
        # Chunks flushed before the abort stay, marked loose, until ``gc`` removes them.
        self._parts = []
        self._pending = []
        self._chunks = []
        if self._lease is not None:
            try:
                store = self._svc._store()
            except ClosedError:  # gc finds the released lease's claims stale
                self._lease.release()
                self._lease = None
                return
            self._end_lease(store, drop_claims=True)


def _avg_chunk_size(_inst: object, _attribute: attrs.Attribute[Any], value: int) -> None:
    # pyfastcdc bounds: min = avg/2 >= 64, max = 2*avg <= 16 MiB, avg in [256, 4 MiB].
    if not 512 <= value <= 2 * 1024 * 1024:
        raise ConfigError(f"avg_chunk_size must be between 512 and 2097152, got {value}")


@attrs.frozen(kw_only=True)
class EmbeddedBlobServiceConfig(EmbeddedStoreFields, BlobServiceConfig):
    """Blobs in the embedded on-disk store (the default). See :class:`EmbeddedStoreFields`."""

    type_tag: ClassVar[str] = "embedded"

    avg_chunk_size: int = attrs.field(default=DEFAULT_AVG_CHUNK_SIZE, validator=_avg_chunk_size)
    """FastCDC average chunk size (min = avg/2, max = 2*avg)."""

    def build(self) -> EmbeddedBlobService:
        return EmbeddedBlobService(
            self.resolved_path(),
            self.store_options(),
            avg_chunk_size=self.avg_chunk_size,
            compression=self.compression,
        )

    @classmethod
    def from_url(cls, url: str) -> "EmbeddedBlobServiceConfig":
        """``embedded://`` (the default path) or ``embedded:///abs/path``, with optional query
        parameters ``map_size``, ``durability``, ``sync_interval``, ``max_readers``,
        ``compression`` and ``avg_chunk_size``.
        """
        return cls(
            **url_fields(
                url,
                ("map_size", "durability", "sync_interval", "max_readers", "compression", "avg_chunk_size"),
            )
        )
