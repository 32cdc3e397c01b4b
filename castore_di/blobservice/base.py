"""The BlobService interface, its readers and writers.

Contract every backend keeps:

* Blobs are addressed by the BLAKE3 digest of their full contents. Chunking is a storage
  and transport concern and never changes a digest.
* ``has``/``open_read``/``chunks`` report absence as ``False``/``None``, never as an error.
  They also work for the digests of chunks that ``chunks`` listed.
* ``open_read`` returns a seekable reader. Bytes are verified against their digest (or
  chunk digest) before they are returned; a mismatch raises
  :class:`~castore_di.errors.IntegrityError`, never silently wrong data.
* ``open_write`` does no I/O until data arrives. ``close()`` returns the digest; calling
  it again returns the same digest; after a failed close, closing again raises the same
  error. Nothing becomes visible under a digest before ``close()`` succeeded, and an
  aborted or interrupted write leaves nothing behind under a digest.
* Construction does no I/O; ``close()`` on the service releases what it opened and does
  not close the services it was given.
"""

from __future__ import annotations

import abc
import bisect
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs
import blake3

from castore_di.composition.fields import between
from castore_di.digests import B3Digest, blake3_digest
from castore_di.errors import ClosedError, IntegrityError, StorageError

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "BlobService",
    "BlobReader",
    "BlobWriter",
    "BlockingReads",
    "BytesReader",
    "ChunkedReader",
    "ChunkMeta",
    "HashingWriter",
    "PreparedBlob",
    "PositionedReader",
    "READ_BLOCK",
    "DEFAULT_AVG_CHUNK_SIZE",
    "MIN_AVG_CHUNK_SIZE",
    "MAX_AVG_CHUNK_SIZE",
    "ChunkListCheck",
    "ChunkingFields",
    "check_chunk",
]

READ_BLOCK = 1 << 20  # default block size for streaming reads and copies

# FastCDC 2020 (pyfastcdc and the Rust crate alike; min = avg/2, max = 2*avg) as the backends
# that cut blobs use it. The reference's default average; FastCDC needs min = avg/2 <= 1 MiB;
# below 4 KiB a store would hold hundreds of thousands of chunks per GiB.
DEFAULT_AVG_CHUNK_SIZE = 256 * 1024
MIN_AVG_CHUNK_SIZE = 4 * 1024
MAX_AVG_CHUNK_SIZE = 2 * 1024 * 1024


@attrs.frozen(kw_only=True, slots=False)  # a mixin beside other slotted field sets
class ChunkingFields:
    """The config field of the blob services that cut blobs with FastCDC."""

    avg_chunk_size: int = attrs.field(
        default=DEFAULT_AVG_CHUNK_SIZE,
        validator=[
            attrs.validators.instance_of(int),
            between(MIN_AVG_CHUNK_SIZE, MAX_AVG_CHUNK_SIZE, "FastCDC needs min = avg/2 <= 1 MiB"),
        ],
    )
    """FastCDC average chunk size in bytes (min = avg/2, max = 2*avg), between 4 KiB and 2 MiB."""


@attrs.frozen(slots=True)
class ChunkMeta:
    """One chunk of a blob: its digest and length."""

    digest: B3Digest = attrs.field(converter=B3Digest)
    size: int


def check_chunk(blob: B3Digest, index: int, meta: ChunkMeta, data: bytes | None, *, verified: bool = False) -> bytes:
    """Chunk ``index`` of ``blob`` as fetched: absent is a :class:`StorageError`, a wrong size or
    (unless ``verified``) a wrong digest an :class:`IntegrityError`."""
    if data is None:
        raise StorageError(f"blob {blob}: chunk #{index} {meta.digest} is missing")
    if len(data) != meta.size:
        raise IntegrityError(f"blob {blob}: chunk #{index} {meta.digest} has {len(data)} bytes, the index says {meta.size}")
    if not verified and blake3_digest(data) != meta.digest:
        raise IntegrityError(f"blob {blob}: chunk #{index} {meta.digest} is corrupted")
    return data


class ChunkListCheck:
    """The check of a whole chunk list: feed every chunk in order (:meth:`add`), then :meth:`finish`."""

    def __init__(self, blob: B3Digest) -> None:
        self.blob = blob
        self._index = 0
        self._hasher: Any = blake3.blake3()

    def add(self, meta: ChunkMeta, data: bytes | None, *, verified: bool = False) -> None:
        self._hasher.update(check_chunk(self.blob, self._index, meta, data, verified=verified))
        self._index += 1

    def finish(self) -> None:
        """Raise :class:`IntegrityError` when the chunks do not hash to the blob's digest."""
        if self._hasher.digest() != self.blob:
            raise IntegrityError(f"blob {self.blob}: its chunks do not add up to the blob's digest")


