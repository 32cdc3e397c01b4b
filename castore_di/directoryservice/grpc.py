"""A directory service reached over gRPC (``type: grpc``, URL ``grpc+http://host:port`` …).

Talks ``tvix.castore.v1.DirectoryService``. Construction does no I/O (see
:class:`~castore_di._grpc.channel.LazyChannel`). Get is retried on UNAVAILABLE (a recursive
Get only before its first message); Put is not retried.

* ``get`` checks that the returned directory hashes to the requested digest.
* ``get_recursive`` checks every message against the closure so far (:class:`RootToLeaves`:
  expected, not seen before, the size its parent gave) and that the stream was complete.
  An empty stream or NOT_FOUND means "absent" (an empty result). A closure of more than
  ``max_directories`` directories is refused (:class:`IntegrityError`), so a lying server
  cannot make the client hold an endless stream.
* ``put_multiple_start`` streams the closure in one Put as directories are added,
  validating it locally too (:class:`LeavesToRoot`) so problems raise :class:`ClosureError`
  at the offending ``put``; a server refusal re-raises the server's exception class.
* ``put`` sends one directory in its own Put. Servers (ours and the reference's) check the
  closure of each Put, so this works for leaves only; use a putter for the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import attrs

from castore_di.composition.config import DirectoryServiceConfig
from castore_di.digests import B3_LEN, B3Digest
from castore_di.directoryservice.base import DirectoryPutter, DirectoryService
from castore_di.directoryservice.closure import LeavesToRoot, RootToLeaves
from castore_di.errors import ClosedError, ClosureError, IntegrityError, StorageError, ValidationError
from castore_di._grpc.channel import GrpcClient, GrpcClientConfig, StreamSender, is_not_found, translate_rpc_error
from castore_di._grpc.wire import DIRECTORY_GET as _GET
from castore_di._grpc.wire import DIRECTORY_PUT as _PUT
from castore_di.nodes import Directory

__all__ = ["GRPCDirectoryService", "GRPCDirectoryServiceConfig"]



def _get_request(digest: B3Digest, recursive: bool) -> bytes:
    from castore_di.proto.tvix.castore.protos import rpc_directory_pb2 as pb

    out: bytes = pb.GetDirectoryRequest(digest=digest, recursive=recursive).SerializeToString()
    return out


DEFAULT_MAX_DIRECTORIES = 1_000_000


class GRPCDirectoryService(GrpcClient, DirectoryService):
    """A :class:`DirectoryService` client of a ``tvix.castore.v1.DirectoryService`` server."""

    _health_service = "tvix.castore.v1.DirectoryService"

    def __init__(self, url: str, *, max_directories: int = DEFAULT_MAX_DIRECTORIES, **options: Any) -> None:
        super().__init__(url, **options)
        self.max_directories = max_directories

    def _decode(self, raw: bytes, what: str) -> Directory:
        try:
            return Directory.decode(raw)
        except ValidationError as e:
            raise IntegrityError(f"{what}: server {self.url} sent an invalid directory: {e}") from e

    async def _open_get(self, digest: B3Digest, recursive: bool, timeout: float | None) -> Any:
        return await self._unary_stream(_GET, _get_request(digest, recursive), timeout)

    async def get(self, digest: B3Digest) -> Directory | None:
        async def call() -> bytes | None:
            stream = await self._open_get(digest, False, self._chan.timeout)
            try:
                async for raw in stream:
                    stream.cancel()  # only the first message counts
                    first: bytes = raw
                    return first
            except Exception as e:
                if is_not_found(e):
                    return None
                raise
            return None

        raw = await self._chan.retrying(f"Get {digest}", call)
        if raw is None:
            return None
        directory = self._decode(raw, f"Get {digest}")
        if directory.digest != digest:
            raise IntegrityError(f"requested directory with digest {digest}, but got {directory.digest}")
        return directory

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        import grpc

        what = f"Get {root} (recursive)"

        async def open_and_first() -> tuple[Any, AsyncIterator[bytes], bytes | None]:
            call = await self._open_get(root, True, self._chan.stream_timeout)
            stream = call.__aiter__()
            try:
                first: bytes | None = await stream.__anext__()
            except StopAsyncIteration:
                first = None
            except Exception as e:
                if is_not_found(e):
                    first = None
                else:
                    raise
            return call, stream, first

        call, stream, first = await self._chan.retrying(what, open_and_first)
        if first is None:
            return
        validator = RootToLeaves(root)
        received = 0
        try:
            raw: bytes | None = first
            while raw is not None:
                received += 1
                if received > self.max_directories:
                    raise IntegrityError(
                        f"{what}: server {self.url} sent more than {self.max_directories} directories "
                        "(the limit is the client's max_directories)"
                    )
                directory = self._decode(raw, what)
                try:
                    validator.add(directory)
                except ClosureError as e:
                    raise IntegrityError(f"{what}: {e}") from e
                yield directory
                try:
                    raw = await stream.__anext__()
                except StopAsyncIteration:
                    raw = None
            try:
                validator.finish()
            except ClosureError as e:
                raise IntegrityError(f"{what}: {e} (premature end of stream)") from e
        except grpc.aio.AioRpcError as e:
            raise translate_rpc_error(e, what, self.url) from e
        finally:
            call.cancel()

    async def put(self, directory: Directory) -> B3Digest:
        putter = self.put_multiple_start()
        await putter.put(directory)
        return await putter.close()

    def put_multiple_start(self) -> DirectoryPutter:
        return _GrpcDirectoryPutter(self)


class _GrpcDirectoryPutter(DirectoryPutter):
    """One Put call, fed as directories arrive; validated locally as well."""

    def __init__(self, service: GRPCDirectoryService) -> None:
        self._service = service
        self._validator = LeavesToRoot()
        self._sender: StreamSender | None = None
        self._root: B3Digest | None = None
        self._closed = False

    async def _start(self) -> StreamSender:
        if self._sender is None:
            self._sender = await self._service._stream_sender(_PUT, depth=64)
        return self._sender

    async def put(self, directory: Directory) -> None:
        if self._closed:
            raise ClosedError("directory putter is already closed")
        try:
            if not self._validator.add(directory):
                return  # a duplicate: already sent
            sender = await self._start()
            await sender.send(directory.encode())
        except BaseException:
            self._fail()
            raise

    def _fail(self) -> None:
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()

    async def close(self) -> B3Digest:
        if self._root is not None:
            return self._root
        if self._closed:
            raise ClosedError("directory putter failed earlier")
        self._closed = True
        try:
            root, _ = self._validator.finish()
            raw = await (await self._start()).finish()
        except BaseException:
            if self._sender is not None:
                self._sender.cancel()
            raise
        from castore_di.proto.tvix.castore.protos import rpc_directory_pb2 as pb

        returned = pb.PutDirectoryResponse.FromString(raw).root_digest
        if len(returned) != B3_LEN:
            raise StorageError(f"Put to {self._service.url}: invalid root digest length {len(returned)} in response")
        if returned != root:
            raise IntegrityError(f"Put to {self._service.url}: server returned root {B3Digest(returned)}, sent {root}")
        self._root = root
        return root

    async def abort(self) -> None:
        """Cancel the Put; the server stores nothing of it."""
        if not self._closed:
            self._fail()

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()


@attrs.frozen(kw_only=True)
class GRPCDirectoryServiceConfig(GrpcClientConfig, DirectoryServiceConfig):
    """A remote directory service; ``url`` is required (see :class:`GrpcClientConfig` for the rest)."""

    type_tag: ClassVar[str] = "grpc"

    max_directories: int = attrs.field(default=DEFAULT_MAX_DIRECTORIES, validator=attrs.validators.gt(0))
    """most directories a recursive Get may return before the client gives up on the server"""

    def build(self) -> GRPCDirectoryService:
        return GRPCDirectoryService(self.url, max_directories=self.max_directories, **self.client_kwargs())

    @classmethod
    def from_url(cls, url: str) -> "GRPCDirectoryServiceConfig":
        """``grpc+http://host:port``, ``grpc+https://host[:port]`` or ``grpc+unix:///path``,
        optionally with ``?wait-connect=1``; the other fields keep their defaults.
        """
        return cls(url=url)
