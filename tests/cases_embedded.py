"""Conformance cases for the embedded backend (see tests/cases.py).

Each case gets a fresh data directory under pytest's ``tmp_path``. The backdoors reach the
LMDB environment the service shares (LMDB must not be opened twice in one process) and
flip a byte of a stored value behind the API.
"""

from __future__ import annotations

from typing import Any

import pytest

from castore_di._embedded import StoreOptions, acquire, release
from castore_di.blobservice.embedded import _BlobRecords, decode_index
from castore_di.digests import B3Digest
from castore_di.directoryservice.embedded import _DirectoryRecords
from castore_di.maintenance import FsckReport
from tests.cases_base import Case


def fsck(path: str, options: StoreOptions | None = None) -> FsckReport:
    """Both kinds' checks of the store at ``path``, as one report (what ``castore fsck`` prints)."""
    env = acquire(path, options)
    try:
        blobs, dirs = _BlobRecords(env).fsck(), _DirectoryRecords(env).fsck()
    finally:
        release(env)
    return FsckReport(
        chunks=blobs.chunks,
        blobs=blobs.blobs,
        directories=dirs.directories,
        bytes_checked=blobs.bytes_checked + dirs.bytes_checked,
        problems=blobs.problems + dirs.problems,
        notes=blobs.notes + dirs.notes,
    )


def flip_stored(value: bytes) -> bytes:
    """A stored value (tag byte + payload) with its last payload byte changed."""
    if len(value) <= 1:
        return value + b"\x00"
    return value[:-1] + bytes([value[-1] ^ 0x5A])


class EmbeddedBlobBackdoor:
    def __init__(self, service: Any) -> None:
        self.service = service

    async def corrupt(self, digest: B3Digest) -> None:
        """Flip a byte of the blob's chunk (its last chunk when it is chunked)."""
        store = self.service._store()
        with store.env.write() as txn:
            raw = txn.get(digest, db=store.blobs_db)
            target = digest if raw is None else decode_index(bytes(raw), digest)[-1][0]
            value = bytes(txn.get(target, db=store.chunks_db))
            txn.put(target, flip_stored(value), db=store.chunks_db)

    async def drop_chunk(self, digest: B3Digest) -> B3Digest:
        """Delete the first chunk of a chunked blob; return its digest."""
        store = self.service._store()
        with store.env.write() as txn:
            chunk = decode_index(bytes(txn.get(digest, db=store.blobs_db)), digest)[0][0]
            txn.delete(chunk, db=store.chunks_db)
        return chunk


class EmbeddedDirectoryBackdoor:
    def __init__(self, service: Any) -> None:
        self.service = service

    async def corrupt(self, digest: B3Digest) -> None:
        store = self.service._store()
        with store.env.write() as txn:
            value = bytes(txn.get(digest, db=store.dirs_db))
            txn.put(digest, flip_stored(value), db=store.dirs_db)


def _dir(request: pytest.FixtureRequest) -> str:
    tmp = request.getfixturevalue("tmp_path")
    return str(tmp / "castore")


BLOB_CASES: list[Case] = [
    Case(
        "embedded",
        ("embedded",),
        # A small average chunk size so the conformance blobs (3 MiB) have many chunks.
        lambda r: {"default": {"type": "embedded", "path": _dir(r), "avg_chunk_size": 65536}},
        lambda s, r: EmbeddedBlobBackdoor(s),
    ),
    Case(
        "embedded-default-chunking-url",
        ("embedded",),
        lambda r: {"default": f"embedded://{_dir(r)}?durability=full"},
        lambda s, r: EmbeddedBlobBackdoor(s),
    ),
]
DIRECTORY_CASES: list[Case] = [
    Case(
        "embedded",
        ("embedded",),
        lambda r: {"default": {"type": "embedded", "path": _dir(r)}},
        lambda s, r: EmbeddedDirectoryBackdoor(s),
    ),
]