class BlobReader(abc.ABC):
    """An async, seekable reader of one blob. Use it as an async context manager."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The blob's total length in bytes."""

    @abc.abstractmethod
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all remaining with ``n < 0``); ``b""`` at the end."""

    @abc.abstractmethod
    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to a position (``SEEK_SET``/``SEEK_CUR``/``SEEK_END``); beyond the end is an error."""

    @abc.abstractmethod
    def tell(self) -> int:
        """The current position."""

    async def close(self) -> None:
        """Release resources; reading afterwards raises :class:`ClosedError`."""

    async def readall(self) -> bytes:
        return await self.read(-1)

    async def iter_blocks(self, block_size: int = READ_BLOCK) -> AsyncIterator[bytes]:
        """Yield the rest of the blob in blocks of at most ``block_size`` bytes."""
        while True:
            block = await self.read(block_size)
            if not block:
                return
            yield block

    async def __aenter__(self) -> "BlobReader":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _seek_target(self, offset: int, whence: int) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self.tell() + offset
        elif whence == io.SEEK_END:
            target = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError(f"seek to negative position {target}")
        if target > self.size:
            raise ValueError(f"seek beyond end of blob ({target} > {self.size})")
        return target


class PositionedReader(BlobReader):
    """Base for readers of a known size that keep their own position.

    Provides ``size``, ``tell``, ``seek`` (validated by ``_seek_target``) and the closed
    flag; subclasses implement ``read`` (calling :meth:`_check_open` first) and extend
    ``close`` to release what they hold.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._pos = 0
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._seek_target(offset, whence)
        return self._pos

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("reader is closed")

    def _wanted(self, n: int) -> int:
        """How many bytes ``read(n)`` returns from the current position."""
        return self._size - self._pos if n < 0 else max(0, min(n, self._size - self._pos))

    async def close(self) -> None:
        self._closed = True


class BytesReader(PositionedReader):
    """A reader over bytes already in memory (and already verified)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data)
        super().__init__(len(self._data))

    async def read(self, n: int = -1) -> bytes:
        self._check_open()
        end = self._pos + self._wanted(n)
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out


class ChunkedReader(PositionedReader):
    """A reader over a list of chunks, fetched one at a time and each verified.

    ``fetch(chunk_digest)`` returns the chunk's bytes or ``None``; bytes that do not hash to
    the chunk digest raise :class:`IntegrityError` naming the blob and the chunk. Seeking
    fetches only the chunk that holds the target position. When the blob is read from the
    start to the end, the whole-blob digest is checked too, which catches an index listing
    wrong (but intact) chunks. With ``readahead`` > 0, once a read moves from one chunk into
    the next, that many following chunks are fetched in the background (never earlier ones;
    a seek cancels what it skips).
    """

    def __init__(
        self,
        blob: B3Digest,
        chunks: Sequence[ChunkMeta],
        fetch: Callable[[B3Digest], Awaitable[bytes | None]],
        *,
        readahead: int = 0,
    ) -> None:
        if not chunks:
            raise ValueError("ChunkedReader needs at least one chunk")
        self._blob = blob
        self._chunks = list(chunks)
        self._fetch = fetch
        self._offsets: list[int] = []
        total = 0
        for c in self._chunks:
            self._offsets.append(total)
            total += c.size
        super().__init__(total)
        self._cur_index = -1
        self._cur: bytes = b""
        self._readahead = readahead
        self._pending: dict[int, asyncio.Future[bytes | None]] = {}
        self._hasher: Any = blake3.blake3()
        self._hashed = 0

    def _index_of(self, pos: int) -> int:
        return bisect.bisect_right(self._offsets, pos) - 1

    def _schedule(self, index: int) -> None:
        sequential = index == self._cur_index + 1 and self._cur_index >= 0
        end = min(index + 1 + self._readahead, len(self._chunks)) if sequential else index + 1
        wanted = range(index + 1, end)
        for i in list(self._pending):
            if i != index and i not in wanted:
                self._pending.pop(i).cancel()
        for i in wanted:
            if i not in self._pending:
                import asyncio  # only a reader with readahead needs the loop

                task = asyncio.ensure_future(self._fetch(self._chunks[i].digest))
                task.add_done_callback(_retrieve)  # a skipped chunk's error is not an error
                self._pending[i] = task

    async def _load(self, index: int) -> bytes:
        if index != self._cur_index:
            meta = self._chunks[index]
            if self._readahead:
                self._schedule(index)
            task = self._pending.pop(index, None)
            data = await task if task is not None else await self._fetch(meta.digest)
            self._cur_index, self._cur = index, check_chunk(self._blob, index, meta, data)
        return self._cur

    async def read(self, n: int = -1) -> bytes:
        self._check_open()
        start = self._pos
        want = self._wanted(n)
        parts: list[bytes] = []
        while want > 0:
            index = self._index_of(self._pos)
            data = await self._load(index)
            offset = self._pos - self._offsets[index]
            piece = data[offset : offset + want]
            parts.append(piece)
            self._pos += len(piece)
            want -= len(piece)
        out = b"".join(parts)
        self._check_whole(start, out)
        return out

    def _check_whole(self, start: int, out: bytes) -> None:
        if self._hasher is None or not out:
            return
        if start != self._hashed:  # not a start-to-end read: no whole-blob check
            self._hasher = None
            return
        self._hasher.update(out)
        self._hashed += len(out)
        if self._hashed == self.size and B3Digest(self._hasher.digest()) != self._blob:
            self._hasher = None
            raise IntegrityError(f"blob {self._blob}: its chunks do not add up to the blob's digest")

    async def close(self) -> None:
        for task in self._pending.values():
            task.cancel()
        if self._pending:
            import asyncio

            await asyncio.gather(*self._pending.values(), return_exceptions=True)
        self._pending.clear()
        await super().close()
        self._cur = b""


