"""Clients trust no peer: a lying server, an exploding closure, a remote that is down."""

from __future__ import annotations

import logging
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from castore_di.blobservice.base import BlobReader, ChunkMeta, PositionedReader
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.grpc import BUFFER_LIMIT, GRPCBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.grpc import GRPCDirectoryService
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import IntegrityError
from castore_di.expansion import ExportTooLargeError, expansion
from castore_di.exporter import export_directory, fetch_closure
from castore_di.importer import ingest_path
from castore_di.nodes import Directory, DirectoryNode, FileNode
from castore_di.server import CastoreServer
from tests.servers_grpc import GrpcServerProcess

LIE = 1 << 30  # what the lying server would send

class _EndlessReader(PositionedReader):
    """``size`` bytes of zeros, counting what was actually produced."""

    def __init__(self, size: int, counter: list[int]) -> None:
        super().__init__(size)
        self._counter = counter

    async def read(self, n: int = -1) -> bytes:
        want = self._wanted(n)
        self._pos += want
        self._counter[0] += want
        return bytes(want)

class LyingSizes(MemoryBlobService):
    """Stat promises the stored size; Read sends LIE bytes instead."""

    def __init__(self, chunked: bool = False) -> None:
        super().__init__()
        self.produced = [0]
        self.chunked = chunked

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        data = self._blobs.get(digest)
        if data is None:
            return None
        if self.chunked:  # two "chunks": the blob itself twice
            return [ChunkMeta(digest, len(data)), ChunkMeta(digest, len(data))]
        return [ChunkMeta(digest, len(data))]

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if digest not in self._blobs:
            return None
        return _EndlessReader(LIE, self.produced)

async def _serve(blob: MemoryBlobService) -> tuple[CastoreServer, str]:
    server = CastoreServer(blob, MemoryDirectoryService())
    [address] = await server.start(["127.0.0.1:0"])
    return server, "grpc+http://" + address

@pytest.mark.parametrize("size", [5, BUFFER_LIMIT + 5], ids=["buffered", "streamed"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
async def test_read_stops_after_the_promised_size(size: int, chunked: bool) -> None:
    backend = LyingSizes(chunked)
    digest = await backend.put(os.urandom(size))
    server, url = await _serve(backend)
    client = GRPCBlobService(url)
    try:
        with pytest.raises(IntegrityError):
            reader = await client.open_read(digest)
            assert reader is not None
            while await reader.read(1 << 20):
                pass
    finally:
        await client.close()
        await server.stop(0)
    # what the server managed to produce before the client hung up: the promised size,
    # one message, and what HTTP/2 flow control let the transports queue (usually a few
    # MiB; once, on a loaded machine, 200 MiB) -- never the whole lie
    assert backend.produced[0] < LIE * 3 // 8, backend.produced[0]

def _exploding(levels: int, fan: int) -> list[Directory]:
    """A directory whose ``fan`` entries all name the same subdirectory, ``levels`` deep."""
    leaf = Directory({b"f": FileNode(blake3_digest(b"12345678"), 8, False)})
    out = [leaf]
    for _ in range(levels - 1):
        child = out[-1]
        out.append(Directory({b"d%d" % i: DirectoryNode(child.digest, child.size) for i in range(fan)}))
    return out

async def test_export_refuses_an_exploding_closure_before_writing(tmp_path: pathlib.Path) -> None:
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    await blob.put(b"12345678")
    closure = _exploding(14, 4)
    root = await dirs.put_closure(closure)
    got = expansion(await fetch_closure(dirs, root), root)
    assert got.bytes == 8 * 4**13 and sum(len(d.encode()) for d in closure) < 2500
    dest = tmp_path / "out"
    with pytest.raises(ExportTooLargeError) as info:
        await export_directory(blob, dirs, root, dest, max_size=10 << 20)
    assert f"{8 * 4**13} bytes" in str(info.value) and "--max-size 10485760" in str(info.value)
    assert not dest.exists()
    # a small tree passes the same check
    small = _exploding(3, 2)
    await dirs.put_closure(small)
    await export_directory(blob, dirs, small[-1].digest, dest, max_size=10 << 20)
    assert (dest / "d1" / "d0" / "f").read_bytes() == b"12345678"

def test_cli_export_names_both_numbers(grpc_memory_server_fresh: GrpcServerProcess, tmp_path: pathlib.Path) -> None:
    import asyncio

    url = grpc_memory_server_fresh.url

    async def load() -> B3Digest:
        blobs, dirs = GRPCBlobService(url), GRPCDirectoryService(url)
        await blobs.put(b"12345678")
        root = await dirs.put_closure(_exploding(14, 4))
        await blobs.close()
        await dirs.close()
        return root

    root = asyncio.run(load())
    dest = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "castore_di.cli", "--blob-service-addr", url, "--directory-service-addr", url,
         "export", str(root), str(dest), "--max-size", "1M"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"expands to {8 * 4**13} bytes" in proc.stderr and "--max-size 1048576" in proc.stderr
    assert not dest.exists()
    # without --max-size, the free space at DEST is the bound (134 MB fits here or is refused, naming it)
    proc = subprocess.run(
        [sys.executable, "-m", "castore_di.cli", "--blob-service-addr", url, "--directory-service-addr", url,
         "export", str(root), str(dest), "--max-size", "nonsense"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "is not a size" in proc.stderr

def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

async def test_combined_imports_with_remote_down(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(40):
        (tree / f"f{i}").write_bytes(os.urandom(100 + i))
    (tree / "big").write_bytes(os.urandom(3 << 20))
    local = MemoryBlobService()
    remote = GRPCBlobService(f"grpc+http://127.0.0.1:{_dead_port()}", retries=1, retry_backoff=0.01)
    combined = CombinedBlobService(local, remote)
    dirs = MemoryDirectoryService()
    with caplog.at_level(logging.WARNING):
        _name, node = await ingest_path(combined, dirs, tree)
    await remote.close()
    warnings = [r for r in caplog.records if "remote unavailable" in r.getMessage()]
    assert len(warnings) == 1
    directory = await dirs.get(node.digest)  # type: ignore[union-attr]
    assert directory is not None and len(directory) == 41
    for _n, f in directory.files():
        assert await local.has(f.digest)



async def test_recursive_get_is_bounded_by_max_directories() -> None:
    server = CastoreServer(MemoryBlobService(), MemoryDirectoryService())
    [address] = await server.start(["127.0.0.1:0"])
    url = "grpc+http://" + address
    closure = _exploding(4, 2)  # four distinct directories
    writer = GRPCDirectoryService(url)
    root = await writer.put_closure(closure)
    bounded = GRPCDirectoryService(url, max_directories=3)
    try:
        with pytest.raises(IntegrityError, match="more than 3 directories"):
            async for _ in bounded.get_recursive(root):
                pass
        assert len([d async for d in writer.get_recursive(root)]) == 4
    finally:
        await writer.close()
        await bounded.close()
        await server.stop(0)
