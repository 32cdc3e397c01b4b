"""The object-store blob service (``type: objectstore``), on obstore.

One config reaches S3 and S3-compatible servers, GCS, Azure Blob, HTTP/WebDAV, the local
filesystem and memory: ``object_store_url`` plus ``object_store_options`` (flat strings:
credentials, ``endpoint``, ``region``, ``allow_http`` …). URL form:
``objectstore+s3://bucket/prefix?endpoint=http://127.0.0.1:9000&allow_http=true`` (the query
becomes the options).

Layout (the reference's, so a bucket written by tvix is readable here and back):

* ``{base}/chunks/b3/{hex(d[0:2])}/{hex(d)}``: one FastCDC-2020 chunk, zstd level 3.
* ``{base}/blobs/b3/{hex(d[0:2])}/{hex(d)}``: the blob's index, a protobuf
  ``StatBlobResponse{chunks}``. A blob of fewer than two chunks has an empty list and is
  read from its chunk object (whose digest is the blob's); the empty blob has only an index.

Writes stream: data is cut as it arrives (buffering a few maximum chunk sizes), chunks that
already exist are skipped, at most ``max_in_flight`` chunk uploads run at once, and the
index is written last, so an interrupted write never leaves an index without its chunks.
Reads verify every chunk against its digest; seeking fetches only the chunk at the target.

Tested against the local filesystem, memory, S3 (moto's server) and Azure Blob (Azurite).
GCS is tested for config and URL handling only: no local emulator accepts obstore's uploads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import blake3

from castore_di.blobservice.base import (
    DEFAULT_AVG_CHUNK_SIZE,
    MAX_AVG_CHUNK_SIZE,
    MIN_AVG_CHUNK_SIZE,
    BlobReader,
    BlobService,
    BlobWriter,
    BytesReader,
    ChunkedReader,
    ChunkingFields,
    ChunkListCheck,
    ChunkMeta,
)
from castore_di.composition.config import BlobServiceConfig
from castore_di.digests import B3Digest, EMPTY_DIGEST, blake3_digest
from castore_di.errors import IntegrityError, MissingDependencyError, StorageError, map_errors
from castore_di.maintenance import FsckReport
from castore_di._objectstore.config import ObjectStoreFields, parse_objectstore_url
from castore_di._objectstore.store import (
    EXTRA_HINT,
    ObjectStoreAccess,
    import_obstore,
    object_key,
    zstd_compress,
    zstd_decompress,
)

if TYPE_CHECKING:
    from pyfastcdc import FastCDC

__all__ = [
    "ObjectStoreBlobService",
    "ObjectStoreBlobServiceConfig",
    "DEFAULT_AVG_CHUNK_SIZE",
    "MIN_AVG_CHUNK_SIZE",
    "MAX_AVG_CHUNK_SIZE",
]

# The largest chunk FastCDC can produce (its max_size limit); bounds decompression.
_CHUNK_LIMIT = 16 * 1024 * 1024


def _blob_key(digest: B3Digest) -> str:
    return object_key("blobs", digest)


def _chunk_key(digest: B3Digest) -> str:
    return object_key("chunks", digest)


def _encode_index(chunks: list[ChunkMeta]) -> bytes:
    from castore_di.proto import rpc_blobstore_pb2

    msg = rpc_blobstore_pb2.StatBlobResponse()
    for c in chunks:
        msg.chunks.add(digest=bytes(c.digest), size=c.size)
    encoded: bytes = msg.SerializeToString(deterministic=True)
    return encoded


def _decode_index(blob: B3Digest, raw: bytes) -> list[ChunkMeta]:
    from castore_di.proto import rpc_blobstore_pb2

    msg = rpc_blobstore_pb2.StatBlobResponse()
    try:
        msg.ParseFromString(raw)
        return [ChunkMeta(c.digest, c.size) for c in msg.chunks]
    except Exception as e:  # DecodeError, DigestError
        raise IntegrityError(f"blob {blob}: stored chunk index is damaged: {e}") from e


def _new_chunker(avg: int) -> "FastCDC":
    try:
        from pyfastcdc import FastCDC
    except ImportError as e:
        raise MissingDependencyError(f"the objectstore backend needs pyfastcdc: {EXTRA_HINT}") from e
    return FastCDC(avg, min_size=avg // 2, max_size=avg * 2)


class ObjectStoreBlobService(BlobService):
    """Blobs as FastCDC chunks plus an index in an object store (see the module docstring)."""

    def __init__(
        self,
        object_store_url: str,
        object_store_options: dict[str, str] | None = None,
        avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE,
        max_in_flight: int = 8,
    ) -> None:
        self.access = ObjectStoreAccess(object_store_url, object_store_options or {})
        self.avg_chunk_size = avg_chunk_size
        self.max_in_flight = max_in_flight

    async def has(self, digest: B3Digest) -> bool:
        return await self.access.exists(_blob_key(digest)) or await self.access.exists(_chunk_key(digest))

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raw = await self.access.get(_blob_key(digest))
        if raw is not None:
            return _decode_index(digest, raw)
        return [] if await self.access.exists(_chunk_key(digest)) else None

    async def _read_chunk(self, digest: B3Digest, what: str) -> bytes | None:
        """A chunk object, decompressed and verified, or ``None`` when absent."""
        raw = await self.access.get(_chunk_key(digest))
        if raw is None:
            return None
        data = await asyncio.to_thread(zstd_decompress, raw, _CHUNK_LIMIT, what)
        if blake3_digest(data) != digest:
            raise IntegrityError(f"{what}: contents do not match the digest")
        return data

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if digest == EMPTY_DIGEST:
            return BytesReader(b"")
        data = await self._read_chunk(digest, f"blob {digest}")
        if data is not None:
            return BytesReader(data)
        chunks = await self.chunks(digest)
        if chunks is None:
            return None
        if not chunks:
            raise StorageError(f"blob {digest}: the index lists no chunks and the chunk object is missing")

        async def fetch(chunk: B3Digest) -> bytes | None:
            return await self._read_chunk(chunk, f"blob {digest}: chunk {chunk}")

        return ChunkedReader(digest, chunks, fetch, readahead=2)

    def open_write(self) -> BlobWriter:
        return _ObjectStoreBlobWriter(self)

    async def check_connectivity(self) -> str:
        """One listing of the store (see :class:`~castore_di.connectivity.Connectable`)."""
        return await self.access.check()

    async def fsck(self) -> FsckReport:
        """Verify every chunk object and every blob index (see :class:`_Fsck`)."""
        return await _Fsck(self).run()


_FSCK_LIST_PAGE = 1000


class _Fsck:
    """The object store's consistency check, streaming with bounded memory.

    Pass 1 lists ``chunks/`` page by page and checks that every chunk decompresses and
    hashes to its key. Pass 2 lists ``blobs/``: an index must decode; a one-chunk blob's
    chunk object must exist; a chunked blob's chunks are read in order, each checked against
    its digest and listed size, and together against the blob's digest (so chunked data is
    read twice). At most ``max_in_flight`` objects are checked at once, so memory stays
    within that many chunks plus one listing page; only the digests of damaged chunks are
    remembered between the passes.
    """

    def __init__(self, service: ObjectStoreBlobService) -> None:
        self.svc = service
        self.report = FsckReport()
        self.bad_chunks: set[bytes] = set()
        self._slots = asyncio.Semaphore(max(1, service.max_in_flight))
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> FsckReport:
        await self._each("chunks", self._check_chunk)
        await self._each("blobs", self._check_index)
        return self.report

    async def _each(self, area: str, check: Callable[[str, B3Digest], Awaitable[None]]) -> None:
        obstore = import_obstore()
        access = self.svc.access
        try:
            with map_errors({Exception: StorageError}, f"object store {access.url}: LIST {area}/ failed"):
                stream = obstore.list(access.store, f"{area}/", chunk_size=_FSCK_LIST_PAGE)
                async for page in stream:
                    for meta in page:
                        key = str(meta["path"])
                        digest = _digest_of_key(area, key)
                        if digest is None:
                            self.report.problems.append(f"unexpected object {key} (not {area}/b3/<shard>/<digest>)")
                            continue
                        await self._slots.acquire()
                        task = asyncio.create_task(self._guarded(check, key, digest))
                        self._tasks.add(task)
                        task.add_done_callback(self._done)
        finally:
            outcomes = await asyncio.gather(*self._tasks, return_exceptions=True) if self._tasks else []
        for outcome in outcomes:  # a bug, not damage (damage is caught in _guarded)
            if isinstance(outcome, BaseException):
                raise outcome

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _guarded(self, check: Callable[[str, B3Digest], Awaitable[None]], key: str, digest: B3Digest) -> None:
        try:
            await check(key, digest)
        except (IntegrityError, StorageError) as e:
            self.report.problems.append(str(e))

    async def _check_chunk(self, key: str, digest: B3Digest) -> None:
        self.report.chunks += 1
        raw = await self.svc.access.get(key)
        if raw is None:
            return  # removed since the listing
        try:
            data = await asyncio.to_thread(zstd_decompress, raw, _CHUNK_LIMIT, f"chunk {digest}")
        except IntegrityError:
            self.bad_chunks.add(bytes(digest))
            raise
        self.report.bytes_checked += len(data)
        if blake3_digest(data) != digest:
            self.bad_chunks.add(bytes(digest))
            raise IntegrityError(f"chunk {digest}: contents do not match the digest")

    async def _check_index(self, key: str, blob: B3Digest) -> None:
        self.report.blobs += 1
        raw = await self.svc.access.get(key)
        if raw is None:
            return
        chunks = _decode_index(blob, raw)
        if not chunks:
            if blob == EMPTY_DIGEST:
                return
            if not await self.svc.access.exists(_chunk_key(blob)):
                raise StorageError(f"blob {blob}: its chunk object is missing")
            if bytes(blob) in self.bad_chunks:
                raise IntegrityError(f"blob {blob}: its chunk is corrupted")
            return
        check = ChunkListCheck(blob)
        for i, meta in enumerate(chunks):
            if bytes(meta.digest) in self.bad_chunks:
                raise IntegrityError(f"blob {blob}: chunk #{i} {meta.digest} is corrupted")
            data = await self.svc._read_chunk(meta.digest, f"blob {blob}: chunk #{i} {meta.digest}")
            check.add(meta, data, verified=True)  # _read_chunk verified the digest
        check.finish()


def _digest_of_key(area: str, key: str) -> B3Digest | None:
    """The digest named by ``{area}/b3/{shard}/{hex}``, or ``None`` for any other key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != area or parts[1] != "b3" or len(parts[3]) != 64:
        return None
    try:
        digest = B3Digest.from_hex(parts[3])
    except ValueError:
        return None
    return digest if object_key(area, digest) == key else None


