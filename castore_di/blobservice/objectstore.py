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

Writes stream through a pipeline over every core (see :class:`_ObjectStoreBlobWriter`): data
is cut as it arrives (in a few reusable buffers), chunks that already exist are skipped, at
most ``max_in_flight`` chunk puts run at once, and the index is written last, so an
interrupted write never leaves an index without its chunks.
Reads verify every chunk against its digest; seeking fetches only the chunk at the target.

Tested against the local filesystem, memory, S3 (moto's server) and Azure Blob (Azurite).
GCS is tested for config and URL handling only: no local emulator accepts obstore's uploads.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import queue
import threading
import weakref
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
    worker_pool,
    zstd_compress_chunk,
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


_SEGMENT = 1024 * 1024  # data cut at once, at least (and at least 8 average chunks)
_BUFFERS = 3  # a writer's regions in flight take at most this many cut buffers' worth of bytes
_CUTTER_POLL = 5.0  # seconds between the cutter's checks that its writer still exists
_QUEUED = 2  # segments handed to the cutter and not yet copied out of the caller's bytes


class _Stopped(Exception):
    """The write was aborted or failed: the cutter leaves."""


class _Buffer:
    """A region's holder: its cut buffer (``None`` for a piece cut in place), the bytes it
    counts against the writer's budget, and the number of pipeline stages still reading it."""

    __slots__ = ("data", "cost", "refs")

    def __init__(self, data: bytearray | None, cost: int) -> None:
        self.data = data
        self.cost = cost
        self.refs = 1  # the cut


_Chunk = tuple[B3Digest, memoryview]  # a chunk's digest and contents
_Cut = tuple[int, memoryview]  # a chunk's place in the blob and contents (its digest not yet known)
_Group = tuple[list[_Cut], "_Buffer"]  # the chunks of one region and its holder


def _cutter_main(
    ref: "weakref.ref[_ObjectStoreBlobWriter]",
    inbox: "queue.SimpleQueue[tuple[list[memoryview], bool] | None]",
    done: "concurrent.futures.Future[None]",
) -> None:
    """A writer's cutter thread. It holds the writer only while it works: a writer dropped
    without ``close`` or ``abort`` ends the thread at the next poll."""
    try:
        while True:
            try:
                message = inbox.get(timeout=_CUTTER_POLL)
            except queue.Empty:
                if ref() is None:
                    return
                continue
            writer = ref()
            if writer is None or not writer._cut_next(message):
                if writer is not None:
                    writer._to_loop(writer._unblock)
                return
            del writer
    finally:
        done.set_result(None)


class _ObjectStoreBlobWriter(BlobWriter):
    """A pipeline over every core; the index goes up last, in ``close``.

    * The event loop collects written data into segments (views of the written ``bytes``,
      which are immutable: no copy) and hands them to the cutter through a queue of
      ``_QUEUED`` segments; it waits only when the cutter is that far behind.
    * The cutter (a thread of this writer, started by its first full segment; a blob of
      one segment is cut in one job at ``close``) cuts the data with FastCDC in regions
      (:meth:`_cut_region`): a written piece longer than a maximum chunk in place, a tail
      and the start of the next piece (or short pieces) copied into a reusable buffer.
      Every cut but a region's last is final (FastCDC decides a cut from at most
      ``max_size`` bytes after the chunk's start); the last waits for more data. The cut
      part feeds the whole-blob hash in a worker thread, in order, beside the cutter
      (:meth:`_hash_later`). Regions are handed on by segment (:meth:`_flush`).
    * Store jobs hash, check, compress and put the chunks of a segment while the cutter goes
      on: in the engine's worker threads with blocking requests for stores in this process
      (memory, local files); as upload tasks on the event loop otherwise (their chunks are
      hashed by the cutter). At most ``max_in_flight`` store jobs (resp. puts) run at once.

    Every byte is hashed once as part of the blob and once as part of its chunk. Memory is
    bounded: the regions in flight hold at most ``_BUFFERS`` cut buffers' worth of bytes (a
    buffer is one segment plus one maximum chunk: 3 × 2.5 MiB at the default 256 KiB; a
    join's buffer is one maximum chunk, a piece cut in place counts its length), plus
    ``_QUEUED + 1`` segments of written data and the compressed chunks in flight. A failed
    store job stops the pipeline: ``close`` raises :class:`StorageError` and writes no
    index. ``abort`` cancels the store jobs not started and waits for the others.
    """

    def __init__(self, service: ObjectStoreBlobService) -> None:
        super().__init__()
        self._svc = service
        self._in_process = service.access.in_process
        avg = service.avg_chunk_size
        self._segment = max(_SEGMENT, 8 * avg)
        self._capacity = self._segment + 2 * avg  # + a tail: at most one maximum-size chunk
        self._max_in_flight = max(1, service.max_in_flight)
        # the event loop's side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[memoryview] = []
        self._pending_len = 0
        self._room = asyncio.Semaphore(_QUEUED)
        self._inbox: queue.SimpleQueue[tuple[list[memoryview], bool] | None] = queue.SimpleQueue()
        self._cutter: concurrent.futures.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # the cutter's side (one thread at a time)
        self._chunker: FastCDC | None = None
        self._hasher: Any = blake3.blake3()
        self._tail: memoryview | None = None
        self._tail_buffer: _Buffer | None = None
        self._sizes: list[int] = []
        self._batch: list[_Group] = []  # regions cut and not yet handed on (:meth:`_flush`)
        self._batch_hash: list[tuple[memoryview, _Buffer]] = []
        # shared, under _lock
        self._lock = threading.Condition()
        self._join = 2 * avg + 1  # a join: a tail and the next piece's start (:meth:`_cut_region`)
        self._free: dict[int, list[bytearray]] = {self._capacity: [], self._join: []}
        self._budget = _BUFFERS * self._capacity
        self._charged = 0  # bytes of the regions in flight
        self._jobs: set[concurrent.futures.Future[None]] = set()
        self._store_jobs = 0
        self._to_hash: collections.deque[tuple[memoryview, _Buffer | None]] = collections.deque()
        self._hashing = False
        self._digests: list[B3Digest | None] = []  # set by the store stage, each in its slot
        self._stop = threading.Event()  # set on abort or failure: every stage leaves
        self._failure: BaseException | None = None
        self._published: B3Digest | None = None
        self.chunks_uploaded = 0
        self.chunks_skipped = 0

    # -- the event loop's side --------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        self._raise_failure()
        view = memoryview(data)
        while view:
            room = self._segment - self._pending_len
            piece = view[:room]
            view = view[room:]
            self._pending.append(piece)
            self._pending_len += len(piece)
            if self._pending_len >= self._segment:
                await self._hand_over()

    async def _hand_over(self) -> None:
        if self._cutter is None:
            self._loop = asyncio.get_running_loop()
            self._cutter = concurrent.futures.Future()
            cutter = threading.Thread(
                target=_cutter_main,
                args=(weakref.ref(self), self._inbox, self._cutter),
                name="castore-objectstore-cut",
                daemon=True,
            )
            cutter.start()
        await self._room.acquire()
        self._raise_failure()
        pieces, self._pending, self._pending_len = self._pending, [], 0
        self._inbox.put((pieces, False))

    async def _finish(self) -> B3Digest:
        self._raise_failure()
        pieces, self._pending, self._pending_len = self._pending, [], 0
        if self._cutter is None:  # one segment at most: one job
            self._loop = asyncio.get_running_loop()
            if pieces:
                with self._lock:  # abort waits for it
                    job = worker_pool().submit(self._cut_once, pieces)
                    self._jobs.add(job)
                job.add_done_callback(self._job_done)
                await asyncio.wrap_future(job)
        else:
            self._inbox.put((pieces, True))
            await asyncio.wrap_future(self._cutter)
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        self._raise_failure()
        if self._published is not None:  # by the last job, in its thread
            return self._published
        digest, index = self._index()
        # Published last: only now are all chunks it names known to be stored.
        await self._svc.access.put_new(_blob_key(digest), index)
        return digest

    def _index(self) -> tuple[B3Digest, bytes]:
        """The blob's digest and index, once every chunk is stored."""
        digest = B3Digest(self._hasher.digest())
        chunks = [ChunkMeta(d, n) for d, n in zip(self._digests, self._sizes, strict=True) if d is not None]
        if len(chunks) != len(self._sizes):  # every store job ran (close waits for them)
            raise AssertionError("a chunk of the blob was never hashed")
        return digest, _encode_index(chunks if len(chunks) >= 2 else [])

    def _publish_sync(self) -> None:
        """The index of a store in this process, written by the last job once every chunk is
        stored (saves the event loop a round trip per blob)."""
        if self._in_process and not self._stop.is_set():
            digest, index = self._index()
            self._svc.access.put_new_sync(_blob_key(digest), index)
            self._published = digest

    async def _abort(self) -> None:
        self._pending = []
        with self._lock:
            self._stop.set()
            self._lock.notify_all()
            jobs = list(self._jobs)
            for job in jobs:
                job.cancel()  # not started yet: never runs
        waits: list[Awaitable[Any]] = [asyncio.wrap_future(job) for job in jobs]
        if self._cutter is not None:
            self._inbox.put(None)
            waits.append(asyncio.wrap_future(self._cutter))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *waits, return_exceptions=True)
        self._tasks.clear()

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, StorageError):
            raise StorageError(f"blob write failed: {failure}") from failure
        raise failure  # not the store's: a bug or an interruption

    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _start_uploads(self, chunks: list[_Chunk], buffer: _Buffer | None) -> None:
        task = asyncio.ensure_future(self._upload_all(chunks, buffer))
        self._tasks.add(task)
        task.add_done_callback(self._upload_done)

    async def _upload_all(self, chunks: list[_Chunk], buffer: _Buffer | None) -> None:
        try:
            outcomes = await asyncio.gather(*(self._upload(d, v) for d, v in chunks), return_exceptions=True)
            for outcome in outcomes:  # all finished: the buffer is no longer read
                if isinstance(outcome, BaseException):
                    raise outcome
        finally:
            self._release(buffer)

    async def _upload(self, digest: B3Digest, chunk: memoryview) -> None:
        async with self._slots:
            if self._stop.is_set():
                return
            key = _chunk_key(digest)
            access = self._svc.access
            if await access.exists(key):
                uploaded = False
            else:
                compressed = await asyncio.wrap_future(worker_pool().submit(zstd_compress_chunk, chunk))
                uploaded = await access.put_new(key, compressed)
            self._count(uploaded)

    @functools.cached_property
    def _slots(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self._max_in_flight)

    def _upload_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._fail(error)

    # -- shared --------------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = error
            self._stop.set()
            self._lock.notify_all()

    def _count(self, uploaded: bool) -> None:
        with self._lock:
            if uploaded:
                self.chunks_uploaded += 1
            else:
                self.chunks_skipped += 1

    def _release(self, buffer: _Buffer | None) -> None:
        if buffer is None:
            return
        with self._lock:
            buffer.refs -= 1
            if buffer.refs == 0:
                self._charged -= buffer.cost
                if buffer.data is not None and len(buffer.data) in self._free:
                    self._free[len(buffer.data)].append(buffer.data)
                self._lock.notify_all()

    # -- the cutter ------------------------------------------------------------------------------

    def _cut_next(self, message: tuple[list[memoryview], bool] | None) -> bool:
        """One message of the cutter thread; ``False`` once the writer is done with it."""
        try:
            if message is None:  # abort
                return False
            pieces, final = message
            self._cut(pieces, final, inline=False)
            if not final:
                return True
            with self._lock:
                jobs = list(self._jobs)
            concurrent.futures.wait(jobs)
            self._publish_sync()
        except _Stopped:
            pass
        except BaseException as e:
            self._fail(e)
        return False

    def _unblock(self) -> None:
        for _ in range(_QUEUED + 1):
            self._room.release()

    def _cut_once(self, pieces: list[memoryview]) -> None:
        """The whole of a blob of one segment, in one job (stores in this process: inline)."""
        try:
            self._cut(pieces, final=True, inline=True)
            self._publish_sync()
        except _Stopped:
            pass
        except BaseException as e:
            self._fail(e)

    def _take_buffer(self, size: int, capacity: int, piece: memoryview | None = None) -> _Buffer:
        """A region's holder once its bytes fit the budget (one region always fits): for
        ``piece`` cut in place, or with a cut buffer of ``size`` bytes, of ``capacity`` bytes
        when that is not 0 (a join's or a segment's: recycled), else of just ``size``."""
        cost = len(piece) if piece is not None else capacity or size
        with self._lock:
            full = self._charged and self._charged + cost > self._budget
        if full:
            self._flush()  # the regions it waits for may be among those not yet handed on
        with self._lock:
            while self._charged and self._charged + cost > self._budget and not self._stop.is_set():
                self._lock.wait()
            if self._stop.is_set():
                raise _Stopped
            self._charged += cost
            if piece is not None:
                return _Buffer(None, cost)
            free = self._free.get(capacity)
            if free:
                return _Buffer(free.pop(), cost)
        return _Buffer(bytearray(cost), cost)

    def _cut(self, pieces: list[memoryview], final: bool, inline: bool) -> None:
        """Cut a message's pieces into regions, each cut at once (see :meth:`_cut_region`)."""
        if self._stop.is_set():
            raise _Stopped
        if not inline:
            self._to_loop(self._room.release)
        if self._chunker is None:
            self._chunker = _new_chunker(self._svc.avg_chunk_size)
        todo = collections.deque(piece for piece in pieces if piece)
        while todo or (final and self._tail is not None):
            self._cut_region(todo, final, inline)
        self._flush()

    def _cut_region(self, todo: "collections.deque[memoryview]", final: bool, inline: bool) -> None:
        """Cut one region: the next piece in place when it is longer than a maximum chunk and
        no uncut tail precedes it (the written ``bytes`` are immutable: no copy); otherwise a
        copy in a cut buffer. A tail that precedes a long piece is joined with just enough of
        it (a maximum chunk) to end the tail's chunk, and the cut goes on in the piece itself,
        so a writer of 1 MiB blocks has about half of its bytes copied instead of all."""
        max_size = 2 * self._svc.avg_chunk_size
        tail, tail_buffer = self._tail, self._tail_buffer
        self._tail = self._tail_buffer = None
        joined = -1  # bytes of the tail in a join region (-1: not a join)
        piece: memoryview | None = None
        if tail is None and (len(todo[0]) > max_size or (final and len(todo) == 1)):
            region = todo.popleft()
            buffer = self._take_buffer(0, 0, region)
        else:
            parts = [tail] if tail is not None else []
            if tail is not None and todo and len(todo[0]) > max_size:
                piece = todo.popleft()
                joined = len(tail)
                parts.append(piece[: max(max_size + 1 - joined, 1)])  # the join's first chunk is final
            else:
                total = len(tail) if tail is not None else 0
                while todo and len(todo[0]) <= max_size and total + len(todo[0]) <= self._capacity:
                    total += len(todo[0])
                    parts.append(todo.popleft())
            size = sum(map(len, parts))
            capacity = self._join if piece is not None else 0 if final and not todo else self._capacity
            buffer = self._take_buffer(size, capacity)
            assert buffer.data is not None
            data = memoryview(buffer.data)  # a view's slice assignment copies once (a
            pos = 0  # bytearray's would first copy a non-bytearray value into a new one)
            for part in parts:
                data[pos : pos + len(part)] = part
                pos += len(part)
            region = data[:pos]
            self._release(tail_buffer)
        last = final and not todo and (piece is None or len(piece) <= len(region) - joined)
        chunks: list[_Cut] = []
        consumed = 0
        held: tuple[int, int] | None = None  # the last cut: final only if another follows
        assert self._chunker is not None
        for cut in self._chunker.cut_buf(region):
            if held is not None:
                consumed = self._add_chunk(region, held, chunks)
                if 0 <= joined <= consumed:
                    break  # the tail's chunk is cut: the rest is cut in the piece itself
            held = (cut.offset, cut.length)
        else:
            if held is not None and last:
                consumed = self._add_chunk(region, held, chunks)
        if piece is not None:
            rest = piece[consumed - joined :] if consumed >= joined else piece[len(region) - joined :]
            if rest:
                todo.appendleft(rest)
            if consumed < joined:  # the join ended no chunk past the tail (rare): a new tail
                self._keep_tail(region[consumed:], buffer)
        elif not last and consumed < len(region):
            self._keep_tail(region[consumed:], buffer)
        if inline:  # one job does it all, in order
            self._hasher.update(region[:consumed])
            if chunks:
                with self._lock:
                    buffer.refs += 1
                self._store_job([(chunks, buffer)])
        else:  # handed on by message (:meth:`_flush`): fewer jobs, locks and wake-ups
            with self._lock:
                if consumed:
                    buffer.refs += 1
                    self._batch_hash.append((region[:consumed], buffer))
                if chunks:
                    buffer.refs += 1
                    self._batch.append((chunks, buffer))
        self._release(buffer)  # the cut's reference

    def _keep_tail(self, view: memoryview, buffer: _Buffer) -> None:
        self._tail, self._tail_buffer = view, buffer
        with self._lock:
            buffer.refs += 1

    def _flush(self) -> None:
        """Hand the regions cut so far on: their bytes to the blob's hash, their chunks to one
        store job."""
        views, groups = self._batch_hash, self._batch
        self._batch_hash, self._batch = [], []
        if views:
            self._hash_later(views)
        if groups:
            self._store(groups)

    def _hash_later(self, views: list[tuple[memoryview, _Buffer]]) -> None:
        """Feed ``views`` (their holders' references taken) to the blob's hash beside the
        cutter, in order: one job at a time takes every view queued."""
        with self._lock:
            self._to_hash.extend(views)
            if self._hashing:
                return
            self._hashing = True
            job = worker_pool().submit(self._hash_job)
            self._jobs.add(job)
        job.add_done_callback(self._job_done)

    def _hash_job(self) -> None:
        while True:
            with self._lock:
                if not self._to_hash or self._stop.is_set():
                    self._hashing = False
                    return
                view, buffer = self._to_hash.popleft()
            try:
                self._hasher.update(view)
            except BaseException as e:
                self._fail(e)
            finally:
                self._release(buffer)

    def _add_chunk(self, segment: memoryview, cut: tuple[int, int], chunks: list[_Cut]) -> int:
        """Give one chunk its slot in the blob's chunk list; the end of the chunk."""
        offset, length = cut
        chunks.append((len(self._sizes), segment[offset : offset + length]))
        self._sizes.append(length)
        self._digests.append(None)
        return offset + length

    def _hash_chunk(self, index: int, view: memoryview) -> B3Digest:
        digest = self._digests[index] = blake3_digest(view)
        return digest

    def _store(self, groups: list[_Group]) -> None:
        if not self._in_process:  # remote: hashed here, uploaded by tasks on the event loop
            for chunks, buffer in groups:
                hashed = [(self._hash_chunk(i, view), view) for i, view in chunks]
                self._to_loop(self._start_uploads, hashed, buffer)
            return
        with self._lock:
            while self._store_jobs >= self._max_in_flight and not self._stop.is_set():
                self._lock.wait()
            if self._stop.is_set():
                for _chunks, buffer in groups:
                    self._release_locked(buffer)
                raise _Stopped
            job = worker_pool().submit(self._store_job, groups)
            self._jobs.add(job)
            self._store_jobs += 1
        job.add_done_callback(self._store_job_done)

    def _release_locked(self, buffer: _Buffer | None) -> None:
        if buffer is not None:
            buffer.refs -= 1
            if buffer.refs == 0:
                self._charged -= buffer.cost
                self._lock.notify_all()

    def _job_done(self, job: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._jobs.discard(job)
            self._lock.notify_all()

    def _store_job_done(self, job: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._store_jobs -= 1
            self._job_done(job)

    # -- store jobs (worker threads) -----------------------------------------------------------

    def _store_job(self, groups: list[_Group]) -> None:
        """Hash, check, compress and put chunks with blocking requests."""
        access = self._svc.access
        done = 0
        try:
            for chunks, buffer in groups:
                for index, chunk in chunks:
                    if self._stop.is_set():
                        return
                    key = _chunk_key(self._hash_chunk(index, chunk))
                    uploaded = not access.exists_sync(key) and access.put_new_sync(key, zstd_compress_chunk(chunk))
                    self._count(uploaded)
                done += 1
                self._release(buffer)
        except BaseException as e:
            self._fail(e)
        finally:
            for _chunks, buffer in groups[done:]:
                self._release(buffer)


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