def _retrieve(task: "asyncio.Future[bytes | None]") -> None:
    if not task.cancelled():
        task.exception()


class BlobWriter(abc.ABC):
    """An async writer of one blob; ``close()`` returns its digest.

    Used as an async context manager it closes on success and aborts on an exception.
    Subclasses implement ``_write``, ``_finish`` and ``_abort``; this class keeps the state
    machine (write after close, double close, close after a failed close).
    """

    def __init__(self) -> None:
        self._digest: B3Digest | None = None
        self._error: BaseException | None = None
        self._done = False

    @property
    def digest(self) -> B3Digest | None:
        """The digest once ``close()`` succeeded."""
        return self._digest

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._done:
            raise ClosedError("writer is already closed")
        if data:
            await self._write(bytes(data) if not isinstance(data, bytes) else data)
        return len(data)

    async def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._error is not None:
            raise self._error
        if self._done:
            raise ClosedError("writer was aborted")
        self._done = True
        try:
            self._digest = await self._finish()
        except BaseException as e:
            self._error = e
            try:
                await self._abort()
            finally:
                raise
        return self._digest

    async def abort(self) -> None:
        """Discard what was written; nothing becomes visible under a digest."""
        if self._done:
            return
        self._done = True
        await self._abort()

    @abc.abstractmethod
    async def _write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _finish(self) -> B3Digest: ...

    async def _abort(self) -> None:
        return None

    async def __aenter__(self) -> "BlobWriter":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()


class HashingWriter(BlobWriter):
    """Base for writers that hash as they go: ``self._hasher`` sees every byte written."""

    def __init__(self) -> None:
        super().__init__()
        self._hasher = blake3.blake3()
        self._length = 0

    def _hash(self, data: bytes) -> None:
        self._hasher.update(data)
        self._length += len(data)

    def _hashed_digest(self) -> B3Digest:
        return B3Digest(self._hasher.digest())


_MANY_AT_ONCE = 8  # calls in flight for the default has_many/put_many


class PreparedBlob:
    """A blob readied for :meth:`BlobService.put_prepared` by the same service's
    :meth:`~BlobService.prepare_many`: its digest and size, whether the service found it
    present (``None``: not checked), and the service's own encoding of it (``payload``)."""

    __slots__ = ("digest", "size", "present", "payload")

    def __init__(self, digest: B3Digest, size: int, present: bool | None, payload: Any) -> None:
        self.digest = digest
        self.size = size
        self.present = present
        self.payload = payload