class _ObjectStoreBlobWriter(BlobWriter):
    """Cuts, hashes and uploads as data arrives; the index goes up last, in ``close``."""

    def __init__(self, service: ObjectStoreBlobService) -> None:
        super().__init__()
        self._svc = service
        avg = service.avg_chunk_size
        # Cut only once several maximum-size chunks are buffered: every cut except the
        # last is final, since FastCDC decides a cut from at most max_size bytes after it.
        self._threshold = avg * 8
        self._chunker: FastCDC | None = None
        # The whole-blob hash may use several threads (blake3 releases the GIL); the next
        # cut runs while earlier chunks compress and upload (benches/objectstore_ingest.py).
        self._hasher: Any = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._buf = bytearray()
        self._chunks: list[ChunkMeta] = []
        self._slots = asyncio.Semaphore(service.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self.chunks_uploaded = 0
        self.chunks_skipped = 0

    async def _write(self, data: bytes) -> None:
        self._raise_failure()
        view = memoryview(data)
        while view:
            room = self._threshold - len(self._buf)
            self._buf += view[:room]
            view = view[room:]
            if len(self._buf) >= self._threshold:
                await self._cut(final=False)

    def _cut_sync(self, final: bool) -> tuple[list[tuple[B3Digest, bytes]], int]:
        """Cut the buffer (in a worker thread): the finished chunks and the bytes consumed."""
        if self._chunker is None:
            self._chunker = _new_chunker(self._svc.avg_chunk_size)
        out: list[tuple[B3Digest, bytes]] = []
        with memoryview(self._buf) as view:
            pieces = [(c.offset, c.length) for c in self._chunker.cut_buf(view)]
            if not final and pieces:
                pieces.pop()  # may end only because the buffer ends: cut it again with more data
            consumed = pieces[-1][0] + pieces[-1][1] if pieces else 0
            self._hasher.update(view[:consumed])
            for offset, length in pieces:
                chunk = bytes(view[offset : offset + length])
                out.append((blake3_digest(chunk), chunk))
        return out, consumed

    async def _cut(self, final: bool) -> None:
        pieces, consumed = await asyncio.to_thread(self._cut_sync, final)
        del self._buf[:consumed]
        for digest, chunk in pieces:
            self._chunks.append(ChunkMeta(digest, len(chunk)))
            await self._slots.acquire()
            self._raise_failure()
            task = asyncio.create_task(self._upload(digest, chunk))
            self._tasks.add(task)
            task.add_done_callback(self._upload_done)

    def _upload_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise StorageError(f"chunk upload failed: {self._failure}") from self._failure

    async def _upload(self, digest: B3Digest, chunk: bytes) -> None:
        key = _chunk_key(digest)
        access = self._svc.access
        if await access.exists(key):
            self.chunks_skipped += 1
            return
        compressed = await asyncio.to_thread(zstd_compress, chunk)
        if await access.put_new(key, compressed):
            self.chunks_uploaded += 1
        else:
            self.chunks_skipped += 1

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _finish(self) -> B3Digest:
        await self._cut(final=True)
        self._buf = bytearray()
        await self._drain()
        self._raise_failure()
        digest = B3Digest(self._hasher.digest())
        chunks = self._chunks if len(self._chunks) >= 2 else []
        # Published last: only now are all chunks it names known to be stored.
        await self._svc.access.put_new(_blob_key(digest), _encode_index(chunks))
        return digest

    async def _abort(self) -> None:
        self._buf = bytearray()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


@attrs.frozen(kw_only=True)
class ObjectStoreBlobServiceConfig(ChunkingFields, ObjectStoreFields, BlobServiceConfig):
    """Blobs chunked into an object store."""

    type_tag: ClassVar[str] = "objectstore"

    def build(self) -> ObjectStoreBlobService:
        return ObjectStoreBlobService(self.object_store_url, self.object_store_options, self.avg_chunk_size)

    @classmethod
    def from_url(cls, url: str) -> "ObjectStoreBlobServiceConfig":
        """``objectstore+<url>``; the query becomes ``object_store_options``."""
        inner, options = parse_objectstore_url(url)
        return cls(object_store_url=inner, object_store_options=options)
