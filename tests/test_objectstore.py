"""The objectstore backends beyond the conformance suites: URLs and config, the on-store
layout (interop with the reference), chunking, dedup, interrupted writes, damage, memory.

GCS is tested for config and URL handling only: no local emulator accepts obstore's
uploads (see /work/shared/reference/local-servers.md), so nothing here connects to GCS.
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zstandard

from castore_di.blobservice.objectstore import (
    ObjectStoreBlobService,
    ObjectStoreBlobServiceConfig,
    _ObjectStoreBlobWriter,
)
from castore_di.composition import blob_service_from_addr, directory_service_from_addr, load_container
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.objectstore import ObjectStoreDirectoryService, ObjectStoreDirectoryServiceConfig
from castore_di.errors import ClosedError, ConfigError, IntegrityError, StorageError, UnsupportedOperationError
from castore_di._objectstore.config import parse_objectstore_url
from castore_di._objectstore.store import object_key, zstd_compress
from castore_di.proto import rpc_blobstore_pb2
from castore_di.testing.fixtures import CLOSURE_D, DIRECTORY_A, DIRECTORY_B, DIRECTORY_D, DIRECTORY_WITH_KEEP
from tests.cases_objectstore import TEST_AVG

HELLO_DIGEST_HEX = "41f8394111eb713a22165c46c90ab8f0fd9399c92028fd6d288944b23ff5bf76"


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def blobs(store_dir: Path) -> ObjectStoreBlobService:
    return ObjectStoreBlobService(f"file://{store_dir}", avg_chunk_size=TEST_AVG)


@pytest.fixture
def dirs(store_dir: Path) -> ObjectStoreDirectoryService:
    return ObjectStoreDirectoryService(f"file://{store_dir}")


# --- URLs and config --------------------------------------------------------------------

FROM_ADDR_ROWS = [
    # the reference's from_addr rows for objectstore (gs:// and s3:// build without connecting)
    ("objectstore+memory:///", True),
    ("objectstore+memory://", True),
    ("objectstore+file:///foo/bar", True),
    ("objectstore+https://localhost:8080/some-path", True),
    ("objectstore+s3://bucket/path", True),
    ("objectstore+gs://bucket/path", True),
    ("objectstore+az://container/path?account_name=devstoreaccount1", True),
    ("objectstore+s3://bucket/path?endpoint=http://127.0.0.1:1&region=us-east-1&allow_http=true", True),
    ("objectstore://bucket/path", False),  # "Missing objectstore uri"
    ("objectstore+ftp://host/path", False),
    ("objectstore+file://relative/path", False),
    ("objectstore+memory:///foo", False),
    ("objectstore+s3:///path", False),  # no bucket
    ("objectstore+s3://bucket/path?no_such_option=1", False),
    ("objectstore+file:///foo?x=1", False),
]


@pytest.mark.parametrize(("url", "ok"), FROM_ADDR_ROWS)
@pytest.mark.parametrize("kind", ["blob", "directory"])
async def test_from_addr(url: str, ok: bool, kind: str) -> None:
    build = blob_service_from_addr if kind == "blob" else directory_service_from_addr
    if ok:
        service = build(url)
        assert type(service).__name__.startswith("ObjectStore")
        await service.close()
    else:
        with pytest.raises(ConfigError):
            build(url)


def test_url_query_becomes_options() -> None:
    url = "objectstore+s3://bucket/some/prefix?endpoint=http://127.0.0.1:9000&region=eu-west-1&allow_http=true"
    cfg = ObjectStoreBlobServiceConfig.from_url(url)
    assert cfg.object_store_url == "s3://bucket/some/prefix"
    assert cfg.object_store_options == {
        "endpoint": "http://127.0.0.1:9000",
        "region": "eu-west-1",
        "allow_http": "true",
    }
    assert cfg.avg_chunk_size == 262144
    dcfg = ObjectStoreDirectoryServiceConfig.from_url("objectstore+memory:///")
    assert dcfg.object_store_url == "memory:///" and dcfg.object_store_options == {}
    with pytest.raises(ConfigError, match="Missing objectstore uri"):
        parse_objectstore_url("s3://bucket")


def test_gcs_config_only() -> None:
    """GCS: the config builds a GCS store (no emulator accepts obstore's uploads: no I/O here)."""
    from obstore.store import GCSStore

    container = load_container(
        {
            "blobservices": {
                "default": {
                    "type": "objectstore",
                    "object_store_url": "gs://my-bucket/castore",
                    "object_store_options": {"google_bucket": "my-bucket", "timeout": "30s"},
                }
            },
            "directoryservices": {"default": "objectstore+gs://my-bucket/castore-dirs"},
        }
    )
    blob = container.blob_service("default")
    assert isinstance(blob, ObjectStoreBlobService)
    store = blob.access.store
    assert isinstance(store, GCSStore)
    assert store.prefix == "castore"
    assert store.client_options == {"timeout": "30s"}
    directory = container.directory_service("default")
    assert isinstance(directory, ObjectStoreDirectoryService)
    assert isinstance(directory.access.store, GCSStore)


def test_s3_options_reach_obstore() -> None:
    from obstore.store import S3Store

    service = ObjectStoreBlobService(
        "s3://bucket/prefix",
        {
            "endpoint": "http://127.0.0.1:1",
            "region": "us-east-1",
            "allow_http": "true",
            "access_key_id": "k",
            "secret_access_key": "s",
        },
    )
    store = service.access.store
    assert isinstance(store, S3Store)
    assert store.prefix == "prefix"
    assert store.config["endpoint"] == "http://127.0.0.1:1"
    assert store.config["access_key_id"] == "k"
    assert store.client_options == {"allow_http": "true"}


@pytest.mark.parametrize("avg", [0, 1000, 4095, 2 * 1024 * 1024 + 1, 64 * 1024 * 1024])
def test_avg_chunk_size_bounds(avg: int) -> None:
    with pytest.raises(ConfigError, match="avg_chunk_size"):
        load_container(
            {"blobservices": {"default": {"type": "objectstore", "object_store_url": "memory:///", "avg_chunk_size": avg}}}
        )


@pytest.mark.parametrize("avg", [4096, 65536, 262144, 2 * 1024 * 1024])
def test_avg_chunk_size_accepted(avg: int) -> None:
    cfg = ObjectStoreBlobServiceConfig(object_store_url="memory:///", avg_chunk_size=avg)
    assert cfg.build().avg_chunk_size == avg


def test_bad_config_values() -> None:
    for bad in (
        {"object_store_url": "memory:///", "object_store_options": {"a": 1}},
        {"object_store_url": "memory:///", "unknown_field": "x"},
        {"object_store_url": "ftp://x/y"},
        {"object_store_url": "file://relative"},
        {},
    ):
        with pytest.raises(ConfigError):
            load_container({"blobservices": {"default": {"type": "objectstore", **bad}}})
    with pytest.raises(ConfigError):  # obstore refuses an unknown S3 key when the service is built
        load_container(
            {
                "directoryservices": {
                    "default": {
                        "type": "objectstore",
                        "object_store_url": "s3://b",
                        "object_store_options": {"nonsense": "1"},
                    }
                }
            }
        ).directory_service("default")


async def test_construction_does_no_io(store_dir: Path) -> None:
    service = ObjectStoreBlobService(f"file://{store_dir}/deeper", avg_chunk_size=TEST_AVG)
    dservice = ObjectStoreDirectoryService(f"file://{store_dir}/dirs")
    writer = service.open_write()
    assert not store_dir.exists()
    await writer.write(b"x")
    await writer.close()
    await dservice.put(DIRECTORY_A)
    assert (store_dir / "deeper").is_dir() and (store_dir / "dirs").is_dir()


# --- layout: a store written here is readable by the reference and back ----------------


async def test_hello_world_layout(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    digest = await blobs.put(b"Hello World")
    assert digest.hex() == HELLO_DIGEST_HEX
    index = store_dir / "blobs/b3/41f8" / HELLO_DIGEST_HEX
    chunk = store_dir / "chunks/b3/41f8" / HELLO_DIGEST_HEX
    assert _files(store_dir) == [f"blobs/b3/41f8/{HELLO_DIGEST_HEX}", f"chunks/b3/41f8/{HELLO_DIGEST_HEX}"]
    assert index.read_bytes() == b""  # StatBlobResponse{chunks: []}
    raw = chunk.read_bytes()
    assert raw[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read() == b"Hello World"
    assert await blobs.chunks(digest) == []


async def test_empty_blob_layout(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    digest = await blobs.put(b"")
    assert _files(store_dir) == [f"blobs/b3/{digest.hex()[:4]}/{digest.hex()}"]
    assert await blobs.chunks(digest) == []


async def test_multi_chunk_layout(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    data = _data(1_000_000, 1)
    digest = await blobs.put(data)
    index = rpc_blobstore_pb2.StatBlobResponse()
    index.ParseFromString((store_dir / object_key("blobs", digest)).read_bytes())
    assert len(index.chunks) > 2 and index.bao == b""
    offset = 0
    for c in index.chunks:
        stored = (store_dir / object_key("chunks", B3Digest(c.digest))).read_bytes()
        plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(stored)).read()
        assert plain == data[offset : offset + c.size] and blake3_digest(plain) == c.digest
        offset += c.size
    assert offset == len(data)
    assert not (store_dir / object_key("chunks", digest)).exists()


async def test_chunks_match_fastcdc_2020_on_the_whole_buffer(blobs: ObjectStoreBlobService) -> None:
    from pyfastcdc import FastCDC

    data = _data(3_000_017, 2)
    writer = blobs.open_write()
    pos = 0
    sizes = [1, 7, 65_535, 300_001, 1_000_003, 13]
    i = 0
    while pos < len(data):  # odd write sizes must not move a cut point
        n = sizes[i % len(sizes)]
        await writer.write(data[pos : pos + n])
        pos += n
        i += 1
    digest = await writer.close()
    expected = [
        (blake3_digest(data[c.offset : c.offset + c.length]), c.length)
        for c in FastCDC(TEST_AVG, min_size=TEST_AVG // 2, max_size=TEST_AVG * 2).cut_buf(data)
    ]
    chunks = await blobs.chunks(digest)
    assert chunks is not None
    assert [(c.digest, c.size) for c in chunks] == expected


MAX_CHUNK = 2 * TEST_AVG


@pytest.mark.parametrize(
    "sizes",
    [
        [1 << 20],  # long pieces: cut in place, each tail joined with the next piece's start
        [MAX_CHUNK + 1],  # the shortest piece cut in place
        [MAX_CHUNK],  # the longest piece copied
        [MAX_CHUNK - 1, MAX_CHUNK + 2],
        [3 * MAX_CHUNK + 5, 100, 7, 2 * MAX_CHUNK],
        [5 << 20],  # longer than a segment: the event loop hands it over in slices
        [1, 1 << 20, 3, 900_001],
    ],
)
@pytest.mark.parametrize("size", [2 * MAX_CHUNK + 1, 3_000_017, 7 << 20])
async def test_cuts_do_not_depend_on_write_sizes(sizes: list[int], size: int) -> None:
    # regions cut in place, joins, copied regions and the last region must cut as one buffer does
    from pyfastcdc import FastCDC

    blobs = ObjectStoreBlobService("memory:///", avg_chunk_size=TEST_AVG)
    data = _data(size, size)
    writer = blobs.open_write()
    pos = i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        await writer.write(data[pos : pos + n])
        pos += n
        i += 1
    digest = await writer.close()
    assert digest == blake3_digest(data)
    expected = [
        (blake3_digest(data[c.offset : c.offset + c.length]), c.length)
        for c in FastCDC(TEST_AVG, min_size=TEST_AVG // 2, max_size=MAX_CHUNK).cut_buf(data)
    ]
    chunks = await blobs.chunks(digest)
    assert chunks is not None
    assert [(c.digest, c.size) for c in chunks] == expected
    reader = await blobs.open_read(digest)
    assert reader is not None
    assert await reader.read(-1) == data


async def test_a_tail_whose_cut_moves_back_a_byte() -> None:
    # FastCDC looks at even offsets only up to the end of the data: a tail of odd length ℓ+1
    # can end at ℓ once more data comes, inside the tail (the join then keeps a new tail)
    from pyfastcdc import FastCDC

    data = _data(4 * 1024 * 1024, 8)
    cuts = list(FastCDC(TEST_AVG, min_size=TEST_AVG // 2, max_size=MAX_CHUNK).cut_buf(data))
    cut = next(c for c in cuts if c.offset > MAX_CHUNK and c.length % 2 == 0 and c.offset + c.length < len(data) - 2 * MAX_CHUNK)
    split = cut.offset + cut.length + 1
    assert list(FastCDC(TEST_AVG, min_size=TEST_AVG // 2, max_size=MAX_CHUNK).cut_buf(data[:split]))[-1].length == cut.length + 1
    blobs = ObjectStoreBlobService("memory:///", avg_chunk_size=TEST_AVG)
    writer = blobs.open_write()
    await writer.write(data[:split])
    await writer.write(data[split:])
    digest = await writer.close()
    chunks = await blobs.chunks(digest)
    assert chunks is not None
    assert [(c.digest, c.size) for c in chunks] == [(blake3_digest(c.data), c.length) for c in cuts]


def test_incompressible_chunks_are_stored_raw_and_compressible_ones_compressed() -> None:
    from castore_di._objectstore.store import zstd_compress_chunk, zstd_decompress

    rng = random.Random(5)
    noise = rng.randbytes(256 * 1024)
    text = (Path(random.__file__).read_bytes() * 8)[: 256 * 1024]
    # random bytes with one stretch of text, 1/8 of the chunk: the probe samples it twice
    mixed = bytearray(noise)
    mixed[50_000 : 50_000 + 32 * 1024] = text[: 32 * 1024]
    for data, most in [(noise, len(noise) + 64), (text, len(text) // 2), (bytes(mixed), len(mixed) - 16 * 1024)]:
        stored = zstd_compress_chunk(data)
        assert len(stored) <= most
        assert zstd_decompress(stored, len(data), "chunk") == data
    assert len(zstd_compress_chunk(noise)) >= len(noise)  # raw blocks: no search for matches


async def test_directory_batch_layout(dirs: ObjectStoreDirectoryService, store_dir: Path) -> None:
    root = await dirs.put_closure(CLOSURE_D)
    raw = (store_dir / object_key("dirs", root)).read_bytes()
    frames = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    order: list[bytes] = []
    pos = 0
    while pos < len(frames):
        n = int.from_bytes(frames[pos : pos + 4], "big")
        order.append(frames[pos + 4 : pos + 4 + n])
        pos += 4 + n
    # root first, then breadth-first: D's children a, b, c (A once), then B's child
    assert order == [
        DIRECTORY_D.encode(),
        DIRECTORY_A.encode(),
        DIRECTORY_B.encode(),
        CLOSURE_D[3].encode(),
        DIRECTORY_WITH_KEEP.encode(),
    ]
    assert _files(store_dir) == [object_key("dirs", root)]


async def test_reads_a_batch_written_by_hand(dirs: ObjectStoreDirectoryService, store_dir: Path) -> None:
    """A batch object as the reference writes it (frames concatenated, one zstd stream)."""
    frames = b"".join(len(d.encode()).to_bytes(4, "big") + d.encode() for d in (DIRECTORY_B, DIRECTORY_WITH_KEEP))
    path = store_dir / object_key("dirs", DIRECTORY_B.digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(zstandard.ZstdCompressor(level=3, write_content_size=False).compress(frames))
    assert [d async for d in dirs.get_recursive(DIRECTORY_B.digest)] == [DIRECTORY_B, DIRECTORY_WITH_KEEP]


# --- directory service semantics ------------------------------------------------------


async def test_directory_put_refuses_children_and_serves_roots_only(dirs: ObjectStoreDirectoryService) -> None:
    with pytest.raises(UnsupportedOperationError):
        await dirs.put(DIRECTORY_B)
    root = await dirs.put_closure(CLOSURE_D)
    assert await dirs.get(root) == DIRECTORY_D
    assert await dirs.get(DIRECTORY_B.digest) is None  # inner directories are not served
    assert await dirs.get(DIRECTORY_A.digest) is None
    await dirs.put(DIRECTORY_A)  # a leaf is a closure of its own
    assert await dirs.get(DIRECTORY_A.digest) == DIRECTORY_A


async def test_same_closure_is_written_once(dirs: ObjectStoreDirectoryService, store_dir: Path) -> None:
    root = await dirs.put_closure(CLOSURE_D)
    path = store_dir / object_key("dirs", root)
    before = path.stat().st_ino, path.stat().st_mtime_ns
    await dirs.put_closure(CLOSURE_D)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == before


async def _rewrite(path: Path, data: bytes) -> None:
    path.write_bytes(data)


async def test_directory_damage_is_an_integrity_error(dirs: ObjectStoreDirectoryService, store_dir: Path) -> None:
    root = await dirs.put_closure(CLOSURE_D)
    path = store_dir / object_key("dirs", root)
    good = path.read_bytes()
    frames = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(good)).read()
    cases = {
        "not zstd": b"garbage" * 10,
        "truncated zstd": good[: len(good) // 2],
        "truncated frames": zstd_compress(frames[:-3]),
        "truncated header": zstd_compress(frames + b"\x00\x00"),
        "leaf changed": zstd_compress(frames[:-1] + bytes([frames[-1] ^ 1])),
        "another closure": zstd_compress(len(DIRECTORY_A.encode()).to_bytes(4, "big") + DIRECTORY_A.encode()),
        "frame missing": zstd_compress(frames[: 4 + len(DIRECTORY_D.encode())]),
        "empty": zstd_compress(b""),
        "huge frame": zstd_compress(b"\xff\xff\xff\xff"),
    }
    for name, data in cases.items():
        await _rewrite(path, data)
        with pytest.raises(IntegrityError):
            _ = [d async for d in dirs.get_recursive(root)]
            pytest.fail(f"{name}: no error")


async def test_directory_invalid_frame_is_an_integrity_error(dirs: ObjectStoreDirectoryService, store_dir: Path) -> None:
    """A frame that hashes to the requested root but does not decode as a valid Directory."""
    junk = b"\x0a\x00"  # a DirectoryNode with an empty name: fails validation
    root = blake3_digest(junk)
    path = store_dir / object_key("dirs", root)
    path.parent.mkdir(parents=True)
    path.write_bytes(zstd_compress(len(junk).to_bytes(4, "big") + junk))
    with pytest.raises(IntegrityError):
        await dirs.get(root)


# --- blob reads -------------------------------------------------------------------------


class _CountingGets:
    """Passes every GET through to the real store and records the keys."""

    def __init__(self, service: Any) -> None:
        self.keys: list[str] = []
        real = service.access.get

        async def get(key: str) -> bytes | None:
            self.keys.append(key)
            result: bytes | None = await real(key)
            return result

        service.access.get = get


async def test_seek_fetches_only_the_target_chunk(blobs: ObjectStoreBlobService) -> None:
    data = _data(2_000_000, 3)
    digest = await blobs.put(data)
    chunks = await blobs.chunks(digest)
    assert chunks and len(chunks) > 4
    spy = _CountingGets(blobs)
    reader = await blobs.open_read(digest)
    assert reader is not None
    await reader.seek(len(data) - 10)
    assert await reader.read() == data[-10:]
    chunk_gets = [k for k in spy.keys if k.startswith("chunks/") and k != object_key("chunks", digest)]
    assert chunk_gets == [object_key("chunks", chunks[-1].digest)]
    await reader.close()


async def test_sequential_reads_fetch_each_chunk_once(blobs: ObjectStoreBlobService) -> None:
    data = _data(2_000_000, 17)
    digest = await blobs.put(data)
    chunks = await blobs.chunks(digest)
    assert chunks and len(chunks) > 4
    spy = _CountingGets(blobs)
    reader = await blobs.open_read(digest)
    assert reader is not None
    assert await reader.read(10) == data[:10]
    assert [k for k in spy.keys if k.startswith("chunks/")][1:] == [object_key("chunks", chunks[0].digest)]
    assert await reader.read() == data[10:]  # crosses chunks: read-ahead kicks in
    await reader.close()
    fetched = [k for k in spy.keys if k.startswith("chunks/")][1:]
    assert sorted(fetched) == sorted(object_key("chunks", c.digest) for c in chunks)


async def test_raw_chunk_damage_is_an_integrity_error(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    data = _data(500_000, 4)
    digest = await blobs.put(data)
    chunks = await blobs.chunks(digest)
    assert chunks
    path = store_dir / object_key("chunks", chunks[1].digest)
    good = path.read_bytes()
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), good[: len(good) // 2], b"not zstd at all", b""):
        path.write_bytes(bad)
        with pytest.raises(IntegrityError, match=str(chunks[1].digest).replace("+", r"\+")):
            await blobs.read_bytes(digest)
    path.write_bytes(good)
    assert await blobs.read_bytes(digest) == data
    # a single-chunk blob is read from its chunk object, verified too
    small = await blobs.put(b"tiny blob")
    small_path = store_dir / object_key("chunks", small)
    small_path.write_bytes(zstd_compress(b"tiny blot"))
    with pytest.raises(IntegrityError):
        await blobs.read_bytes(small)


async def test_missing_chunk_is_a_storage_error(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    data = _data(500_000, 5)
    digest = await blobs.put(data)
    chunks = await blobs.chunks(digest)
    assert chunks
    (store_dir / object_key("chunks", chunks[-1].digest)).unlink()
    with pytest.raises(StorageError):
        await blobs.read_bytes(digest)
    small = await blobs.put(b"one chunk")
    (store_dir / object_key("chunks", small)).unlink()
    assert await blobs.has(small)  # the index is still there
    with pytest.raises(StorageError):
        await blobs.open_read(small)


async def test_damaged_index(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    data = _data(500_000, 6)
    other = _data(500_000, 7)
    digest = await blobs.put(data)
    other_digest = await blobs.put(other)
    path = store_dir / object_key("blobs", digest)
    path.write_bytes(b"\xff\xff\xff")
    with pytest.raises(IntegrityError):
        await blobs.chunks(digest)
    # an index naming intact chunks of another blob: a full read notices
    path.write_bytes((store_dir / object_key("blobs", other_digest)).read_bytes())
    with pytest.raises(IntegrityError, match="do not add up"):
        await blobs.read_bytes(digest)


async def test_chunks_and_has_for_chunk_digests(blobs: ObjectStoreBlobService) -> None:
    data = _data(400_000, 8)
    digest = await blobs.put(data)
    chunks = await blobs.chunks(digest)
    assert chunks
    for c in chunks:
        assert await blobs.has(c.digest)
        assert await blobs.chunks(c.digest) == []
    assert await blobs.chunks(blake3_digest(b"absent")) is None


# --- writes: dedup, interruption, failure, memory, concurrency ---------------------------


async def test_second_write_uploads_no_chunk(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    data = _data(1_500_000, 9)
    first = blobs.open_write()
    assert isinstance(first, _ObjectStoreBlobWriter)
    await first.write(data)
    digest = await first.close()
    n = len(await blobs.chunks(digest) or [])
    assert first.chunks_uploaded == n > 2
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store_dir.rglob("*") if p.is_file()}
    second = blobs.open_write()
    assert isinstance(second, _ObjectStoreBlobWriter)
    await second.write(data)
    assert await second.close() == digest
    assert second.chunks_uploaded == 0 and second.chunks_skipped == n
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store_dir.rglob("*") if p.is_file()} == stamps
    # changing the tail re-uploads only the chunks that changed
    third = blobs.open_write()
    assert isinstance(third, _ObjectStoreBlobWriter)
    await third.write(data[:-1000] + _data(1000, 10))
    await third.close()
    assert 1 <= third.chunks_uploaded <= 2 and third.chunks_skipped >= n - 2


async def test_abort_midway_leaves_no_index(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    data = _data(3_000_000, 11)
    writer = blobs.open_write()
    assert isinstance(writer, _ObjectStoreBlobWriter)
    for i in range(0, 2_000_000, 100_000):
        await writer.write(data[i : i + 100_000])
    await asyncio.sleep(0.05)
    await writer.abort()
    assert (store_dir / "chunks").is_dir()  # uploads had started
    assert not (store_dir / "blobs").exists()
    digest = blake3_digest(data)
    assert not await blobs.has(digest)
    assert await blobs.chunks(digest) is None
    assert await blobs.open_read(digest) is None


async def test_failing_store_leaves_no_index(blobs: ObjectStoreBlobService, store_dir: Path) -> None:
    store_dir.mkdir(parents=True)
    (store_dir / "chunks").write_bytes(b"a file where the chunk directory should be")
    data = _data(3_000_000, 12)
    writer = blobs.open_write()
    with pytest.raises(StorageError) as info:
        for i in range(0, len(data), 100_000):
            await writer.write(data[i : i + 100_000])
        await writer.close()
    with pytest.raises(type(info.value)):
        await writer.close()  # closing again reports the failure again
    assert not (store_dir / "blobs").exists()
    (store_dir / "chunks").unlink()
    assert not await blobs.has(blake3_digest(data))


@pytest.mark.parametrize("size", [200_000, 3_000_000])  # one job at close; the cutter thread
async def test_failing_index_write_is_a_storage_error(blobs: ObjectStoreBlobService, store_dir: Path, size: int) -> None:
    store_dir.mkdir(parents=True)
    (store_dir / "blobs").write_bytes(b"a file where the index directory should be")
    data = _data(size, 21)
    with pytest.raises(StorageError, match="PUT blobs/"):
        await blobs.put(data)
    assert (store_dir / "chunks").is_dir()  # the chunks were stored, the index was not
    (store_dir / "blobs").unlink()
    assert not await blobs.has(blake3_digest(data))
    assert await blobs.read_bytes(await blobs.put(data)) == data


@pytest.mark.parametrize("size", [200_000, 3_000_000])
async def test_failing_store_small_and_large(blobs: ObjectStoreBlobService, store_dir: Path, size: int) -> None:
    store_dir.mkdir(parents=True)
    (store_dir / "chunks").write_bytes(b"a file where the chunk directory should be")
    data = _data(size, 22)
    with pytest.raises(StorageError, match="chunks/"):
        await blobs.put(data)
    assert not (store_dir / "blobs").exists()


async def test_a_dropped_writer_ends_its_cutter_thread(blobs: ObjectStoreBlobService, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from castore_di.blobservice import objectstore

    monkeypatch.setattr(objectstore, "_CUTTER_POLL", 0.05)
    before = set(threading.enumerate())
    writer = blobs.open_write()
    await writer.write(_data(3_000_000, 23))  # more than a segment: the cutter thread starts
    cutters = [t for t in set(threading.enumerate()) - before if t.name == "castore-objectstore-cut"]
    assert len(cutters) == 1
    del writer  # neither closed nor aborted
    gc.collect()
    cutters[0].join(30)
    assert not cutters[0].is_alive()


async def test_write_memory_is_bounded(tmp_path: Path) -> None:
    service = ObjectStoreBlobService(f"file://{tmp_path}/store")  # default 256 KiB chunks
    total = 64 * 1024 * 1024
    piece = 1024 * 1024
    rng = random.Random(13)
    writer = service.open_write()
    tracemalloc.start()
    try:
        for _ in range(total // piece):
            await writer.write(rng.randbytes(piece))
        await writer.close()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * 1024 * 1024, f"peak {peak} bytes while writing {total}"


async def test_store_jobs_in_flight_are_bounded(tmp_path: Path) -> None:
    # a store in this process: blocking puts in worker threads, one store job per segment
    service = ObjectStoreBlobService(f"file://{tmp_path}/store", avg_chunk_size=TEST_AVG, max_in_flight=2)
    assert service.access.in_process
    lock = threading.Lock()
    in_flight = 0
    most = 0
    real = service.access.put_new_sync

    def put_new_sync(key: str, data: bytes | bytearray | memoryview) -> bool:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            time.sleep(0.002)
            return real(key, data)
        finally:
            with lock:
                in_flight -= 1

    service.access.put_new_sync = put_new_sync  # type: ignore[method-assign]
    data = _data(6_000_000, 14)
    digest = await service.put(data)
    assert await service.read_bytes(digest) == data
    assert 1 <= most <= 2


@pytest.mark.parametrize("server", ["s3_bucket"])
async def test_uploads_in_flight_are_bounded(server: str, request: pytest.FixtureRequest) -> None:
    # a store over the network: async puts from the event loop
    place = request.getfixturevalue(server)
    service = ObjectStoreBlobService(place.url, place.options, avg_chunk_size=TEST_AVG, max_in_flight=3)
    assert not service.access.in_process
    in_flight = 0
    most = 0
    real = service.access.put_new

    async def put_new(key: str, data: bytes) -> bool:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.002)
            return await real(key, data)
        finally:
            in_flight -= 1

    service.access.put_new = put_new  # type: ignore[method-assign]
    data = _data(3_000_000, 14)
    digest = await service.put(data)
    assert await service.read_bytes(digest) == data
    assert 2 <= most <= 3


def _chunk_digests(data: bytes) -> list[B3Digest]:
    from pyfastcdc import FastCDC

    cuts = FastCDC(TEST_AVG, min_size=TEST_AVG // 2, max_size=TEST_AVG * 2).cut_buf(data)
    return [blake3_digest(data[c.offset : c.offset + c.length]) for c in cuts]


async def test_store_failure_midway_is_a_storage_error_and_leaves_no_index(
    blobs: ObjectStoreBlobService, store_dir: Path
) -> None:
    data = _data(6_000_000, 17)
    digests = _chunk_digests(data)
    # a real failure for one chunk in the middle: a file where its shard directory goes
    bad = store_dir / object_key("chunks", digests[len(digests) // 2])
    bad.parent.parent.mkdir(parents=True)
    bad.parent.write_bytes(b"not a directory")
    writer = blobs.open_write()
    with pytest.raises(StorageError, match=digests[len(digests) // 2].hex()):
        for i in range(0, len(data), 100_000):
            await writer.write(data[i : i + 100_000])
        await writer.close()
    assert not (store_dir / "blobs").exists()
    assert not await blobs.has(blake3_digest(data))
    assert len(list((store_dir / "chunks").rglob("*"))) > 1  # other chunks were stored meanwhile
    bad.parent.unlink()
    digest = await blobs.put(data)  # the chunks stored before are reused
    assert await blobs.read_bytes(digest) == data


@pytest.mark.parametrize("server", ["s3_bucket"])
async def test_upload_failure_midway_leaves_no_index(server: str, request: pytest.FixtureRequest) -> None:
    place = request.getfixturevalue(server)
    service = ObjectStoreBlobService(place.url, place.options, avg_chunk_size=TEST_AVG)
    real = service.access.put_new
    calls = 0

    async def put_new(key: str, data: bytes) -> bool:
        nonlocal calls
        calls += 1
        if calls == 10:
            raise StorageError(f"PUT {key} refused")
        return await real(key, data)

    service.access.put_new = put_new  # type: ignore[method-assign]
    data = _data(3_000_000, 18)
    writer = service.open_write()
    with pytest.raises(StorageError, match="refused"):
        for i in range(0, len(data), 100_000):
            await writer.write(data[i : i + 100_000])
        await writer.close()
    assert calls >= 10
    assert not await service.has(blake3_digest(data))
    assert await service.chunks(blake3_digest(data)) is None


async def test_abort_cancels_store_jobs_not_started(tmp_path: Path) -> None:
    service = ObjectStoreBlobService(f"file://{tmp_path}/store", avg_chunk_size=TEST_AVG, max_in_flight=2)
    started = threading.Event()
    release = threading.Event()
    lock = threading.Lock()
    calls = 0
    real = service.access.put_new_sync

    def put_new_sync(key: str, data: bytes | bytearray | memoryview) -> bool:
        nonlocal calls
        with lock:
            calls += 1
        started.set()
        release.wait(30)
        return real(key, data)

    service.access.put_new_sync = put_new_sync  # type: ignore[method-assign]
    data = _data(8_000_000, 19)
    writer = service.open_write()

    async def write_all() -> None:
        for i in range(0, len(data), 100_000):
            await writer.write(data[i : i + 100_000])

    task = asyncio.create_task(write_all())
    assert await asyncio.to_thread(started.wait, 30)
    # the pipeline is jammed: two store jobs inside a put, the cutter and the writer waiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    aborting = asyncio.create_task(writer.abort())
    await asyncio.sleep(0)
    release.set()
    await aborting
    assert calls <= 2 < len(_chunk_digests(data))  # each job stopped after its current put
    assert len([p for p in (tmp_path / "store").rglob("*") if p.is_file()]) == calls
    assert not (tmp_path / "store" / "blobs").exists()
    with pytest.raises(ClosedError):
        await writer.write(b"more")


@pytest.mark.parametrize("server", ["s3_bucket"])
async def test_abort_cancels_uploads_in_flight(server: str, request: pytest.FixtureRequest) -> None:
    place = request.getfixturevalue(server)
    service = ObjectStoreBlobService(place.url, place.options, avg_chunk_size=TEST_AVG, max_in_flight=2)
    started = asyncio.Event()
    calls = 0
    cancelled = 0

    async def put_new(key: str, data: bytes) -> bool:
        nonlocal calls, cancelled
        calls += 1
        started.set()
        try:
            await asyncio.Event().wait()  # a request that never answers
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return False

    service.access.put_new = put_new  # type: ignore[method-assign]
    data = _data(12_000_000, 20)  # more than the pipeline holds: the writer waits
    writer = service.open_write()

    async def write_all() -> None:
        for i in range(0, len(data), 100_000):
            await writer.write(data[i : i + 100_000])

    task = asyncio.create_task(write_all())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.abort()
    assert 1 <= calls == cancelled <= 2  # every put started was cancelled, none started after
    assert not await service.has(blake3_digest(data))


# --- the same write-path guarantees on the real servers -----------------------------------


@pytest.mark.parametrize("server", ["s3_bucket", "azure_container"])
async def test_server_dedup_abort_and_create_only(server: str, request: pytest.FixtureRequest) -> None:
    place = request.getfixturevalue(server)
    service = ObjectStoreBlobService(place.url, place.options, avg_chunk_size=TEST_AVG)
    data = _data(1_000_000, 15)
    first = service.open_write()
    assert isinstance(first, _ObjectStoreBlobWriter)
    await first.write(data)
    digest = await first.close()
    second = service.open_write()
    assert isinstance(second, _ObjectStoreBlobWriter)
    await second.write(data)
    assert await second.close() == digest
    assert first.chunks_uploaded > 2 and second.chunks_uploaded == 0
    # create-only puts: an existing object is never replaced
    key = object_key("blobs", digest)
    before = await service.access.get(key)
    assert not await service.access.put_new(key, b"something else")
    assert await service.access.get(key) == before
    # an aborted write leaves no index
    other = _data(2_000_000, 16)
    writer = service.open_write()
    for i in range(0, 1_500_000, 100_000):
        await writer.write(other[i : i + 100_000])
    await writer.abort()
    assert not await service.has(blake3_digest(other))
    assert await service.read_bytes(digest) == data


def test_config_import_loads_no_heavy_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from castore_di.blobservice.objectstore import ObjectStoreBlobServiceConfig as B\n"
        "from castore_di.directoryservice.objectstore import ObjectStoreDirectoryServiceConfig as D\n"
        "B.from_url('objectstore+s3://b/p?region=x'); D(object_store_url='memory:///')\n"
        "print(sorted(m for m in ('obstore', 'zstandard', 'pyfastcdc') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