class BlockingReads(Protocol):
    """Reads a backend answers in the calling thread, without an event loop
    (:meth:`BlobService.blocking_reads`). Nothing is verified: the caller checks every byte
    against the digests (and removes what it wrote from a blob that fails)."""

    def blobs(self, digests: Sequence[B3Digest]) -> list[bytes | list[ChunkMeta] | None]:
        """Per digest: the blob's bytes when it is stored whole, its chunk list when it is
        chunked (read each with :meth:`chunk`), ``None`` when absent."""
        ...

    def chunk(self, blob: B3Digest, chunk: B3Digest) -> bytes | None:
        """The bytes of a chunk from ``blob``'s chunk list; ``None`` when absent."""
        ...


class BlobService(abc.ABC):
    """A content-addressed store of blobs (see the module docstring for the contract)."""

    loopless: ClassVar[bool] = False
    """Whether its reads and ``close`` complete inside :func:`castore_di._loopless.run_loopless`
    (no event loop: nothing they await suspends). Writes may still need a loop."""

    @abc.abstractmethod
    async def has(self, digest: B3Digest) -> bool:
        """Whether the blob (or a chunk listed by ``chunks``) is present."""

    @abc.abstractmethod
    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        """A seekable, verifying reader, or ``None`` when the blob is absent."""

    @abc.abstractmethod
    def open_write(self) -> BlobWriter:
        """A writer for a new blob. No I/O happens before the first write."""

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """The blob's chunk list; ``[]`` when present but not chunked; ``None`` when absent."""
        return [] if await self.has(digest) else None

    async def close(self) -> None:
        """Release connections and files this service opened. Idempotent."""

    async def blocking_reads(self) -> BlockingReads | None:
        """Unverified reads that worker threads may call directly, for a backend whose reads
        need no event loop (the embedded store); ``None`` (the default) otherwise."""
        return None

    # -- conveniences built on the primitives ------------------------------------------

    async def put(self, data: bytes) -> B3Digest:
        """Store ``data`` in one call and return its digest."""
        writer = self.open_write()
        try:
            await writer.write(data)
        except BaseException:
            await writer.abort()
            raise
        return await writer.close()

    async def has_many(self, digests: Sequence[B3Digest]) -> list[bool]:
        """``has`` for each digest, in order (backends may answer in one lookup)."""
        import asyncio

        out: list[bool] = []
        for i in range(0, len(digests), _MANY_AT_ONCE):
            out += await asyncio.gather(*(self.has(d) for d in digests[i : i + _MANY_AT_ONCE]))
        return out

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """Store several (small) blobs; their digests in order, each returned only once stored.

        Backends may commit them together (one transaction); the default puts a few at a time.
        """
        import asyncio

        out: list[B3Digest] = []
        for i in range(0, len(blobs), _MANY_AT_ONCE):
            out += await asyncio.gather(*(self.put(b) for b in blobs[i : i + _MANY_AT_ONCE]))
        return out

    def prepare_many(self, blobs: Sequence[bytes]) -> list[PreparedBlob]:
        """Hash (and, where a backend can, check and encode) blobs for :meth:`put_prepared`.

        Blocking and CPU-bound: call it in a worker thread (several threads may call it at
        once), which lets a caller such as the importer do this work on every core. The
        digests are computed here, by this process; nothing is stored. The default hashes.
        """
        return [PreparedBlob(blake3_digest(b), len(b), None, b) for b in blobs]

    async def put_prepared(self, blobs: Sequence[PreparedBlob]) -> None:
        """Store blobs from this service's :meth:`prepare_many`; returns once they are stored.

        The default stores each payload with :meth:`put_many` and checks the digests agree.
        """
        stored = await self.put_many([p.payload for p in blobs])
        for p, digest in zip(blobs, stored):
            if digest != p.digest:
                raise StorageError(f"blob service stored digest {digest} for a blob hashed as {p.digest}")

    async def read_many(self, digests: Sequence[B3Digest], *, verify: bool = True) -> list[bytes | None]:
        """Several (small) whole blobs; ``None`` for an absent one.

        Backends may read them in one go; the default reads them one by one. With
        ``verify=False`` the caller checks each blob against its digest itself, and a
        backend may skip its own check (so each byte is hashed once).
        """
        return [await self.read_bytes(d) for d in digests]

    async def read_bytes(self, digest: B3Digest) -> bytes | None:
        """The whole blob in memory (verified), or ``None`` when absent."""
        reader = await self.open_read(digest)
        if reader is None:
            return None
        async with reader:
            return await reader.read()
