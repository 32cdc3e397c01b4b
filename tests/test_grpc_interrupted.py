"""Interrupted uploads store nothing; limits a client cannot talk past (``castore serve``).

Every test talks to a real ``castore serve`` subprocess (memory and embedded backends).
A blob Put or a Directory Put is committed only when the client half-closes the stream;
cancelling at the first message, in the middle, or after the last message (without the
half-close), a deadline, or a dropped connection stores nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from castore_di.blobservice.grpc import GRPCBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.grpc import GRPCDirectoryService
from castore_di.errors import CastoreError
from castore_di._grpc.wire import encode_blob_chunk
from castore_di.nodes import Directory, DirectoryNode, FileNode
from tests.servers_grpc import GrpcServerProcess, grpc_backends

MESSAGE = 256 * 1024
MESSAGES = 8
SETTLE = 0.3  # lets a server that (wrongly) committed the prefix do so before we look

_PUT = "/tvix.castore.v1.BlobService/Put"
_DIR_PUT = "/tvix.castore.v1.DirectoryService/Put"


def _ident(b: bytes) -> bytes:
    return b


class _Feed:
    """A raw client-streaming call fed from a queue: the test decides when it ends."""

    def __init__(self, channel: grpc.aio.Channel, method: str, timeout: float | None = None) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent = 0
        multi = channel.stream_unary(method, request_serializer=_ident, response_deserializer=_ident)
        self.call = multi(self._gen(), timeout=timeout)

    async def _gen(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            self.sent += 1
            yield item

    async def send(self, msg: bytes) -> None:
        await self.queue.put(msg)
        while self.queue.qsize():  # handed to grpc
            await asyncio.sleep(0.005)

    async def outcome(self) -> grpc.StatusCode:
        try:
            await self.call
        except grpc.aio.AioRpcError as e:
            return e.code()
        except asyncio.CancelledError:
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.OK


@pytest.fixture(params=grpc_backends())
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GrpcServerProcess]:
    proc = GrpcServerProcess(tmp_path, request.param).start()
    yield proc
    proc.stop()


def _blob(seed: int) -> tuple[bytes, list[bytes]]:
    data = os.urandom(MESSAGE * MESSAGES) + seed.to_bytes(4, "big")
    parts = [data[i : i + MESSAGE] for i in range(0, len(data), MESSAGE)]
    return data, parts


async def _prefixes_absent(blobs: GRPCBlobService, parts: list[bytes]) -> list[int]:
    """Which prefixes (by message count) of the blob are stored: must be none."""
    await asyncio.sleep(SETTLE)
    stored = []
    for n in range(1, len(parts) + 1):
        if await blobs.has(blake3_digest(b"".join(parts[:n]))):
            stored.append(n)
    return stored


@pytest.mark.parametrize("at", ["first", "middle", "before_end"])
async def test_raw_cancelled_blob_put_stores_nothing(server: GrpcServerProcess, at: str) -> None:
    blobs = GRPCBlobService(server.url)
    async with grpc.aio.insecure_channel(server.address or "") as channel:
        data, parts = _blob(1)
        stop = {"first": 1, "middle": len(parts) // 2, "before_end": len(parts)}[at]
        feed = _Feed(channel, _PUT)
        for part in parts[:stop]:
            await feed.send(encode_blob_chunk(part))
        await asyncio.sleep(0.05)
        feed.call.cancel()
        assert await feed.outcome() == grpc.StatusCode.CANCELLED
        assert await _prefixes_absent(blobs, parts) == []
        # a clean Put of the same bytes on the same server still works
        assert await blobs.put(data) == blake3_digest(data)
    await blobs.close()


async def test_raw_deadline_and_lost_connection_store_nothing(server: GrpcServerProcess) -> None:
    blobs = GRPCBlobService(server.url)
    _, parts = _blob(2)
    async with grpc.aio.insecure_channel(server.address or "") as channel:
        feed = _Feed(channel, _PUT, timeout=0.5)
        for part in parts:
            await feed.send(encode_blob_chunk(part))
        assert await feed.outcome() == grpc.StatusCode.DEADLINE_EXCEEDED
    _, parts2 = _blob(3)
    channel = grpc.aio.insecure_channel(server.address or "")
    feed = _Feed(channel, _PUT)
    for part in parts2:
        await feed.send(encode_blob_chunk(part))
    await asyncio.sleep(0.05)
    await channel.close(grace=None)  # the connection goes away mid-stream
    assert await _prefixes_absent(blobs, parts) == []
    assert await _prefixes_absent(blobs, parts2) == []
    await blobs.close()


@pytest.mark.parametrize("at", ["first", "middle", "before_end"])
async def test_client_abort_stores_nothing(server: GrpcServerProcess, at: str) -> None:
    blobs = GRPCBlobService(server.url)
    _, parts = _blob(4)
    stop = {"first": 1, "middle": len(parts) // 2, "before_end": len(parts)}[at]
    writer = blobs.open_write()
    for part in parts[:stop]:
        await writer.write(part)
    await asyncio.sleep(0.05)
    await writer.abort()
    assert await _prefixes_absent(blobs, parts) == []
    await blobs.close()


def _closure() -> list[Directory]:
    leaf = Directory({b"f": FileNode(blake3_digest(b"x"), 1, False)})
    mid = Directory({b"leaf": DirectoryNode(leaf.digest, leaf.size)})
    top = Directory({b"mid": DirectoryNode(mid.digest, mid.size), b"g": FileNode(blake3_digest(b"y"), 1, True)})
    return [leaf, mid, top]


@pytest.mark.parametrize("at", [1, 2, 3])
async def test_cancelled_directory_put_stores_nothing(server: GrpcServerProcess, at: int) -> None:
    dirs = GRPCDirectoryService(server.url)
    closure = _closure()
    async with grpc.aio.insecure_channel(server.address or "") as channel:
        feed = _Feed(channel, _DIR_PUT)
        for d in closure[:at]:
            await feed.send(d.encode())
        await asyncio.sleep(0.05)
        feed.call.cancel()
        await feed.outcome()
    putter = dirs.put_multiple_start()
    for d in closure[:at]:
        await putter.put(d)
    await asyncio.sleep(0.05)
    await putter.abort()  # type: ignore[attr-defined]
    await asyncio.sleep(SETTLE)
    for d in closure:
        assert await dirs.get(d.digest) is None
    assert await dirs.put_closure(closure) == closure[-1].digest
    await dirs.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_memory_returns_after_cancelled_puts(tmp_path: Path) -> None:
    """10 rounds of 24 aborted 8 MiB Puts: the server's RSS stops growing (bound, not timing)."""
    server = GrpcServerProcess(tmp_path, "memory").start()
    try:
        assert server.proc is not None
        blobs = GRPCBlobService(server.url)
        chunk = os.urandom(1 << 20)
        rss: list[int] = []

        async def one(i: int) -> None:
            writer = blobs.open_write()
            for _ in range(8):
                await writer.write(chunk)
            await writer.write(i.to_bytes(4, "big"))
            await asyncio.sleep(0.05)
            await writer.abort()

        start = _rss(server.proc.pid)
        for _round in range(10):
            await asyncio.gather(*(one(_round * 100 + i) for i in range(24)))
            await asyncio.sleep(SETTLE)
            rss.append(_rss(server.proc.pid))
        await blobs.close()
    finally:
        server.stop()
    # storing the prefixes adds ~200 MiB per round (2 GiB over the ten); what one round
    # holds in flight (24 x 8 MiB, buffers growing by doubling) is the most that may remain
    assert max(rss) - start < 450 << 20, [r >> 20 for r in [start, *rss]]


