"""The exporter's worker threads: on the embedded store (read by the threads themselves) and
on a service read through the event loop; damage found in the middle of a parallel export,
failures raised in a worker, the umask, cancellation."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import threading
from collections.abc import AsyncIterator, Sequence

import pytest

from castore_di._embedded import codec
from castore_di.blobservice.embedded import EmbeddedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.embedded import EmbeddedDirectoryService
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import IntegrityError, StorageError, describe
from castore_di.exporter import export_directory
from castore_di.importer import ingest_path
from castore_di.nodes import DirectoryNode
from tests.treecmp import assert_same_tree

AVG = 4096  # blobs over 2 KiB are chunked: the chunked path is taken by small files too


def _make_tree(root: pathlib.Path) -> dict[str, bytes]:
    """16 directories of 16 files each (whole, chunked, one over 1 MiB); path -> contents."""
    contents: dict[str, bytes] = {}
    for d in range(16):
        sub = root / f"dir{d:02}" / "inner"
        sub.mkdir(parents=True)
        for i in range(16):
            size = (100, 1500, 9000, 40_000)[i % 4] + d * 7 + i
            data = os.urandom(size // 2) + bytes(size - size // 2)  # half random, half compressible
            path = sub / f"f{i:02}.bin"
            path.write_bytes(data)
            if i == 3:
                path.chmod(0o755)
            contents[str(path.relative_to(root))] = data
    big = os.urandom(1 << 19) * 3  # 1.5 MiB: a job of its own
    (root / "dir00" / "big.bin").write_bytes(big)
    contents["dir00/big.bin"] = big
    return contents


@pytest.fixture
async def embedded(tmp_path: pathlib.Path) -> AsyncIterator[tuple[EmbeddedBlobService, EmbeddedDirectoryService]]:
    store = str(tmp_path / "store")
    blob, dirs = EmbeddedBlobService(store, avg_chunk_size=AVG), EmbeddedDirectoryService(store)
    yield blob, dirs
    await blob.close()
    await dirs.close()


async def _import(tmp_path: pathlib.Path, blob: EmbeddedBlobService, dirs: EmbeddedDirectoryService
                  ) -> tuple[pathlib.Path, dict[str, bytes], B3Digest]:
    src = tmp_path / "src"
    contents = _make_tree(src)
    _name, node = await ingest_path(blob, dirs, src)
    assert type(node) is DirectoryNode
    return src, contents, node.digest


def _tamper(blob: EmbeddedBlobService, key: B3Digest, data: bytes) -> None:
    """Store ``data`` under ``key`` in the chunks database, behind the service's back."""
    store = blob._store()
    with store.env.write() as txn:
        txn.put(key, codec().encode(data, "auto"), db=store.chunks_db)


def _no_export_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("castore-export")]


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def test_embedded_round_trip_and_merge(
    tmp_path: pathlib.Path, embedded: tuple[EmbeddedBlobService, EmbeddedDirectoryService]
) -> None:
    blob, dirs = embedded
    src, contents, root = await _import(tmp_path, blob, dirs)
    assert await blob.blocking_reads() is not None
    out = tmp_path / "out"
    stats = await export_directory(blob, dirs, root, out)
    assert (stats.files, stats.bytes) == (len(contents), sum(map(len, contents.values())))
    assert stats.directories == 33
    assert assert_same_tree(str(src), str(out)) == len(contents)
    assert os.stat(out / "dir00" / "inner" / "f03.bin").st_mode & 0o100
    # --force: every file replaced through a temporary name, none left behind
    stats = await export_directory(blob, dirs, root, out, merge=True, concurrency=2)
    assert stats.files == len(contents)
    assert assert_same_tree(str(src), str(out)) == len(contents)
    assert not list(out.rglob(".castore-tmp-*"))
    assert _no_export_threads()


@pytest.mark.parametrize("which", ["whole", "chunk", "big"])
async def test_damage_in_the_middle_fails_and_leaves_no_damaged_file(
    tmp_path: pathlib.Path, embedded: tuple[EmbeddedBlobService, EmbeddedDirectoryService], which: str
) -> None:
    blob, dirs = embedded
    _src, contents, root = await _import(tmp_path, blob, dirs)
    path = {"whole": "dir15/inner/f01.bin", "chunk": "dir15/inner/f02.bin", "big": "dir00/big.bin"}[which]
    data = contents[path]
    if which == "whole":  # a blob stored as one value: same length, other bytes
        key, bad = blake3_digest(data), b"\xff" * len(data)
    else:  # one chunk of a chunked blob
        chunks = await blob.chunks(blake3_digest(data))
        assert chunks
        meta = chunks[len(chunks) // 2]
        key, bad = meta.digest, b"\xff" * meta.size
    _tamper(blob, key, bad)
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match=path.rsplit("/", 1)[-1]):
        await export_directory(blob, dirs, root, out)
    written = _files(out)
    assert path not in written
    for rel, got in written.items():  # whatever was written is complete and right
        assert got == contents[rel], rel
    assert not list(out.rglob(".castore-tmp-*"))
    assert _no_export_threads()


