"""The embedded on-disk default: config and URLs, chunking, sharing, verification, fsck."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from castore_di import load_container
from castore_di.blobservice.embedded import EmbeddedBlobService, EmbeddedBlobServiceConfig
from castore_di.digests import blake3_digest
from castore_di.directoryservice.embedded import EmbeddedDirectoryService, EmbeddedDirectoryServiceConfig
from castore_di._embedded import StoreOptions
from castore_di._embedded import open_environments
from castore_di.blobservice.embedded import BATCH_BYTES
from castore_di.errors import ClosedError, ConfigError, IntegrityError, StorageError
from castore_di.nodes import Directory, FileNode
from castore_di.testing.fixtures import CLOSURE_D, DIRECTORY_D, chain
from tests.cases_embedded import EmbeddedBlobBackdoor, EmbeddedDirectoryBackdoor, fsck


def _config(path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "blobservices": {"default": {"type": "embedded", "path": str(path), **extra}},
        "directoryservices": {"default": {"type": "embedded", "path": str(path)}},
    }


# --- config and URLs -----------------------------------------------------------------


def test_default_path_honours_xdg_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    blob = EmbeddedBlobServiceConfig().build()
    dirs = EmbeddedDirectoryServiceConfig.from_url("embedded://").build()
    assert blob.path == dirs.path == str(tmp_path / "xdg" / "castore")


async def test_construction_does_no_io(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet"
    container = load_container(_config(target))
    blobs = container.blob_service("default")
    dirs = container.directory_service("default")
    assert not target.exists()
    assert await blobs.put(b"hi") == blake3_digest(b"hi")
    assert (target / "data.mdb").exists()
    assert await dirs.get(DIRECTORY_D.digest) is None
    await container.aclose()


@pytest.mark.parametrize(
    ("url", "fields"),
    [
        ("embedded://", {}),
        ("embedded:///", {}),
        ("embedded:///var/lib/castore", {"path": "/var/lib/castore"}),
        ("embedded:///a%20b", {"path": "/a b"}),
        ("embedded:///x?durability=full&sync_interval=0.5", {"path": "/x", "durability": "full", "sync_interval": 0.5}),
        ("embedded:///x?avg_chunk_size=65536&compression=none", {"path": "/x", "avg_chunk_size": 65536, "compression": "none"}),
    ],
)
def test_blob_urls(url: str, fields: dict[str, Any]) -> None:
    assert EmbeddedBlobServiceConfig.from_url(url) == EmbeddedBlobServiceConfig(**fields)


@pytest.mark.parametrize(
    "url",
    [
        "embedded://host/path",
        "embedded://host",
        "embedded:///x?bogus=1",
        "embedded:///x?durability=sometimes",
        "embedded:///x?map_size=big",
        "embedded:///x?avg_chunk_size=100",
        "embedded:///x?durability=full&durability=full",
        "embedded:///x#frag",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        EmbeddedBlobServiceConfig.from_url(url)


def test_directory_urls() -> None:
    assert EmbeddedDirectoryServiceConfig.from_url("embedded:///d").path == "/d"
    with pytest.raises(ConfigError, match="avg_chunk_size"):
        EmbeddedDirectoryServiceConfig.from_url("embedded:///d?avg_chunk_size=65536")
    with pytest.raises(ConfigError, match="host"):
        EmbeddedDirectoryServiceConfig.from_url("embedded://h/d")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"durability": "sometimes"}, "durability"),
        ({"compression": "lz4"}, "compression"),
        ({"avg_chunk_size": 100}, "avg_chunk_size"),
        ({"avg_chunk_size": "65536"}, "avg_chunk_size"),
        ({"map_size": 0}, "map_size"),
        ({"sync_interval": -1}, "sync_interval"),
        ({"path": ""}, "path"),
        ({"paths": "/x"}, "paths"),
    ],
)
def test_bad_config(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    config = {"blobservices": {"default": {"type": "embedded", **extra}}}
    with pytest.raises(ConfigError, match=message):
        load_container(config)


def test_url_instance_in_config(tmp_path: Path) -> None:
    container = load_container({"blobservices": {"default": f"embedded://{tmp_path}/s"}})
    service = container.blob_service("default")
    assert isinstance(service, EmbeddedBlobService)
    assert service.path == str(tmp_path / "s")


# --- sharing one environment -----------------------------------------------------------


async def test_both_kinds_share_one_environment(tmp_path: Path) -> None:
    container = load_container(_config(tmp_path))
    blobs = container.blob_service("default")
    dirs = container.directory_service("default")
    digest = await blobs.put(b"shared")
    root = await dirs.put_closure(CLOSURE_D)
    assert blobs._store().env is dirs._store().env
    assert open_environments()[os.path.realpath(tmp_path)] == 2  # one environment, two users
    await blobs.close()
    assert await dirs.get(root) == DIRECTORY_D  # still open for the other service
    with pytest.raises(ClosedError):
        await blobs.has(digest)
    await container.aclose()
    assert os.path.realpath(tmp_path) not in open_environments()
    # Reopened later: everything is still there.
    again = load_container(_config(tmp_path))
    assert await again.blob_service("default").read_bytes(digest) == b"shared"
    assert [d async for d in again.directory_service("default").get_recursive(root)][0] == DIRECTORY_D
    await again.aclose()


async def test_conflicting_options_on_one_path_are_refused(tmp_path: Path) -> None:
    a = EmbeddedBlobService(str(tmp_path), StoreOptions(durability="process"))
    b = EmbeddedDirectoryService(str(tmp_path), StoreOptions(durability="full"))
    await a.put(b"x")
    with pytest.raises(ConfigError, match="already open"):
        await b.get(DIRECTORY_D.digest)
    await a.close()
    await b.close()


# --- chunking -----------------------------------------------------------------------------


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_small_blob_is_one_chunk(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path))
    digest = await service.put(b"x" * 1000)
    assert await service.chunks(digest) == []
    await service.close()


@given(
    size=st.integers(0, 600_000),
    piece=st.integers(1, 300_000),
    seed=st.integers(0, 3),
)
async def test_streamed_cut_points_equal_whole_buffer_fastcdc(size: int, piece: int, seed: int) -> None:
    import tempfile

    import pyfastcdc

    data = _data(size, seed)
    with tempfile.TemporaryDirectory() as tmp:
        service = EmbeddedBlobService(tmp, avg_chunk_size=16384)
        writer = service.open_write()
        for i in range(0, len(data), piece):
            await writer.write(data[i : i + piece])
        digest = await writer.close()
        chunks = await service.chunks(digest)
        expected = [
            (blake3_digest(data[c.offset : c.offset + c.length]), c.length)
            for c in pyfastcdc.FastCDC(16384, min_size=8192, max_size=32768).cut_buf(data)
        ]
        assert chunks is not None
        assert [(c.digest, c.size) for c in chunks] == (expected if len(expected) > 1 else [])
        assert await service.read_bytes(digest) == data
        await service.close()


async def test_chunks_are_deduplicated(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=16384)
    common = _data(400_000, 1)
    a = await service.put(common + b"tail a")
    b = await service.put(b"head b" + common)
    ca, cb = await service.chunks(a), await service.chunks(b)
    assert ca and cb
    shared = {c.digest for c in ca} & {c.digest for c in cb}
    assert len(shared) >= len(ca) - 3
    store = service._store()
    with store.env.read() as txn:
        stored = txn.stat(store.chunks_db)["entries"]
    assert stored == len({c.digest for c in ca} | {c.digest for c in cb})
    await service.close()


async def test_incompressible_chunks_are_stored_raw_and_text_compressed(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path))
    noise = await service.put(_data(10_000, 2))
    text = await service.put(b"castore " * 2000)
    store = service._store()
    with store.env.read() as txn:
        assert bytes(txn.get(noise, db=store.chunks_db))[0] == 0
        stored = bytes(txn.get(text, db=store.chunks_db))
    assert stored[0] == 1 and len(stored) < 1000
    assert await service.read_bytes(text) == b"castore " * 2000
    await service.close()


# --- visibility ------------------------------------------------------------------------


async def test_blob_invisible_until_close_and_abort_leaves_no_index(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=65536)
    data = _data(BATCH_BYTES + 3_000_000, 3)  # big enough that chunks are flushed mid-write
    digest = blake3_digest(data)
    writer = service.open_write()
    await writer.write(data[: BATCH_BYTES + 1_000_000])
    assert not await service.has(digest)
    await writer.abort()
    assert not await service.has(digest)
    assert await service.chunks(digest) is None
    report = await service.fsck()
    assert report.ok and report.blobs == 0 and report.chunks > 0  # flushed chunks stay, unreferenced
    writer = service.open_write()
    await writer.write(data)
    assert not await service.has(digest)
    assert await writer.close() == digest
    assert await service.read_bytes(digest) == data
    await service.close()


async def test_closure_is_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = EmbeddedDirectoryService(str(tmp_path))
    await service.get(DIRECTORY_D.digest)  # open the engine
    env = service._store().env
    commits = 0
    original = env._after_commit

    def counting() -> None:
        nonlocal commits
        commits += 1
        original()

    monkeypatch.setattr(env, "_after_commit", counting)
    dirs = chain(50)
    root = await service.put_closure(dirs)
    assert commits == 1
    assert [d async for d in service.get_recursive(root)] == list(reversed(dirs))
    await service.close()


# --- verification and fsck ----------------------------------------------------------------


async def test_corrupt_chunk_names_blob_and_chunk(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=16384)
    data = _data(300_000, 4)
    digest = await service.put(data)
    chunks = await service.chunks(digest)
    assert chunks
    await EmbeddedBlobBackdoor(service).corrupt(digest)
    with pytest.raises(IntegrityError) as info:
        await service.read_bytes(digest)
    assert str(digest) in str(info.value) and str(chunks[-1].digest) in str(info.value)
    # The chunk itself, read as a blob, is refused too.
    with pytest.raises(IntegrityError):
        await service.read_bytes(chunks[-1].digest)
    await service.close()


async def test_missing_chunk_is_a_storage_error(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=16384)
    digest = await service.put(_data(300_000, 5))
    chunk = await EmbeddedBlobBackdoor(service).drop_chunk(digest)
    with pytest.raises(StorageError, match="missing"):
        await service.read_bytes(digest)
    report = await service.fsck()
    assert not report.ok
    assert any(str(chunk) in p and "missing" in p for p in report.problems)
    await service.close()


async def test_fsck_reports_every_kind_of_damage(tmp_path: Path) -> None:
    container = load_container(_config(tmp_path, avg_chunk_size=16384))
    blobs = container.blob_service("default")
    dirs = container.directory_service("default")
    big = await blobs.put(_data(300_000, 6))
    small = await blobs.put(b"small blob")
    root = await dirs.put_closure(
        [Directory({b"f": FileNode(small, 10)}), Directory({b"d": Directory({b"f": FileNode(small, 10)}).as_node()})]
    )
    healthy = fsck(str(tmp_path))
    assert healthy.ok, str(healthy)
    assert healthy.blobs == 1 and healthy.directories == 2 and healthy.chunks >= 10
    await EmbeddedBlobBackdoor(blobs).corrupt(big)
    await EmbeddedBlobBackdoor(blobs).corrupt(small)
    await EmbeddedDirectoryBackdoor(dirs).corrupt(root)
    report = fsck(str(tmp_path))
    assert len(report.problems) == 4, str(report)  # the chunk, its blob, the small blob, the directory
    text = str(report)
    assert str(big) in text and small.hex() in text and root.hex() in text
    with pytest.raises(IntegrityError, match="directory"):
        await dirs.get(root)
    assert not (await dirs.fsck()).ok and not (await blobs.fsck()).ok
    await container.aclose()


async def test_closed_service_refuses_work(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path))
    await service.put(b"a")
    await service.close()
    await service.close()
    with pytest.raises(ClosedError):
        service.open_write()
    dirs = EmbeddedDirectoryService(str(tmp_path))
    await dirs.close()
    with pytest.raises(ClosedError):
        await dirs.get(DIRECTORY_D.digest)


async def test_durability_full_round_trip(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), StoreOptions(durability="full"))
    digest = await service.put(b"synced")
    await service.close()
    again = EmbeddedBlobService(str(tmp_path))
    assert await again.read_bytes(digest) == b"synced"
    await again.close()


# --- sharing across threads and tasks -----------------------------------------------------


def test_many_threads_open_write_and_close_one_store(tmp_path: Path) -> None:
    """50 threads, each with its own container and event loop on one path, 4 rounds: open,
    write, close race freely; the environment is opened and closed by reference count."""
    import threading

    errors: list[BaseException] = []
    digests: set[str] = set()
    lock = threading.Lock()

    def worker(n: int, round_: int) -> None:
        async def run() -> None:
            container = load_container(_config(tmp_path))
            try:
                digest = await container.blob_service("default").put(f"thread {n} round {round_}".encode())
                await container.directory_service("default").put(Directory({b"f": FileNode(digest, 1)}))
            finally:
                await container.aclose()
            with lock:
                digests.add(digest.hex())

        try:
            asyncio.run(run())
        except BaseException as e:  # reported below, with the thread's number
            with lock:
                errors.append(e)

    for round_ in range(4):
        threads = [threading.Thread(target=worker, args=(n, round_)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert os.path.realpath(tmp_path) not in open_environments()
    assert len(digests) == 200
    assert fsck(str(tmp_path)).ok


async def test_many_tasks_share_one_store(tmp_path: Path) -> None:
    """Tasks of one loop building, using and closing containers on one path concurrently."""

    async def one(n: int) -> str:
        container = load_container(_config(tmp_path))
        try:
            return (await container.blob_service("default").put(f"task {n}".encode())).hex()
        finally:
            await container.aclose()

    for _ in range(3):
        assert len(set(await asyncio.gather(*(one(n) for n in range(50))))) == 50
        assert os.path.realpath(tmp_path) not in open_environments()


# --- the writer thread ------------------------------------------------------------------------


async def test_queued_writes_are_group_committed_and_a_failing_one_rolls_back_alone(tmp_path: Path) -> None:
    import threading

    from castore_di._embedded import acquire_async, release_async

    env = await acquire_async(str(tmp_path))
    db = env.db(b"test")
    gate, entered = threading.Event(), threading.Event()

    def first(txn: Any) -> str:
        entered.set()
        gate.wait()  # keeps the writer thread busy while the others queue up
        txn.put(b"first", b"1", db=db)
        return "first"

    def put(n: int) -> Any:
        def op(txn: Any) -> int:
            txn.put(b"key%d" % n, b"v", db=db)
            if n == 7:
                raise ValueError("op 7 fails")
            return n

        return op

    commits = env.writer.commits
    blocked = asyncio.ensure_future(env.transact(first))
    await asyncio.to_thread(entered.wait)  # the writer thread is inside the first operation
    queued = [asyncio.ensure_future(env.transact(put(n))) for n in range(20)]
    while len(env.writer._queue) < 20:  # all queued behind the first
        await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert await blocked == "first"
    assert [r for r in results if not isinstance(r, BaseException)] == [n for n in range(20) if n != 7]
    assert isinstance(results[7], ValueError)
    assert env.writer.commits - commits == 2  # the first, then the 20 queued ones together
    with env.read() as txn:
        assert txn.get(b"key7", db=db) is None
        assert all(txn.get(b"key%d" % n, db=db) is not None for n in range(20) if n != 7)
    await release_async(env)
