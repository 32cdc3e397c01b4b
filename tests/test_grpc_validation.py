"""Hand-built invalid requests sent with a raw grpcio channel to a ``castore serve`` subprocess.

Each must be refused with INVALID_ARGUMENT and a message naming the problem; nothing of
a refused Put is stored; the server stays healthy.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from castore_di.digests import blake3_digest
from castore_di.nodes import Directory, FileNode
from castore_di.proto.tvix.castore.protos import castore_pb2, rpc_blobstore_pb2, rpc_directory_pb2
from tests.servers_grpc import GrpcServerProcess

DIR_PUT = "/tvix.castore.v1.DirectoryService/Put"
DIR_GET = "/tvix.castore.v1.DirectoryService/Get"
STAT = "/tvix.castore.v1.BlobService/Stat"
READ = "/tvix.castore.v1.BlobService/Read"
BLOB_PUT = "/tvix.castore.v1.BlobService/Put"

D32 = blake3_digest(b"some blob")


def _ident(b: bytes) -> bytes:
    return b


@pytest.fixture
async def channel(grpc_memory_server: GrpcServerProcess) -> AsyncIterator[grpc.aio.Channel]:
    assert grpc_memory_server.address is not None
    async with grpc.aio.insecure_channel(grpc_memory_server.address) as ch:
        yield ch
    # the server must still be healthy after whatever the test sent
    async with grpc.aio.insecure_channel(grpc_memory_server.address) as ch:
        response = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def _leaf() -> Directory:
    """A valid leaf no other test stores, sent before the invalid message."""
    return Directory({os.urandom(8).hex().encode(): FileNode(D32, 9)})


async def _put_raw(channel: grpc.aio.Channel, messages: list[bytes]) -> grpc.aio.AioRpcError:
    put = channel.stream_unary(DIR_PUT, request_serializer=_ident, response_deserializer=_ident)

    async def gen() -> AsyncIterator[bytes]:
        for m in messages:
            yield m

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await put(gen(), timeout=10)
    return info.value


async def _absent(channel: grpc.aio.Channel, directory: Directory) -> None:
    get = channel.unary_stream(DIR_GET, request_serializer=_ident, response_deserializer=_ident)
    call = get(rpc_directory_pb2.GetDirectoryRequest(digest=directory.digest).SerializeToString(), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _fnode(name: bytes, digest: bytes = D32, size: int = 9) -> castore_pb2.FileNode:
    return castore_pb2.FileNode(name=name, digest=digest, size=size)


INVALID_DIRECTORIES: list[tuple[str, castore_pb2.Directory, str]] = [
    ("unsorted", castore_pb2.Directory(files=[_fnode(b"b"), _fnode(b"a")]), "is not sorted"),
    ("duplicate-in-list", castore_pb2.Directory(files=[_fnode(b"a"), _fnode(b"a")]), "is a duplicate name"),
    (
        "duplicate-across-lists",
        castore_pb2.Directory(
            files=[_fnode(b"a")], symlinks=[castore_pb2.SymlinkNode(name=b"a", target=b"x")]
        ),
        "is a duplicate name",
    ),
    ("empty-name", castore_pb2.Directory(files=[_fnode(b"")]), "cannot be empty"),
    ("dot", castore_pb2.Directory(files=[_fnode(b".")]), "cannot be '.'"),
    ("dotdot", castore_pb2.Directory(files=[_fnode(b"..")]), "cannot be '..'"),
    ("slash", castore_pb2.Directory(files=[_fnode(b"a/b")]), "cannot contain slashes"),
    ("null", castore_pb2.Directory(files=[_fnode(b"a\0b")]), "cannot contain null bytes"),
    ("too-long", castore_pb2.Directory(files=[_fnode(b"x" * 256)]), "cannot be over 255 bytes long"),
    ("file-digest-31", castore_pb2.Directory(files=[_fnode(b"a", D32[:31])]), "invalid digest length: 31"),
    (
        "dir-digest-0",
        castore_pb2.Directory(directories=[castore_pb2.DirectoryNode(name=b"d", digest=b"", size=0)]),
        "invalid digest length: 0",
    ),
    (
        "symlink-empty",
        castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name=b"l", target=b"")]),
        "invalid symlink target: cannot be empty",
    ),
    (
        "symlink-null",
        castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name=b"l", target=b"a\0")]),
        "cannot contain null bytes",
    ),
    (
        "symlink-too-long",
        castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name=b"l", target=b"t" * 4096)]),
        "cannot be over 4095 bytes long",
    ),
]


@pytest.mark.parametrize(("msg", "needle"), [(m, n) for _, m, n in INVALID_DIRECTORIES], ids=[i for i, _, _ in INVALID_DIRECTORIES])
async def test_invalid_directory_is_refused(channel: grpc.aio.Channel, msg: castore_pb2.Directory, needle: str) -> None:
    leaf = _leaf()
    err = await _put_raw(channel, [leaf.encode(), msg.SerializeToString()])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or ""), err.details()
    assert "directory #1" in (err.details() or "")
    await _absent(channel, leaf)


async def test_out_of_order_closure(channel: grpc.aio.Channel) -> None:
    leaf = _leaf()
    parent = Directory({b"child": leaf.as_node()})
    err = await _put_raw(channel, [parent.encode(), leaf.encode()])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown directory" in (err.details() or "") and "leaves first" in (err.details() or "")
    await _absent(channel, leaf)
    await _absent(channel, parent)


async def test_unknown_child(channel: grpc.aio.Channel) -> None:
    leaf = _leaf()
    parent = Directory({b"child": _leaf().as_node()})  # a child that is never sent
    err = await _put_raw(channel, [leaf.encode(), parent.encode()])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refers to unknown directory" in (err.details() or "")
    await _absent(channel, leaf)


async def test_wrong_child_size(channel: grpc.aio.Channel) -> None:
    leaf = _leaf()
    parent_msg = castore_pb2.Directory(
        directories=[castore_pb2.DirectoryNode(name=b"child", digest=leaf.digest, size=leaf.size + 5)]
    )
    err = await _put_raw(channel, [leaf.encode(), parent_msg.SerializeToString()])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has wrong size, specified 6, recorded 1" in (err.details() or "")
    await _absent(channel, leaf)


async def test_disconnected_roots(channel: grpc.aio.Channel) -> None:
    a, b = _leaf(), _leaf()
    err = await _put_raw(channel, [a.encode(), b.encode()])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "disconnected roots" in (err.details() or "")
    await _absent(channel, a)
    await _absent(channel, b)


async def test_empty_put(channel: grpc.aio.Channel) -> None:
    err = await _put_raw(channel, [])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no directories" in (err.details() or "")


async def test_garbage_directory_bytes(channel: grpc.aio.Channel) -> None:
    leaf = _leaf()
    err = await _put_raw(channel, [leaf.encode(), b"\xff\xff\xff\xff"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode Directory" in (err.details() or "")
    await _absent(channel, leaf)


async def test_valid_raw_put_is_stored(channel: grpc.aio.Channel) -> None:
    """The control case: the same path accepts a valid closure."""
    leaf = _leaf()
    parent = Directory({b"child": leaf.as_node()})
    put = channel.stream_unary(DIR_PUT, request_serializer=_ident, response_deserializer=_ident)

    async def gen() -> AsyncIterator[bytes]:
        yield leaf.encode()
        yield parent.encode()

    raw = await put(gen(), timeout=10)
    assert rpc_directory_pb2.PutDirectoryResponse.FromString(raw).root_digest == parent.digest


@pytest.mark.parametrize(
    ("request_bytes", "needle"),
    [
        (rpc_directory_pb2.GetDirectoryRequest(recursive=True).SerializeToString(), "invalid by_what"),
        (rpc_directory_pb2.GetDirectoryRequest(digest=b"x" * 31).SerializeToString(), "invalid digest length: 31"),
        (b"\xff\xff\xff", "cannot decode GetDirectoryRequest"),
    ],
    ids=["no-by-what", "digest-31", "garbage"],
)
async def test_bad_get_request(channel: grpc.aio.Channel, request_bytes: bytes, needle: str) -> None:
    get = channel.unary_stream(DIR_GET, request_serializer=_ident, response_deserializer=_ident)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in get(request_bytes, timeout=10):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (info.value.details() or "")


@pytest.mark.parametrize(
    ("method", "request_bytes", "needle"),
    [
        (STAT, rpc_blobstore_pb2.StatBlobRequest(digest=b"x" * 33).SerializeToString(), "invalid digest length: 33"),
        (STAT, rpc_blobstore_pb2.StatBlobRequest().SerializeToString(), "invalid digest length: 0"),
        (STAT, b"\xff\xff", "cannot decode StatBlobRequest"),
        (READ, rpc_blobstore_pb2.ReadBlobRequest(digest=b"x" * 5).SerializeToString(), "invalid digest length: 5"),
        (READ, b"\x0a\x80", "cannot decode ReadBlobRequest"),
    ],
    ids=["stat-33", "stat-empty", "stat-garbage", "read-5", "read-garbage"],
)
async def test_bad_blob_request(channel: grpc.aio.Channel, method: str, request_bytes: bytes, needle: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if method == STAT:
            await channel.unary_unary(method, request_serializer=_ident, response_deserializer=_ident)(
                request_bytes, timeout=10
            )
        else:
            call = channel.unary_stream(method, request_serializer=_ident, response_deserializer=_ident)
            async for _ in call(request_bytes, timeout=10):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (info.value.details() or "")


async def test_garbage_blob_put_stores_nothing(channel: grpc.aio.Channel) -> None:
    data = os.urandom(1000)
    put = channel.stream_unary(BLOB_PUT, request_serializer=_ident, response_deserializer=_ident)

    async def gen() -> AsyncIterator[bytes]:
        yield rpc_blobstore_pb2.BlobChunk(data=data).SerializeToString()
        yield b"\xff\xff\xff"

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await put(gen(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode BlobChunk" in (info.value.details() or "")
    stat = channel.unary_unary(STAT, request_serializer=_ident, response_deserializer=_ident)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stat(rpc_blobstore_pb2.StatBlobRequest(digest=blake3_digest(data)).SerializeToString(), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_not_found(channel: grpc.aio.Channel) -> None:
    missing = blake3_digest(os.urandom(16))
    stat = channel.unary_unary(STAT, request_serializer=_ident, response_deserializer=_ident)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stat(rpc_blobstore_pb2.StatBlobRequest(digest=missing).SerializeToString(), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert str(missing) in (info.value.details() or "")
    # recursive Get of an unknown root: an empty stream with status OK, as the reference
    get = channel.unary_stream(DIR_GET, request_serializer=_ident, response_deserializer=_ident)
    call = get(rpc_directory_pb2.GetDirectoryRequest(digest=missing, recursive=True).SerializeToString(), timeout=10)
    assert [m async for m in call] == []
    assert await call.code() == grpc.StatusCode.OK
