"""The grpc clients against in-process servers over small real services that misbehave on purpose.

These cover what a well-behaved server never does: wrong bytes, chunked blobs, lying
directory streams; plus lazy connection and retries.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest

from castore_di.blobservice.base import BlobReader, BytesReader, ChunkMeta
from castore_di.blobservice.grpc import BUFFER_LIMIT, GRPCBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.grpc import GRPCDirectoryService
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import ClosureError, IntegrityError, StorageError
from castore_di.nodes import Directory
from castore_di.server import CastoreServer
from castore_di.testing.fixtures import CLOSURE_D, DIRECTORY_A, DIRECTORY_B, DIRECTORY_D, DIRECTORY_WITH_KEEP
from tests.cases_base import flip_byte

CHUNK = 1 << 20


class ChunkedMemoryBlobService(MemoryBlobService):
    """Stores blobs and their 1 MiB chunks; lists chunks; records what was opened."""

    def __init__(self) -> None:
        super().__init__()
        self.chunk_lists: dict[B3Digest, list[ChunkMeta]] = {}
        self.opened: list[B3Digest] = []

    async def add(self, data: bytes) -> B3Digest:
        digest = await self.put(data)
        metas = []
        for i in range(0, len(data), CHUNK):
            piece = data[i : i + CHUNK]
            metas.append(ChunkMeta(await self.put(piece), len(piece)))
        self.chunk_lists[digest] = metas
        return digest

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if digest in self.chunk_lists:
            return self.chunk_lists[digest]
        return await super().chunks(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        self.opened.append(digest)
        return await super().open_read(digest)


class LyingBlobService(MemoryBlobService):
    """Serves flipped bytes for every blob (the memory service's own check bypassed)."""

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        return None if data is None else BytesReader(flip_byte(data))


class LyingDirectoryService(MemoryDirectoryService):
    """``get`` answers with another directory; ``get_recursive`` with a scripted stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stream: list[Directory] = []

    async def get(self, digest: B3Digest) -> Directory | None:
        return DIRECTORY_A if digest == DIRECTORY_B.digest else await super().get(digest)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        for d in self.stream:
            yield d


async def _serve(blob: object | None, directory: object | None) -> tuple[CastoreServer, str]:
    server = CastoreServer(blob, directory)  # type: ignore[arg-type]
    (address,) = await server.start(["127.0.0.1:0"])
    return server, "grpc+http://" + address


async def test_chunked_read_fetches_only_needed_chunks() -> None:
    backend = ChunkedMemoryBlobService()
    data = os.urandom(5 * CHUNK + 123)
    digest = await backend.add(data)
    server, url = await _serve(backend, None)
    client = GRPCBlobService(url)
    try:
        chunks = await client.chunks(digest)
        assert chunks == backend.chunk_lists[digest]
        reader = await client.open_read(digest)
        assert reader is not None and reader.size == len(data)
        backend.opened.clear()
        await reader.seek(3 * CHUNK + 10)
        assert await reader.read(100) == data[3 * CHUNK + 10 : 3 * CHUNK + 110]
        assert backend.opened == [chunks[3].digest]  # no earlier chunk was fetched
        await reader.seek(0)
        assert await reader.read() == data  # start to end: the blob digest is checked too
        await reader.close()
    finally:
        await client.close()
        await server.stop(0)


async def test_corrupt_chunk_is_detected() -> None:
    backend = ChunkedMemoryBlobService()
    data = os.urandom(3 * CHUNK)
    digest = await backend.add(data)
    second = backend.chunk_lists[digest][1].digest
    backend._blobs[second] = flip_byte(backend._blobs[second])
    server, url = await _serve(LyingChunks(backend), None)
    client = GRPCBlobService(url)
    try:
        reader = await client.open_read(digest)
        assert reader is not None
        assert await reader.read(CHUNK) == data[:CHUNK]
        with pytest.raises(IntegrityError, match="chunk #1"):
            await reader.read(CHUNK)
    finally:
        await client.close()
        await server.stop(0)


class LyingChunks(ChunkedMemoryBlobService):
    """Wraps a chunked service but serves stored bytes without the memory service's check."""

    def __init__(self, inner: ChunkedMemoryBlobService) -> None:
        super().__init__()
        self._blobs = inner._blobs
        self.chunk_lists = inner.chunk_lists

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        return None if data is None else BytesReader(data)


@pytest.mark.parametrize("size", [1000, BUFFER_LIMIT + 5 * CHUNK], ids=["buffered", "streamed"])
async def test_wrong_bytes_raise_integrity_error(size: int) -> None:
    backend = LyingBlobService()
    data = os.urandom(size)
    digest = await backend.put(data)
    server, url = await _serve(backend, None)
    client = GRPCBlobService(url)
    try:
        with pytest.raises(IntegrityError, match="do not match"):
            reader = await client.open_read(digest)
            assert reader is not None
            while await reader.read(CHUNK):
                pass
    finally:
        await client.close()
        await server.stop(0)


class NoChunkListBlobService(MemoryBlobService):
    """A server backend whose Stat(send_chunks) gives no chunk list (as other servers may)."""

    def __init__(self, lie: bool = False) -> None:
        super().__init__()
        self.lie = lie

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        if data is None:
            return None
        return BytesReader(flip_byte(data) if self.lie else data)


async def test_blob_without_chunk_list_is_spooled_and_verified() -> None:
    # Our servicer always describes unchunked blobs as one chunk; emulate a server that does
    # not by serving only Read/Put through a servicer subclass.
    from castore_di.server.blob import BlobServicer

    class NoChunks(BlobServicer):
        async def Stat(self, raw: bytes, context: object) -> bytes:  # type: ignore[override]
            await super().Stat(raw, context)  # type: ignore[arg-type]
            return b""  # present, no chunk list, no size

    import grpc.aio

    for lie in (False, True):
        backend = NoChunkListBlobService(lie=lie)
        data = os.urandom(BUFFER_LIMIT + 3 * CHUNK)
        digest = await backend.put(data)
        server = grpc.aio.server()
        NoChunks(backend).add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = GRPCBlobService(f"grpc+http://127.0.0.1:{port}")
        try:
            if lie:
                with pytest.raises(IntegrityError):
                    await client.open_read(digest)
            else:
                reader = await client.open_read(digest)
                assert reader is not None and reader.size == len(data)
                await reader.seek(BUFFER_LIMIT + 7)
                assert await reader.read(5) == data[BUFFER_LIMIT + 7 : BUFFER_LIMIT + 12]
                await reader.close()
        finally:
            await client.close()
            await server.stop(0)


async def test_streaming_reader_seeks() -> None:
    backend = MemoryBlobService()
    data = os.urandom(BUFFER_LIMIT + 7 * CHUNK + 11)
    digest = await backend.put(data)
    server, url = await _serve(backend, None)
    client = GRPCBlobService(url)
    try:
        reader = await client.open_read(digest)
        assert reader is not None
        await reader.seek(len(data) - 100)
        assert await reader.read() == data[-100:]
        await reader.seek(5)  # backwards: a new Read, skipping to the target
        assert await reader.read(10) == data[5:15]
        await reader.seek(CHUNK * 3 + 1)
        assert await reader.read(CHUNK) == data[CHUNK * 3 + 1 : CHUNK * 4 + 1]
        await reader.close()
    finally:
        await client.close()
        await server.stop(0)


async def test_directory_client_verifies() -> None:
    backend = LyingDirectoryService()
    await backend.put_closure(CLOSURE_D)
    server, url = await _serve(None, backend)
    client = GRPCDirectoryService(url)
    try:
        with pytest.raises(IntegrityError, match="requested directory with digest"):
            await client.get(DIRECTORY_B.digest)
        backend.stream = [DIRECTORY_D, DIRECTORY_WITH_KEEP]  # not referenced by D
        with pytest.raises(IntegrityError, match="unexpected directory"):
            _ = [d async for d in client.get_recursive(DIRECTORY_D.digest)]
        backend.stream = [DIRECTORY_D, DIRECTORY_A]  # B and C never come
        with pytest.raises(IntegrityError, match="premature end of stream"):
            _ = [d async for d in client.get_recursive(DIRECTORY_D.digest)]
        backend.stream = []
        assert [d async for d in client.get_recursive(DIRECTORY_D.digest)] == []
    finally:
        await client.close()
        await server.stop(0)


async def test_put_of_directory_with_children_needs_a_putter() -> None:
    server, url = await _serve(None, MemoryDirectoryService())
    client = GRPCDirectoryService(url)
    try:
        with pytest.raises(ClosureError, match="unknown directory"):
            await client.put(DIRECTORY_B)
        assert await client.put(DIRECTORY_WITH_KEEP) == DIRECTORY_WITH_KEEP.digest
    finally:
        await client.close()
        await server.stop(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_lazy_connect_and_retry_until_server_appears() -> None:
    port = _free_port()
    client = GRPCBlobService(f"grpc+http://127.0.0.1:{port}", retries=8, retry_backoff=0.1, retry_backoff_max=0.5)
    backend = MemoryBlobService()
    digest = await backend.put(b"late")

    async def start_late() -> CastoreServer:
        await asyncio.sleep(0.4)
        server = CastoreServer(backend, None)
        await server.start([f"127.0.0.1:{port}"])
        return server

    starter = asyncio.create_task(start_late())
    try:
        assert await client.has(digest)  # retried on UNAVAILABLE until the server is there
    finally:
        server = await starter
        await client.close()
        await server.stop(0)


async def test_unreachable_server_is_a_storage_error() -> None:
    client = GRPCBlobService(f"grpc+http://127.0.0.1:{_free_port()}", retries=1, retry_backoff=0.01)
    with pytest.raises(StorageError, match="unavailable"):
        await client.has(blake3_digest(b"x"))
    with pytest.raises(StorageError, match="unavailable"):
        await client.put(b"x")
    await client.close()
    eager = GRPCBlobService(f"grpc+http://127.0.0.1:{_free_port()}?wait-connect=1", connect_timeout=0.5)
    with pytest.raises(StorageError, match="unreachable"):
        await eager.has(blake3_digest(b"x"))