# -- limits -----------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[GrpcServerProcess]:
    proc = GrpcServerProcess(
        tmp_path,
        "memory",
        extra_args=(
            "--idle-timeout", "1.5", "--max-streams", "3", "--max-blob-size", "3000000",
            "--max-message-size", "1100000", "--max-put-directories", "5",
            "--max-put-directory-bytes", "100000", "--max-depth", "2",
        ),
    ).start()
    yield proc
    proc.stop()


async def test_idle_stream_is_aborted_and_others_are_served(limited: GrpcServerProcess) -> None:
    blobs = GRPCBlobService(limited.url)
    async with grpc.aio.insecure_channel(limited.address or "") as channel:
        feeds = [_Feed(channel, _PUT) for _ in range(3)]
        for i, feed in enumerate(feeds):
            await feed.send(encode_blob_chunk(b"stalled %d" % i))
        # all stream slots are taken: one more stream is refused, naming the option
        extra = _Feed(channel, _PUT)
        await extra.send(encode_blob_chunk(b"one too many"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await extra.call
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams" in (info.value.details() or "")
        # unary calls are still served
        assert not await blobs.has(blake3_digest(b"stalled 0"))
        for feed in feeds:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await feed.call
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--idle-timeout" in (info.value.details() or "")
    for i in range(3):
        assert not await blobs.has(blake3_digest(b"stalled %d" % i))
    # the slots are free again
    assert await blobs.put(b"after") == blake3_digest(b"after")
    await blobs.close()


async def test_blob_and_message_size_limits(limited: GrpcServerProcess) -> None:
    blobs = GRPCBlobService(limited.url)
    big = os.urandom(3_000_001)
    with pytest.raises(CastoreError, match="--max-blob-size"):
        await blobs.put(big)
    assert not await blobs.has(blake3_digest(big))
    async with grpc.aio.insecure_channel(limited.address or "") as channel:
        feed = _Feed(channel, _PUT)
        await feed.send(encode_blob_chunk(os.urandom(1_200_000)))
        await feed.queue.put(None)
        assert await feed.outcome() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await blobs.put(big[:2_000_000]) == blake3_digest(big[:2_000_000])
    await blobs.close()


def _chain(depth: int) -> list[Directory]:
    out = [Directory({b"f": FileNode(blake3_digest(b"z"), 1, False)})]
    for _ in range(depth - 1):
        out.append(Directory({b"d": DirectoryNode(out[-1].digest, out[-1].size)}))
    return out


async def test_directory_put_limits(limited: GrpcServerProcess) -> None:
    dirs = GRPCDirectoryService(limited.url)
    with pytest.raises(CastoreError, match="--max-depth"):
        await dirs.put_closure(_chain(3))
    assert await dirs.put_closure(_chain(2)) == _chain(2)[-1].digest
    many = [Directory({b"f%d" % i: FileNode(blake3_digest(b"z"), 1, False)}) for i in range(6)]
    top = Directory({b"d%d" % i: DirectoryNode(d.digest, d.size) for i, d in enumerate(many)})
    with pytest.raises(CastoreError, match="--max-put-directories"):
        await dirs.put_closure([*many, top])
    wide = Directory({b"f%05d" % i: FileNode(blake3_digest(b"z"), 1, False) for i in range(3000)})
    with pytest.raises(CastoreError, match="--max-put-directory-bytes"):
        await dirs.put_closure([wide])
    assert await dirs.get(wide.digest) is None
    assert await dirs.put_closure(many[:1]) == many[0].digest  # the server still serves
    await dirs.close()


def test_serve_bind_failure_is_one_line(tmp_path: Path) -> None:
    first = GrpcServerProcess(tmp_path / "a", "memory")
    (tmp_path / "a").mkdir()
    first.start()
    try:
        second = GrpcServerProcess(tmp_path, "memory", listen=first.address or "")
        cmd, env = second._command()
        import subprocess

        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    finally:
        first.stop()
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"castore: cannot listen on {first.address}: Address already in use"], done.stderr
    assert "listening" not in done.stdout


async def test_a_client_that_stops_reading_is_cut_off(limited: GrpcServerProcess) -> None:
    """Reads whose client takes no message for the idle timeout end and give their slots back."""
    blobs = GRPCBlobService(limited.url)
    data = os.urandom(2_900_000)
    digest = await blobs.put(data)
    from castore_di.proto.tvix.castore.protos import rpc_blobstore_pb2 as pb

    request = pb.ReadBlobRequest(digest=digest).SerializeToString()
    # small windows so the server's writes stall once the client stops reading
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    async with grpc.aio.insecure_channel(limited.address or "", options=options) as channel:
        read = channel.unary_stream("/tvix.castore.v1.BlobService/Read", request_serializer=_ident,
                                    response_deserializer=_ident)
        calls = [read(request) for _ in range(3)]
        for call in calls:
            await call.read()  # one message, then nothing more is taken
        # all three stream slots are held by stalled Reads
        with pytest.raises(CastoreError, match="--max-streams"):
            await blobs.put(b"while stalled")
        await asyncio.sleep(4)  # longer than the 1.5 s idle timeout
        assert await blobs.put(b"after the timeout") == blake3_digest(b"after the timeout")
        for call in calls:
            call.cancel()
    await blobs.close()
