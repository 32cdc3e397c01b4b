"""``castore fsck`` follows references across the blob and directory services.

The check runs over every pair of backends (memory, objectstore on file://, embedded, and
gRPC against a real server); dangling references are planted through the services' own
API (a directory service does not require the blobs it names).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from castore_di.blobservice.base import BlobService
from castore_di.blobservice.embedded import EmbeddedBlobService
from castore_di.blobservice.grpc import GRPCBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.blobservice.objectstore import ObjectStoreBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.embedded import EmbeddedDirectoryService
from castore_di.directoryservice.grpc import GRPCDirectoryService
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.directoryservice.objectstore import ObjectStoreDirectoryService
from castore_di.maintenance import DirectoryListing
from castore_di.nodes import Directory, DirectoryNode, FileNode
from castore_di.refcheck import check_references
from castore_di.server import CastoreServer
from tests.servers_grpc import GrpcServerProcess

KINDS = ["memory", "objectstore", "embedded", "grpc"]


@pytest.fixture
async def grpc_pair() -> AsyncIterator[tuple[GRPCBlobService, GRPCDirectoryService]]:
    server = CastoreServer(MemoryBlobService(), MemoryDirectoryService())
    [address] = await server.start(["127.0.0.1:0"])
    url = "grpc+http://" + address
    blobs, dirs = GRPCBlobService(url), GRPCDirectoryService(url)
    yield blobs, dirs
    await blobs.close()
    await dirs.close()
    await server.stop(0)


def _blob_service(kind: str, tmp: pathlib.Path, grpc_pair: Any) -> BlobService:
    if kind == "memory":
        return MemoryBlobService()
    if kind == "objectstore":
        return ObjectStoreBlobService(f"file://{tmp}/objects", avg_chunk_size=4096)
    if kind == "embedded":
        return EmbeddedBlobService(str(tmp / "store"))
    blobs: BlobService = grpc_pair[0]
    return blobs


def _directory_service(kind: str, tmp: pathlib.Path, grpc_pair: Any) -> DirectoryService:
    if kind == "memory":
        return MemoryDirectoryService()
    if kind == "objectstore":
        return ObjectStoreDirectoryService(f"file://{tmp}/objects")
    if kind == "embedded":
        return EmbeddedDirectoryService(str(tmp / "store"))
    dirs: DirectoryService = grpc_pair[1]
    return dirs


@pytest.mark.parametrize("dir_kind", KINDS)
@pytest.mark.parametrize("blob_kind", KINDS)
async def test_dangling_references_on_every_pair(
    blob_kind: str, dir_kind: str, tmp_path: pathlib.Path, grpc_pair: Any
) -> None:
    blobs = _blob_service(blob_kind, tmp_path, grpc_pair)
    dirs = _directory_service(dir_kind, tmp_path, grpc_pair)
    present = await blobs.put(b"hello")
    big = await blobs.put(os.urandom(50_000))
    missing = blake3_digest(b"never stored")
    leaf = Directory({
        b"a": FileNode(present, 5),
        b"big": FileNode(big, 50_000),
        b"gone": FileNode(missing, 12),
        b"short": FileNode(present, 6),
    })
    top = Directory({b"sub": DirectoryNode(leaf.digest, leaf.size), b"again": FileNode(missing, 12)})
    healthy = Directory({b"ok": FileNode(present, 5)})
    await dirs.put_closure([leaf, top])
    await dirs.put_closure([healthy])
    roots = None if isinstance(dirs, DirectoryListing) else [top.digest, healthy.digest]
    report = await check_references(blobs, dirs, roots)
    assert sorted(report.problems) == sorted([
        f'dir {leaf.digest} entry "gone": blob {missing} missing',
        f'dir {leaf.digest} entry "short": blob {present} has 5 bytes, the entry says 6',
        f'dir {top.digest} entry "again": blob {missing} missing',
    ]), report.problems
    assert report.directories == 3 and report.blobs == 3
    await blobs.close()
    await dirs.close()


async def test_missing_child_directory_is_named() -> None:
    dirs = MemoryDirectoryService()
    ghost = Directory({b"x": FileNode(blake3_digest(b"x"), 1)})
    top = Directory({b"child": DirectoryNode(ghost.digest, ghost.size)})
    await dirs.put(top)  # a single put does not require the child (as the reference)
    report = await check_references(None, dirs)
    assert f'dir {top.digest} entry "child": directory {ghost.digest} missing' in report.problems


def _castore(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CASTORE_CONFIG"}
    return subprocess.run([sys.executable, "-m", "castore_di.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


async def test_cli_fsck_over_grpc(grpc_memory_server_fresh: GrpcServerProcess) -> None:
    url = grpc_memory_server_fresh.url
    blobs, dirs = GRPCBlobService(url), GRPCDirectoryService(url)
    present = await blobs.put(b"hello")
    missing = blake3_digest(b"never stored")
    root = await dirs.put_closure([Directory({b"a": FileNode(present, 5), b"x": FileNode(missing, 3)})])
    await blobs.close()
    await dirs.close()
    addrs = ["--blob-service-addr", url, "--directory-service-addr", url]
    proc = _castore(*addrs, "fsck", "--root", str(root))
    assert proc.returncode == 1, proc.stderr
    assert f'  dir {root} entry "x": blob {missing} missing' in proc.stdout.splitlines(), proc.stdout
    # a grpc directory service cannot list: without --root there is nothing to check
    proc = _castore(*addrs, "fsck")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "nothing checked for blob service" in proc.stderr and "give --root" in proc.stdout
    proc = _castore(*addrs, "fsck", "--no-refs", "--root", str(root))
    assert proc.returncode == 3 and "nothing checked for" in proc.stderr


def test_cli_fsck_memory_is_checked(tmp_path: pathlib.Path) -> None:
    """Memory services are empty in a new process, but checkable: exit 0, not 3."""
    proc = _castore("--blob-service-addr", "memory://", "--directory-service-addr", "memory://", "fsck")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "references: 0 directories, 0 blobs checked: ok" in proc.stdout


