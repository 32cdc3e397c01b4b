"""Conformance case type and helpers; the cases themselves: tests/cases.py.

Conformance cases: one per backend type, each built through the config path.

A case gives the instances of its kind (``default`` is the one under test) and a backdoor
factory that reaches storage behind the API. Cases that need a server ask for its fixture
through ``request.getfixturevalue``. Adding a backend = adding one case here.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest

from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryPutter, DirectoryService
from castore_di.nodes import Directory


@attrs.frozen
class Case:
    id: str
    covers: tuple[str, ...]  # type tags this case exercises
    instances: Callable[[pytest.FixtureRequest], dict[str, Any]]
    backdoor: Callable[[Any, pytest.FixtureRequest], Any] | None = None
    # For read-only types: the instance that takes the suite's writes (reads still go
    # through ``default``); see ReadsThrough.
    writer: str | None = None


def flip_byte(data: bytes, rng: random.Random | None = None) -> bytes:
    """``data`` with one byte changed (the last byte of non-empty data)."""
    if not data:
        return b"\x00"
    pos = len(data) - 1 if rng is None else rng.randrange(len(data))
    return data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]


class MemoryBlobBackdoor:
    def __init__(self, service: Any) -> None:
        self.service = service
        self.detected_by = service  # served without re-hashing; its fsck finds damage

    async def corrupt(self, digest: B3Digest) -> None:
        self.service._blobs[digest] = flip_byte(self.service._blobs[digest])


class MemoryDirectoryBackdoor:
    def __init__(self, service: Any) -> None:
        self.service = service

    async def corrupt(self, digest: B3Digest) -> None:
        self.service._dirs[digest] = flip_byte(self.service._dirs[digest])




class ReadsThroughBlobs(BlobService):
    """Reads through ``reads`` (the service under test), writes to ``writes`` (its backend)."""

    def __init__(self, reads: BlobService, writes: BlobService) -> None:
        self.reads, self.writes = reads, writes

    async def has(self, digest: B3Digest) -> bool:
        return await self.reads.has(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return await self.reads.open_read(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await self.reads.chunks(digest)

    def open_write(self) -> BlobWriter:
        return self.writes.open_write()


class ReadsThroughDirectories(DirectoryService):
    """Reads through ``reads`` (the service under test), writes to ``writes`` (its backend)."""

    def __init__(self, reads: DirectoryService, writes: DirectoryService) -> None:
        self.reads, self.writes = reads, writes

    async def get(self, digest: B3Digest) -> Directory | None:
        return await self.reads.get(digest)

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return self.reads.get_recursive(root)

    async def put(self, directory: Directory) -> B3Digest:
        return await self.writes.put(directory)

    def put_multiple_start(self) -> DirectoryPutter:
        return self.writes.put_multiple_start()
