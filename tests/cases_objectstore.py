"""Conformance cases for the objectstore backend (see tests/cases.py).

The same service runs on the local filesystem, on obstore's memory store, on S3 (moto's
server) and on Azure Blob (Azurite); the servers are real processes started by the
fixtures in tests/servers_s3.py and tests/servers_azure.py. GCS has no local emulator that
accepts obstore's uploads, so it is covered by config and URL tests only
(tests/test_objectstore.py). A small ``avg_chunk_size`` makes the suites' 3 MiB blobs
span many chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from castore_di.digests import B3Digest
from castore_di._objectstore.store import object_key, zstd_compress, zstd_decompress
from tests.cases_base import Case, flip_byte

__all__ = ["BLOB_CASES", "DIRECTORY_CASES", "ObjectStoreBlobBackdoor", "ObjectStoreDirectoryBackdoor", "TEST_AVG"]

TEST_AVG = 65536


class ObjectStoreBlobBackdoor:
    """Rewrites a stored chunk of a blob (its middle chunk) with one byte changed."""

    def __init__(self, service: Any) -> None:
        self.access = service.access

    async def chunk_of(self, digest: B3Digest) -> B3Digest:
        from castore_di.proto import rpc_blobstore_pb2

        raw = await self.access.get(object_key("blobs", digest))
        index = rpc_blobstore_pb2.StatBlobResponse()
        index.ParseFromString(raw or b"")
        if not index.chunks:
            return digest  # a blob of one chunk is stored as that chunk
        return B3Digest(index.chunks[len(index.chunks) // 2].digest)

    async def corrupt(self, digest: B3Digest) -> None:
        key = object_key("chunks", await self.chunk_of(digest))
        stored = await self.access.get(key)
        assert stored is not None, f"no chunk object at {key}"
        # Change the content, not the compression, so only the digest check can notice.
        data = zstd_decompress(stored, 1 << 30, key)
        await self.access.put(key, zstd_compress(flip_byte(data)))


class ObjectStoreDirectoryBackdoor:
    """Rewrites a stored closure with one byte of its root frame changed."""

    def __init__(self, service: Any) -> None:
        self.access = service.access

    async def corrupt(self, digest: B3Digest) -> None:
        key = object_key("dirs", digest)
        stored = await self.access.get(key)
        assert stored is not None, f"no closure object at {key}"
        frames = zstd_decompress(stored, 1 << 30, key)
        root_end = 4 + int.from_bytes(frames[:4], "big")
        changed = frames[: root_end - 1] + bytes([frames[root_end - 1] ^ 0x5A]) + frames[root_end:]
        await self.access.put(key, zstd_compress(changed))


def _file_url(request: pytest.FixtureRequest, name: str) -> str:
    tmp = request.getfixturevalue("tmp_path")
    return f"file://{tmp}/{name}"


def _server(fixture: str) -> Callable[[pytest.FixtureRequest], tuple[str, dict[str, str]]]:
    def get(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
        place = request.getfixturevalue(fixture)
        return place.url, place.options

    return get


def _blob_case(case_id: str, where: Callable[[pytest.FixtureRequest], tuple[str, dict[str, str]]]) -> Case:
    def instances(request: pytest.FixtureRequest) -> dict[str, Any]:
        url, options = where(request)
        return {
            "default": {
                "type": "objectstore",
                "object_store_url": url,
                "object_store_options": options,
                "avg_chunk_size": TEST_AVG,
            }
        }

    return Case(case_id, ("objectstore",), instances, lambda s, r: ObjectStoreBlobBackdoor(s))


def _directory_case(case_id: str, where: Callable[[pytest.FixtureRequest], tuple[str, dict[str, str]]]) -> Case:
    def instances(request: pytest.FixtureRequest) -> dict[str, Any]:
        url, options = where(request)
        return {"default": {"type": "objectstore", "object_store_url": url, "object_store_options": options}}

    return Case(case_id, ("objectstore",), instances, lambda s, r: ObjectStoreDirectoryBackdoor(s))


BLOB_CASES: list[Case] = [
    _blob_case("objectstore-file", lambda r: (_file_url(r, "blobs"), {})),
    _blob_case("objectstore-memory", lambda r: ("memory:///", {})),
    _blob_case("objectstore-s3", _server("s3_bucket")),
    _blob_case("objectstore-azure", _server("azure_container")),
]

DIRECTORY_CASES: list[Case] = [
    _directory_case("objectstore-file", lambda r: (_file_url(r, "dirs"), {})),
    # The URL form, as the reference's conformance matrix uses it.
    Case(
        "objectstore-memory",
        ("objectstore",),
        lambda r: {"default": "objectstore+memory://"},
        lambda s, r: ObjectStoreDirectoryBackdoor(s),
    ),
    _directory_case("objectstore-s3", _server("s3_bucket")),
    _directory_case("objectstore-azure", _server("azure_container")),
]