async def test_a_missing_chunk_is_raised_from_the_worker(
    tmp_path: pathlib.Path, embedded: tuple[EmbeddedBlobService, EmbeddedDirectoryService]
) -> None:
    blob, dirs = embedded
    _src, contents, root = await _import(tmp_path, blob, dirs)
    data = contents["dir10/inner/f03.bin"]
    chunks = await blob.chunks(blake3_digest(data))
    assert chunks
    store = blob._store()
    with store.env.write() as txn:
        txn.delete(chunks[-1].digest, db=store.chunks_db)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match=r"chunk #\d+ .* is missing") as caught:
        await export_directory(blob, dirs, root, out)
    assert str(out / "dir10" / "inner" / "f03.bin") in describe(caught.value)
    assert not (out / "dir10" / "inner" / "f03.bin").exists()
    assert _no_export_threads()


async def test_undecompressable_value_is_an_integrity_error(
    tmp_path: pathlib.Path, embedded: tuple[EmbeddedBlobService, EmbeddedDirectoryService]
) -> None:
    blob, dirs = embedded
    _src, contents, root = await _import(tmp_path, blob, dirs)
    digest = blake3_digest(contents["dir07/inner/f01.bin"])
    store = blob._store()
    with store.env.write() as txn:
        txn.put(digest, b"\x01not a zstd frame", db=store.chunks_db)
    with pytest.raises(IntegrityError, match=re.escape(f"chunk {digest}: stored bytes do not decompress")):
        await export_directory(blob, dirs, root, tmp_path / "out")
    assert not (tmp_path / "out" / "dir07" / "inner" / "f01.bin").exists()


async def test_executable_bit_under_a_strict_umask(
    tmp_path: pathlib.Path, embedded: tuple[EmbeddedBlobService, EmbeddedDirectoryService]
) -> None:
    blob, dirs = embedded
    _src, _contents, root = await _import(tmp_path, blob, dirs)
    old = os.umask(0o177)  # takes the owner's execute bit
    try:
        await export_directory(blob, dirs, root, tmp_path / "out")
    finally:
        os.umask(old)
    inner = tmp_path / "out" / "dir04" / "inner"
    assert os.stat(inner / "f03.bin").st_mode & 0o777 == 0o700
    assert os.stat(inner / "f02.bin").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "out" / "dir00" / "big.bin").st_mode & 0o777 == 0o600


async def test_loop_read_service_round_trip_and_damage(tmp_path: pathlib.Path) -> None:
    """A backend without blocking reads is read on the event loop by the worker threads."""
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    src = tmp_path / "src"
    contents = _make_tree(src)
    _name, node = await ingest_path(blob, dirs, src)
    assert await blob.blocking_reads() is None
    await export_directory(blob, dirs, node.digest, tmp_path / "out")
    assert assert_same_tree(str(src), str(tmp_path / "out")) == len(contents)
    for path in ("dir11/inner/f02.bin", "dir00/big.bin"):  # read whole, and streamed
        digest = blake3_digest(contents[path])
        good = blob._blobs[digest]
        blob._blobs[digest] = b"\xff" * len(good)
        out = tmp_path / f"out-{path.rsplit('/', 1)[-1]}"
        with pytest.raises(IntegrityError):
            await export_directory(blob, dirs, node.digest, out)
        assert path not in _files(out)
        blob._blobs[digest] = good
    assert _no_export_threads()


class _Stalling(MemoryBlobService):
    """Reads never answer (until cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    async def read_many(self, digests: Sequence[B3Digest], *, verify: bool = True) -> list[bytes | None]:
        self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("not reached")


async def test_cancelling_stops_the_threads(tmp_path: pathlib.Path) -> None:
    blob, dirs = _Stalling(), MemoryDirectoryService()
    src = tmp_path / "src"
    _make_tree(src)
    _name, node = await ingest_path(blob, dirs, src)
    task = asyncio.ensure_future(export_directory(blob, dirs, node.digest, tmp_path / "out"))
    await blob.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _no_export_threads()
