"""The ``tvix.castore.v1.BlobService`` servicer over any :class:`BlobService`.

Differences from the reference server, all wire-compatible:

* Stat honours ``send_chunks``: without it the reply is empty (existence only). With it,
  the backend's chunk list is sent; a blob the backend does not chunk is described as one
  chunk covering the whole blob (its own digest and size), so clients learn the size
  without reading. The reference client treats one chunk like none.
* Read streams the blob in messages of at most :data:`READ_MESSAGE_SIZE` bytes (the
  reference uses 4 KiB).
* Put streams every message into ``open_write`` as it arrives; nothing is buffered beyond
  one message and what the backend's writer keeps. The blob is committed only when the
  client half-closes the stream; a cancelled call, a deadline, a lost connection, an idle
  stream (``ServerLimits.idle_timeout``) or an error aborts the writer: nothing is stored.
* Read, Put and the other streams count against ``ServerLimits.max_streams``.
* Bad digests and garbage requests are INVALID_ARGUMENT; other errors follow the table in
  :mod:`castore_di._grpc.wire`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio

from castore_di.blobservice.base import BlobService
from castore_di.errors import ValidationError
from castore_di._grpc.wire import BLOB_SERVICE, CHUNK_MESSAGE_SIZE, decode_blob_chunk, encode_blob_chunk
from castore_di.proto.tvix.castore.protos import rpc_blobstore_pb2 as pb
from castore_di.server.common import (
    Context,
    SendWatch,
    Servicer,
    abort_with,
    give_back_memory,
    not_found,
    parse_digest,
    parse_message,
    require_clean_end,
)
from castore_di.limits import ServerLimits, StreamGate, exceeded, idle_bounded

__all__ = ["BlobServicer", "READ_MESSAGE_SIZE"]

# Measured with benches/grpc_bench.py --read-sizes (Read through our client from our
# servicer, loopback, 2 vCPUs shared with other jobs), MB/s for 64 KiB / 256 KiB / 1 MiB /
# 4 MiB messages: 64 MiB blob 430 / 601 / 690 / 420; 256 MiB blob 462 / 574 / 565 / 352.
READ_MESSAGE_SIZE = CHUNK_MESSAGE_SIZE


class BlobServicer(Servicer):
    """Serves one blob service; register it with :meth:`add_to_server`."""

    SERVICE_NAME = BLOB_SERVICE

    def __init__(
        self,
        service: BlobService,
        read_message_size: int = READ_MESSAGE_SIZE,
        *,
        limits: ServerLimits | None = None,
        gate: StreamGate | None = None,
    ) -> None:
        self.service = service
        self.limits = limits if limits is not None else ServerLimits()
        self.read_message_size = min(read_message_size, self.limits.max_message_size - 16)
        self.gate = gate if gate is not None else StreamGate(self.limits.max_streams)

    async def Stat(self, raw: bytes, context: Context) -> bytes:
        try:
            request = parse_message(pb.StatBlobRequest, raw, "StatBlobRequest")
            digest = parse_digest(request.digest)
            if not request.send_chunks:
                if not await self.service.has(digest):
                    await not_found(context, f"blob {digest} not found")
                return b""
            chunks = await self.service.chunks(digest)
            if chunks is None:
                await not_found(context, f"blob {digest} not found")
            response = pb.StatBlobResponse()
            if chunks:
                for c in chunks:
                    response.chunks.add(digest=c.digest, size=c.size)
            else:
                reader = await self.service.open_read(digest)
                if reader is None:
                    await not_found(context, f"blob {digest} not found")
                async with reader:
                    response.chunks.add(digest=digest, size=reader.size)
            out: bytes = response.SerializeToString()
            return out
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, e, "Stat")

    async def Read(self, raw: bytes, context: Context) -> AsyncIterator[bytes]:
        try:
            slot = self.gate.enter("Read")
        except Exception as e:
            await abort_with(context, e, "Read")
        try:
            request = parse_message(pb.ReadBlobRequest, raw, "ReadBlobRequest")
            digest = parse_digest(request.digest)
            reader = await self.service.open_read(digest)
            if reader is None:
                await not_found(context, f"blob {digest} not found")
            # grpc does not close a generator whose write failed: the watch frees the slot
            # and the reader itself when it cuts a stalled client off
            watch = SendWatch(context, self.limits.idle_timeout, "Read", (slot.leave, reader.close))
            try:
                async with reader:
                    async for block in reader.iter_blocks(self.read_message_size):
                        watch.waiting()
                        yield encode_blob_chunk(block)
                        watch.sent()
            finally:
                watch.close()
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, e, "Read")
        finally:
            slot.leave()

    async def Put(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        try:
            slot = self.gate.enter("Put")
        except Exception as e:
            await abort_with(context, e, "Put")
        try:
            return await self._put(requests, context)
        finally:
            slot.leave()

    async def _put(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        limits = self.limits
        writer = self.service.open_write()
        size = 0
        try:
            async for raw in idle_bounded(requests, limits.idle_timeout, "Put"):
                try:
                    data = decode_blob_chunk(raw)
                except Exception as e:  # protobuf's DecodeError
                    raise ValidationError(f"cannot decode BlobChunk: {e}") from e
                if data:
                    size += len(data)
                    if size > limits.max_blob_size:
                        exceeded(
                            "RESOURCE_EXHAUSTED",
                            f"blob larger than {limits.max_blob_size} bytes "
                            "(the limit is set by castore serve --max-blob-size)",
                        )
                    await writer.write(data)
            await require_clean_end(context, "Put")
            digest = await writer.close()
        except BaseException as e:
            await writer.abort()
            if size >= 1 << 20:
                give_back_memory()
            if isinstance(e, (grpc.aio.AbortError, KeyboardInterrupt, SystemExit)) or not isinstance(e, Exception):
                raise
            await abort_with(context, e, "Put")
        out: bytes = pb.PutBlobResponse(digest=digest).SerializeToString()
        return out

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Stat": grpc.unary_unary_rpc_method_handler(self.Stat),
            "Read": grpc.unary_stream_rpc_method_handler(self.Read),
            "Put": grpc.stream_unary_rpc_method_handler(self.Put),
        }
