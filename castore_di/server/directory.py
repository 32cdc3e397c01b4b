"""The ``tvix.castore.v1.DirectoryService`` servicer over any :class:`DirectoryService`.

* Get, non-recursive: one Directory, or NOT_FOUND for an unknown digest.
* Get, recursive: the closure root first (the service's breadth-first order). An unknown
  root is an **empty stream with status OK**, as the reference server does; the reference
  client and ours both treat an empty stream (and NOT_FOUND) as "absent".
* Put: every message is decoded and validated (:meth:`Directory.from_proto`, the reference's
  rule order) and checked against the closure so far (:class:`LeavesToRoot`) as it arrives;
  the first problem aborts the call with INVALID_ARGUMENT naming the message's position and
  the rule. Only a complete, valid closure is handed to ``put_multiple_start``, and only
  once the client half-closed the stream: nothing of an invalid, cancelled, idle or
  disconnected Put is stored. The closure is held in memory until then, bounded by
  :class:`ServerLimits` (directories, bytes, depth). Directories are sent as their
  canonical bytes (cached by :class:`Directory`), without a second protobuf round trip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio

from castore_di._grpc.wire import DIRECTORY_SERVICE
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import LeavesToRoot
from castore_di.errors import ValidationError
from castore_di.nodes import Directory
from castore_di.proto.tvix.castore.protos import castore_pb2
from castore_di.proto.tvix.castore.protos import rpc_directory_pb2 as pb
from castore_di.server.common import (
    Context,
    SendWatch,
    Servicer,
    abort_with,
    not_found,
    parse_digest,
    parse_message,
    require_clean_end,
)
from castore_di.limits import ServerLimits, StreamGate, exceeded, idle_bounded

__all__ = ["DirectoryServicer"]


class DirectoryServicer(Servicer):
    """Serves one directory service; register it with :meth:`add_to_server`."""

    SERVICE_NAME = DIRECTORY_SERVICE

    def __init__(
        self, service: DirectoryService, *, limits: ServerLimits | None = None, gate: StreamGate | None = None
    ) -> None:
        self.service = service
        self.limits = limits if limits is not None else ServerLimits()
        self.gate = gate if gate is not None else StreamGate(self.limits.max_streams)

    async def Get(self, raw: bytes, context: Context) -> AsyncIterator[bytes]:
        try:
            request = parse_message(pb.GetDirectoryRequest, raw, "GetDirectoryRequest")
            if request.WhichOneof("by_what") is None:
                raise ValidationError("invalid by_what")
            digest = parse_digest(request.digest)
            if not request.recursive:
                directory = await self.service.get(digest)
                if directory is None:
                    await not_found(context, f"directory {digest} not found")
                yield directory.encode()
                return
            slot = self.gate.enter("Get")
            watch = SendWatch(context, self.limits.idle_timeout, "Get", (slot.leave,))
            try:
                async for directory in self.service.get_recursive(digest):
                    watch.waiting()
                    yield directory.encode()
                    watch.sent()
            finally:
                watch.close()
                slot.leave()
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, e, "Get")

    async def Put(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        try:
            slot = self.gate.enter("Put")
            try:
                root, directories = await self._receive(requests, context)
            finally:
                slot.leave()
            putter = self.service.put_multiple_start()
            for directory in directories:
                await putter.put(directory)
            stored = await putter.close()
            if stored != root:
                raise ValidationError(f"closure root is {root}, but the service stored {stored}")
            out: bytes = pb.PutDirectoryResponse(root_digest=root).SerializeToString()
            return out
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, e, "Put")

    async def _receive(self, requests: AsyncIterator[bytes], context: Context) -> tuple[B3Digest, list[Directory]]:
        """The validated closure of a Put, once the client finished its stream."""
        limits = self.limits
        validator = LeavesToRoot()
        depth: dict[B3Digest, int] = {}
        index = 0
        total = 0
        async for raw in idle_bounded(requests, limits.idle_timeout, "Put"):
            total += len(raw)
            if index >= limits.max_put_directories:
                exceeded(
                    "RESOURCE_EXHAUSTED",
                    f"more than {limits.max_put_directories} directories in one Put "
                    "(the limit is set by castore serve --max-put-directories)",
                )
            if total > limits.max_put_directory_bytes:
                exceeded(
                    "RESOURCE_EXHAUSTED",
                    f"more than {limits.max_put_directory_bytes} bytes of directories in one Put "
                    "(the limit is set by castore serve --max-put-directory-bytes)",
                )
            try:
                msg = castore_pb2.Directory.FromString(raw)
            except Exception as e:  # protobuf's DecodeError
                raise ValidationError(f"directory #{index}: cannot decode Directory message: {e}") from e
            try:
                directory = Directory.from_proto(msg)
                validator.add(directory)
            except ValidationError as e:
                e.args = (f"directory #{index}: {e}",)
                raise
            level = 1 + max((depth.get(n.digest, 0) for _, n in directory.directories()), default=0)
            if level > limits.max_depth:
                exceeded(
                    "RESOURCE_EXHAUSTED",
                    f"directory #{index}: closure deeper than {limits.max_depth} levels "
                    "(the limit is set by castore serve --max-depth)",
                )
            depth[directory.digest] = level
            index += 1
        await require_clean_end(context, "Put")
        root, directories = validator.finish()
        return root, directories

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Get": grpc.unary_stream_rpc_method_handler(self.Get),
            "Put": grpc.stream_unary_rpc_method_handler(self.Put),
        }
