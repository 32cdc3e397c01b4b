"""The import's storing pipeline on the embedded store: files prepared (hashed, cut,
compressed) in reader threads, committed in batches, reported only once committed."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

from castore_di.blobservice.embedded import EmbeddedBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.embedded import EmbeddedDirectoryService
from castore_di._embedded import StoreOptions
from castore_di.errors import StorageError
from castore_di.exporter import export_node
from castore_di.importer import SMALL_FILE, ImportStats, ingest_path
from castore_di.nodes import DirectoryNode, FileNode
from tests.cases_embedded import fsck


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _tree(root: Path) -> dict[int, bytes]:
    """Files of distinct sizes (small, cut into chunks, large): ``{size: contents}``."""
    sizes = [*range(1, 400, 3), 5_000, 70_000, 300_001, 900_000, SMALL_FILE + 5, 3 * SMALL_FILE + 1]
    files: dict[int, bytes] = {}
    for i, size in enumerate(sizes):
        data = _data(size, i)
        files[size] = data
        sub = root / f"d{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_bytes(data)
    return files


class _CommittedCheck:
    """Progress that checks, whenever a file is reported done, that its blob is stored."""

    def __init__(self, blob: EmbeddedBlobService, files: dict[int, bytes]) -> None:
        self._blob = blob
        self._files = files
        self.checked = 0
        self.missing: list[int] = []

    def start(self, files: int, nbytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        # Sizes are distinct, so the size names the file; a read transaction of our own
        # sees only committed data.
        if not self._blob._store().has_blob(blake3_digest(self._files[nbytes])):
            self.missing.append(nbytes)
        self.checked += 1


async def test_files_are_reported_only_after_their_commit(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    blob, dirs = EmbeddedBlobService(str(tmp_path / "store")), EmbeddedDirectoryService(str(tmp_path / "store"))
    progress = _CommittedCheck(blob, files)
    stats = ImportStats()
    _name, node = await ingest_path(blob, dirs, tmp_path / "src", progress=progress, stats=stats)
    assert progress.checked == len(files) and progress.missing == []
    assert stats.uploaded_files == len(files)
    assert isinstance(node, DirectoryNode)
    await export_node(blob, dirs, node, tmp_path / "out")
    for size, data in files.items():
        found = [p for p in (tmp_path / "out").rglob("f*") if p.stat().st_size == size]
        assert len(found) == 1 and found[0].read_bytes() == data
    # Blobs longer than a chunk got a chunk index; the store is consistent.
    assert await blob.chunks(blake3_digest(files[900_000]))
    assert fsck(str(tmp_path / "store")).problems == []
    await blob.close()
    await dirs.close()


async def test_a_file_that_grew_past_small_file_is_streamed(tmp_path: Path) -> None:
    """A file small at walk time and large at read time is stored whole, as read."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "grows").write_bytes(b"small")
    (src / "other").write_bytes(b"other")
    big = _data(SMALL_FILE + 100_000, 5)

    class Grow:
        def start(self, files: int, nbytes: int) -> None:  # after the walk, before any read
            (src / "grows").write_bytes(big)

        def advance(self, nbytes: int) -> None:
            pass

    blob, dirs = EmbeddedBlobService(str(tmp_path / "store")), EmbeddedDirectoryService(str(tmp_path / "store"))
    _name, node = await ingest_path(blob, dirs, src, progress=Grow())
    assert isinstance(node, DirectoryNode)
    directory = await dirs.get(node.digest)
    assert directory is not None
    entry = dict(directory.items())[b"grows"]
    assert isinstance(entry, FileNode) and entry.size == len(big) and entry.digest == blake3_digest(big)
    assert await blob.read_bytes(entry.digest) == big
    await blob.close()
    await dirs.close()


async def test_a_failed_commit_is_one_storage_error_and_leaves_nothing_partial(tmp_path: Path) -> None:
    """A store too small for the tree: the import fails naming a file, and what was stored
    is consistent (no index without its chunks, no chunk that does not match its digest)."""
    src = tmp_path / "src"
    for i in range(200):
        (src / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 5}" / f"f{i}").write_bytes(_data(40_000 + i, i))  # incompressible
    store = str(tmp_path / "store")
    options = StoreOptions(map_size=2 << 20)
    blob, dirs = EmbeddedBlobService(store, options), EmbeddedDirectoryService(store, options)
    with pytest.raises(StorageError, match=r"unable to upload .*src/d\d/f\d+.*is full"):
        await ingest_path(blob, dirs, src)
    assert fsck(store).problems == []
    await blob.close()
    await dirs.close()


