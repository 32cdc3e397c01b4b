"""The embedded on-disk default: config and URLs, chunking, sharing, verification, fsck."""

from __future__ import annotations

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
from castore_di._embedded.env import _open
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
    assert len([k for k in _open if k == os.path.realpath(tmp_path)]) == 1
    await blobs.close()
    assert await dirs.get(root) == DIRECTORY_D  # still open for the other service
    with pytest.raises(ClosedError):
        await blobs.has(digest)
    await container.aclose()
    assert os.path.realpath(tmp_path) not in _open
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
