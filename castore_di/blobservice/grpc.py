"""A blob service reached over gRPC (``type: grpc``, URL ``grpc+http://host:port`` …).

Talks ``tvix.castore.v1.BlobService`` to our server or the reference's. Construction does
no I/O; the channel is made on first use (see :class:`~castore_di._grpc.channel.LazyChannel`
for ``wait-connect=1``; :meth:`GRPCBlobService.connect` connects explicitly). Stat and
Read are retried on UNAVAILABLE with bounded backoff; Put is not (a stream cannot be
replayed), but it first waits up to ``connect_timeout`` for the channel to be ready.

Reads, by what Stat(send_chunks) reports:

* several chunks: a :class:`ChunkedReader` that fetches one chunk at a time (each verified
  against its chunk digest; a seek fetches only the chunk holding the target). Reading the
  whole blob from the start also checks the blob digest at the end.
* Whatever the form, a server that sends more bytes than Stat announced is caught after
  at most one message beyond the announced size (:class:`IntegrityError`).
* one chunk (our server describes unchunked blobs so, which also gives the size): blobs up
  to :data:`BUFFER_LIMIT` are read whole and verified before any byte is returned; larger
  ones stream with the digest checked incrementally and compared at EOF (an
  :class:`IntegrityError` is raised by the read that reaches the end, so callers must read
  to the end to get the guarantee). Seeking forward skips (and hashes) streamed bytes;
  seeking backwards re-issues Read from the start and skips to the target: that costs up to
  one extra transfer of the blob per backward seek.
* no chunk list (a server that gives none, and so no size): the blob is streamed into a
  spooled temporary file (memory up to :data:`BUFFER_LIMIT`, disk beyond) and verified
  before the reader is returned.

Writes stream: every ``write`` is sent as BlobChunk messages of at most 1 MiB (small
writes are coalesced) into one Put call, with gRPC flow control as back-pressure; the
digest the server returns must equal the digest of the bytes written.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import blake3

from castore_di.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesReader,
    ChunkedReader,
    ChunkMeta,
    HashingWriter,
    PositionedReader,
)
from castore_di.composition.config import BlobServiceConfig
from castore_di.digests import B3_LEN, B3Digest, blake3_digest
from castore_di.errors import IntegrityError, StorageError
from castore_di._grpc.channel import (
    GrpcClient,
    GrpcClientConfig,
    StreamSender,
    identity,
    is_not_found,
    translate_rpc_error,
)
from castore_di._grpc.wire import BLOB_PUT as _PUT
from castore_di._grpc.wire import BLOB_READ as _READ
from castore_di._grpc.wire import BLOB_STAT as _STAT
from castore_di._grpc.wire import CHUNK_MESSAGE_SIZE
from castore_di._grpc.wire import decode_blob_chunk as _decode_chunk
from castore_di._grpc.wire import encode_blob_chunk as _encode_chunk

if TYPE_CHECKING:
    import grpc.aio

__all__ = ["GRPCBlobService", "GRPCBlobServiceConfig", "BUFFER_LIMIT", "WRITE_MESSAGE_SIZE"]

BUFFER_LIMIT = 8 * 1024 * 1024  # blobs up to this size are fully verified before reading
WRITE_MESSAGE_SIZE = CHUNK_MESSAGE_SIZE  # BlobChunk payload per Put message
PUT_QUEUE_DEPTH = 4  # Put messages buffered ahead of gRPC flow control



class GRPCBlobService(GrpcClient, BlobService):
    """A :class:`BlobService` client of a ``tvix.castore.v1.BlobService`` server."""

    _health_service = "tvix.castore.v1.BlobService"

    # -- Stat --------------------------------------------------------------------------

    async def _stat(self, digest: B3Digest, send_chunks: bool) -> list[ChunkMeta] | None:
        from castore_di.proto.tvix.castore.protos import rpc_blobstore_pb2 as pb

        request = pb.StatBlobRequest(digest=digest, send_chunks=send_chunks).SerializeToString()

        async def call() -> bytes | None:
            channel = await self._chan.get()
            stat = channel.unary_unary(_STAT, request_serializer=identity, response_deserializer=identity)
            try:
                response: bytes = await stat(request, timeout=self._chan.timeout, metadata=self._chan.metadata)
                return response
            except Exception as e:
                if is_not_found(e):
                    return None
                raise

        raw = await self._chan.retrying(f"Stat {digest}", call)
        if raw is None:
            return None
        response = pb.StatBlobResponse.FromString(raw)
        out: list[ChunkMeta] = []
        for i, c in enumerate(response.chunks):
            if len(c.digest) != B3_LEN:
                raise StorageError(f"Stat {digest}: Invalid digest length {len(c.digest)} for chunk #{i}")
            out.append(ChunkMeta(B3Digest(c.digest), c.size))
        return out

    async def has(self, digest: B3Digest) -> bool:
        return await self._stat(digest, send_chunks=False) is not None

    async def stat_size(self, digest: B3Digest) -> int | None:
        """The blob's size from Stat alone (our server lists an unchunked blob as one chunk).

        Falls back to reading when the server gives no chunk list.
        """
        chunks = await self._stat(digest, send_chunks=True)
        if chunks is None:
            return None
        if chunks:
            return sum(c.size for c in chunks)
        reader = await self.open_read(digest)
        if reader is None:
            return None
        async with reader:
            return reader.size

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        chunks = await self._stat(digest, send_chunks=True)
        if chunks is not None and len(chunks) == 1 and chunks[0].digest == digest:
            return []  # the whole blob described as its own chunk: not chunked
        return chunks

    # -- Read --------------------------------------------------------------------------

    async def _open_stream(self, digest: B3Digest) -> "grpc.aio.UnaryStreamCall[bytes, bytes]":
        from castore_di.proto.tvix.castore.protos import rpc_blobstore_pb2 as pb

        request = pb.ReadBlobRequest(digest=digest).SerializeToString()
        call: grpc.aio.UnaryStreamCall[bytes, bytes] = await self._unary_stream(_READ, request, self._chan.stream_timeout)
        return call

    async def _read_whole(self, digest: B3Digest, size: int) -> bytes | None:
        """All bytes of a blob or chunk via Read (retried), unverified; None if absent.

        ``size`` is what Stat promised: a server that sends more is caught after at most
        one message beyond it (:class:`IntegrityError`), so a lying peer cannot make us
        buffer without bound.
        """

        async def call() -> bytes | None:
            stream = await self._open_stream(digest)
            parts: list[bytes] = []
            received = 0
            try:
                async for raw in stream:
                    data = _decode_chunk(raw)
                    received += len(data)
                    if received > size:
                        stream.cancel()
                        raise IntegrityError(
                            f"blob {digest}: server {self.url} sent more than the {size} bytes it announced"
                        )
                    parts.append(data)
            except Exception as e:
                if is_not_found(e):
                    return None
                raise
            return b"".join(parts)

        return await self._chan.retrying(f"Read {digest}", call)

    async def _read_verified(self, digest: B3Digest, size: int) -> bytes | None:
        data = await self._read_whole(digest, size)
        if data is not None and (len(data) != size or blake3_digest(data) != digest):
            raise IntegrityError(f"blob {digest}: server {self.url} returned bytes that do not match the digest")
        return data

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        chunks = await self._stat(digest, send_chunks=True)
        if chunks is None:
            return None
        if len(chunks) >= 2:
            sizes = {c.digest: c.size for c in chunks}

            async def fetch(chunk: B3Digest) -> bytes | None:
                return await self._read_whole(chunk, sizes[chunk])

            return ChunkedReader(digest, chunks, fetch, readahead=2)
        if len(chunks) == 1:
            size = chunks[0].size
            if size <= BUFFER_LIMIT:
                data = await self._read_verified(digest, size)
                if data is None:
                    return None
                return BytesReader(data)
            return _StreamingReader(self, digest, size)
        return await self._spool(digest)

    async def _spool(self, digest: B3Digest) -> BlobReader | None:
        """Stream a blob of unknown size into a spooled temp file, verified before returning."""

        async def call() -> BlobReader | None:
            spool = tempfile.SpooledTemporaryFile(max_size=BUFFER_LIMIT)
            hasher = blake3.blake3()
            try:
                stream = await self._open_stream(digest)
                try:
                    async for raw in stream:
                        data = _decode_chunk(raw)
                        hasher.update(data)
                        spool.write(data)
                except Exception as e:
                    if is_not_found(e):
                        spool.close()
                        return None
                    raise
            except BaseException:
                spool.close()
                raise
            if B3Digest(hasher.digest()) != digest:
                spool.close()
                raise IntegrityError(f"blob {digest}: server {self.url} returned bytes that do not match the digest")
            size = spool.tell()
            if size <= BUFFER_LIMIT:
                spool.seek(0)
                data = spool.read()
                spool.close()
                return BytesReader(data)
            return _FileReader(spool, size)

        return await self._chan.retrying(f"Read {digest}", call)

    # -- Put ---------------------------------------------------------------------------

    def open_write(self) -> BlobWriter:
        return _GrpcBlobWriter(self)


class _FileReader(PositionedReader):
    """A reader over a (spooled) temporary file that was verified while it was written."""

    def __init__(self, file: Any, size: int) -> None:
        super().__init__(size)
        self._file = file

    async def read(self, n: int = -1) -> bytes:
        self._check_open()
        self._file.seek(self._pos)
        data: bytes = self._file.read(self._wanted(n))
        self._pos += len(data)
        return data

    async def close(self) -> None:
        if not self._closed:
            await super().close()
            self._file.close()


class _StreamingReader(PositionedReader):
    """Streams a large blob of known size; the digest is checked when the stream ends."""

    def __init__(self, service: GRPCBlobService, digest: B3Digest, size: int) -> None:
        super().__init__(size)
        self._service = service
        self._digest = digest
        self._stream: AsyncIterator[bytes] | None = None
        self._call: Any = None
        self._buf = b""  # bytes of the stream starting at self._buf_off
        self._buf_off = 0
        self._hasher = blake3.blake3()
        self._received = 0

    async def _restart(self) -> None:
        self._cancel()

        async def open_and_first() -> tuple[Any, AsyncIterator[bytes], bytes | None]:
            call = await self._service._open_stream(self._digest)
            stream = call.__aiter__()
            try:
                first: bytes | None = await stream.__anext__()
            except StopAsyncIteration:
                first = None
            return call, stream, first

        self._call, self._stream, first = await self._service._chan.retrying(f"Read {self._digest}", open_and_first)
        self._hasher = blake3.blake3()
        self._received = 0
        self._buf, self._buf_off = b"", 0
        if first is None:
            self._stream = None
            self._check_end()
        else:
            self._take(_decode_chunk(first))

    def _take(self, data: bytes) -> None:
        self._hasher.update(data)
        self._buf_off = self._received
        self._received += len(data)
        self._buf = data
        if self._received > self._size:
            raise IntegrityError(f"blob {self._digest}: server sent more than the {self._size} bytes announced")

    def _check_end(self) -> None:
        if self._received != self._size or B3Digest(self._hasher.digest()) != self._digest:
            raise IntegrityError(
                f"blob {self._digest}: server {self._service.url} returned bytes that do not match the digest"
            )

    async def _next(self) -> bool:
        """Pull the next message into the buffer; False at the end of the stream (verified)."""
        import grpc

        assert self._stream is not None
        try:
            raw = await self._stream.__anext__()
        except StopAsyncIteration:
            self._stream = None
            self._check_end()
            return False
        except grpc.aio.AioRpcError as e:
            self._stream = None
            raise translate_rpc_error(e, f"Read {self._digest} (at byte {self._received})", self._service.url) from e
        self._take(_decode_chunk(raw))
        return True

    async def read(self, n: int = -1) -> bytes:
        self._check_open()
        want = self._wanted(n)
        if want <= 0:
            return b""
        if self._call is None or self._pos < self._buf_off:
            await self._restart()
        parts: list[bytes] = []
        while want > 0:
            end = self._buf_off + len(self._buf)
            if self._buf_off <= self._pos < end:
                start = self._pos - self._buf_off
                piece = self._buf[start : start + want]
                parts.append(piece)
                self._pos += len(piece)
                want -= len(piece)
                continue
            if self._stream is None or not await self._next():
                raise IntegrityError(f"blob {self._digest}: stream ended at byte {self._received} of {self._size}")
        if self._pos == self._size and self._stream is not None:
            # drain the end of the stream so the digest check runs on the last read
            while await self._next():
                pass
        return b"".join(parts)

    def _cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None
        self._stream = None

    async def close(self) -> None:
        await super().close()
        self._cancel()
        self._buf = b""


class _GrpcBlobWriter(HashingWriter):
    """Feeds one Put call as data is written; nothing is sent before the first write."""

    def __init__(self, service: GRPCBlobService) -> None:
        super().__init__()
        self._service = service
        self._sender: StreamSender | None = None
        self._pending = bytearray()

    async def _start(self) -> StreamSender:
        if self._sender is None:
            self._sender = await self._service._stream_sender(_PUT, depth=PUT_QUEUE_DEPTH)
        return self._sender

    async def _send(self, piece: bytes | bytearray | memoryview) -> None:
        sender = await self._start()
        await sender.send(_encode_chunk(piece))

    async def _write(self, data: bytes) -> None:
        self._hash(data)
        if len(self._pending) + len(data) < WRITE_MESSAGE_SIZE:
            self._pending += data
            return
        view = memoryview(data)
        if self._pending:
            fill = WRITE_MESSAGE_SIZE - len(self._pending)
            self._pending += view[:fill]
            view = view[fill:]
            await self._send(self._pending)
            self._pending = bytearray()
        while len(view) >= WRITE_MESSAGE_SIZE:
            await self._send(view[:WRITE_MESSAGE_SIZE])
            view = view[WRITE_MESSAGE_SIZE:]
        self._pending += view

    async def _finish(self) -> B3Digest:
        if self._pending:
            await self._send(self._pending)
            self._pending = bytearray()
        sender = await self._start()
        raw = await sender.finish()
        from castore_di.proto.tvix.castore.protos import rpc_blobstore_pb2 as pb

        returned = pb.PutBlobResponse.FromString(raw).digest
        expected = self._hashed_digest()
        if len(returned) != B3_LEN:
            raise StorageError(f"Put to {self._service.url}: invalid root digest length {len(returned)} in response")
        if returned != expected:
            raise IntegrityError(f"Put to {self._service.url}: server stored {B3Digest(returned)}, wrote {expected}")
        return expected

    async def _abort(self) -> None:
        self._pending = bytearray()
        if self._sender is not None:
            self._sender.cancel()


@attrs.frozen(kw_only=True)
class GRPCBlobServiceConfig(GrpcClientConfig, BlobServiceConfig):
    """A remote blob service; ``url`` is required (see :class:`GrpcClientConfig` for the rest)."""

    type_tag: ClassVar[str] = "grpc"

    def build(self) -> GRPCBlobService:
        return GRPCBlobService(self.url, **self.client_kwargs())

    @classmethod
    def from_url(cls, url: str) -> "GRPCBlobServiceConfig":
        """``grpc+http://host:port``, ``grpc+https://host[:port]`` or ``grpc+unix:///path``,
        optionally with ``?wait-connect=1``; the other fields keep their defaults.
        """
        return cls(url=url)