async def test_prepared_blobs_are_invisible_until_put_and_committed_together(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=16384)
    blobs = [_data(n, n) for n in (10, 5_000, 100_000)]
    prepared = await asyncio.to_thread(service.prepare_many, blobs)
    assert [p.present for p in prepared] == [False, False, False]
    assert await service.has_many([p.digest for p in prepared]) == [False, False, False]
    env = service._store().env
    before = env.writer.commits
    await service.put_prepared(prepared)
    assert env.writer.commits == before + 1
    assert await service.has_many([p.digest for p in prepared]) == [True, True, True]
    assert await service.chunks(prepared[2].digest)  # cut into chunks, with an index
    again = await asyncio.to_thread(service.prepare_many, blobs)
    assert [(p.present, p.payload) for p in again] == [(True, None)] * 3  # nothing encoded twice
    await service.close()


async def test_put_prepared_claims_a_chunk_a_writer_left_loose(tmp_path: Path) -> None:
    """A chunk stored ahead of an index (loose, collectable) becomes a blob for good when
    the same bytes are put as a blob of their own."""
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=16384)
    data = _data(12 << 20, 9)
    writer = service.open_write()
    for i in range(0, len(data), 1 << 20):
        await writer.write(data[i : i + (1 << 20)])  # past BATCH_BYTES: chunks flushed loose
    store = service._store()
    with store.env.read() as txn:
        loose = [bytes(k) for k, _ in txn.cursor(db=store.loose_db)]
        value = bytes(txn.get(loose[0], db=store.chunks_db))
    await writer.abort()
    from castore_di._embedded import codec

    chunk = codec().decode(value, "test")
    assert not await service.has(blake3_digest(chunk))  # loose: not a blob
    await service.put_prepared(await asyncio.to_thread(service.prepare_many, [chunk]))
    assert await service.has(blake3_digest(chunk))
    assert blake3_digest(chunk).hex() not in (await service.gc()).removed
    assert await service.read_bytes(blake3_digest(chunk)) == chunk
    await service.close()


async def test_periodic_sync_runs_on_its_own_thread(tmp_path: Path) -> None:
    """With ``durability: process`` the writer thread hands the fsync to a sync thread."""
    service = EmbeddedBlobService(str(tmp_path), StoreOptions(sync_interval=0.0))
    for i in range(5):
        await service.put(_data(1000, i))
    names = [t.name for t in threading.enumerate()]
    assert any(n.startswith("castore-sync ") for n in names), names
    await service.close()
    assert not any(t.name.startswith("castore-sync ") and t.is_alive() for t in threading.enumerate()
                   if str(tmp_path) in t.name)
    again = EmbeddedBlobService(str(tmp_path))
    assert await again.read_bytes(blake3_digest(_data(1000, 4))) == _data(1000, 4)
    await again.close()



async def test_fast_compression_is_zstd_read_back_alike(tmp_path: Path) -> None:
    """``compression: fast`` (zstd level -1) stores zstd frames that read back as any other."""
    from castore_di.blobservice.embedded import EmbeddedBlobServiceConfig

    assert EmbeddedBlobServiceConfig.from_url("embedded:///x?compression=fast").compression == "fast"
    text = Path(asyncio.__file__).read_bytes() * 4  # source code: compresses well at any level
    sizes = {}
    for mode in ("auto", "fast"):
        service = EmbeddedBlobService(str(tmp_path / mode), compression=mode)  # type: ignore[arg-type]
        digest = (await service.put_many([text]))[0]
        store = service._store()
        with store.env.read() as txn:
            stored = bytes(txn.get(digest, db=store.chunks_db) or b"")
            stored += b"".join(bytes(v) for _k, v in txn.cursor(db=store.chunks_db) if bytes(_k) != digest)
        assert await service.read_bytes(digest) == text
        sizes[mode] = len(stored)
        await service.close()
    assert sizes["auto"] < sizes["fast"] < len(text) // 2
