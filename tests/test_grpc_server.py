"""``castore serve`` as a process: signals, unix sockets, health, reflection, crashes, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from castore_di.blobservice.grpc import GRPCBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.grpc import GRPCDirectoryService
from castore_di.errors import CastoreError, StorageError
from castore_di.testing.fixtures import CLOSURE_D, DIRECTORY_D
from tests.servers_grpc import GrpcServerProcess


@pytest.fixture
def server(tmp_path: Path) -> GrpcServerProcess:
    proc = GrpcServerProcess(tmp_path, "memory").start()
    yield proc  # type: ignore[misc]
    proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(server: GrpcServerProcess, sig: int) -> None:
    assert server.stop(sig) == 0
    assert any(line.startswith("castore serve: started") for line in server.stderr_lines), server.stderr_lines
    stopped = [line for line in server.stderr_lines if line.startswith("castore serve: stopped")]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0]


async def test_health_and_reflection(server: GrpcServerProcess) -> None:
    assert server.address is not None
    async with grpc.aio.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "tvix.castore.v1.BlobService", "tvix.castore.v1.DirectoryService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def requests():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names: set[str] = set()
        async for reply in stub.ServerReflectionInfo(requests(), timeout=10):
            names.update(s.name for s in reply.list_services_response.service)
        assert {"tvix.castore.v1.BlobService", "tvix.castore.v1.DirectoryService", "grpc.health.v1.Health"} <= names


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "castore.sock"
    proc = GrpcServerProcess(tmp_path, "memory", listen=f"unix://{sock}").start()
    try:
        assert proc.address == f"unix://{sock}"
        blobs = GRPCBlobService(f"grpc+unix://{sock}")
        dirs = GRPCDirectoryService(f"grpc+unix://{sock}?wait-connect=1")
        digest = await blobs.put(b"over a unix socket")
        assert await blobs.read_bytes(digest) == b"over a unix socket"
        assert await dirs.put_closure(CLOSURE_D) == DIRECTORY_D.digest
        await blobs.close()
        await dirs.close()
    finally:
        assert proc.stop() == 0


def test_bad_listen_address_is_a_usage_error(tmp_path: Path) -> None:
    proc = GrpcServerProcess(tmp_path, "memory", listen="nonsense")
    with pytest.raises(RuntimeError, match="did not start"):
        proc.start(timeout=20)
    assert proc.proc is not None and proc.proc.wait(10) == 2
    assert any("invalid listen address" in line for line in proc.stderr_lines)


async def test_kill_mid_read_then_restart(server: GrpcServerProcess) -> None:
    client = GRPCBlobService(server.url, connect_timeout=2)  # default retries outlast reconnect backoff
    data = os.urandom(96 * 1024 * 1024)
    digest = await client.put(data)
    reader = await client.open_read(digest)
    assert reader is not None
    assert await reader.read(1 << 20) == data[: 1 << 20]
    server.kill()
    with pytest.raises(StorageError, match="Read"):
        while await reader.read(1 << 20):
            pass
    await reader.close()
    with pytest.raises(StorageError, match="unavailable"):
        await client.has(digest)
    server.start()  # the same address
    assert not await client.has(digest)  # a fresh memory store; the same client object works
    assert await client.put(b"after restart") == blake3_digest(b"after restart")
    assert await client.read_bytes(blake3_digest(b"after restart")) == b"after restart"
    await client.close()


async def test_kill_mid_put_then_restart(server: GrpcServerProcess) -> None:
    blobs = GRPCBlobService(server.url, connect_timeout=3)
    dirs = GRPCDirectoryService(server.url, connect_timeout=3)
    writer = blobs.open_write()
    chunk = os.urandom(4 << 20)
    await writer.write(chunk)
    server.kill()
    with pytest.raises(CastoreError):
        for _ in range(64):  # flow control makes a write fail once the peer is gone
            await writer.write(chunk)
        await writer.close()
    await writer.abort()
    server.start()
    assert await dirs.put_closure(CLOSURE_D) == DIRECTORY_D.digest
    assert await dirs.get(DIRECTORY_D.digest) == DIRECTORY_D
    assert await blobs.put(chunk) == blake3_digest(chunk)
    await blobs.close()
    await dirs.close()


async def test_grace_lets_inflight_read_finish(server: GrpcServerProcess) -> None:
    client = GRPCBlobService(server.url)
    data = os.urandom(32 * 1024 * 1024)
    digest = await client.put(data)
    reader = await client.open_read(digest)
    assert reader is not None
    first = await reader.read(1 << 20)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    rest = await reader.read()
    assert first + rest == data
    await reader.close()
    await client.close()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, server.proc.wait, 15) == 0
