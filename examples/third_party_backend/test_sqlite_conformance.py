"""castore_di's blob conformance suite, run against the sqlite backend.

The service is built through the config path (a registry with the type added), as
castore_di builds every backend; the backdoor corrupts stored bytes behind the API.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from castore_di import BlobService, ConfigError, default_registry, load_container
from castore_di.composition import Registry
from castore_di.digests import B3Digest
from castore_di.testing.blob_conformance import BlobServiceConformance

from castore_sqlite import SqliteBlobService, SqliteBlobServiceConfig


@pytest.fixture
def registry() -> Registry:
    """The default registry plus ``sqlite``, as the entry point would add it once installed."""
    registry = default_registry().copy()
    registry.register("blobservices", "sqlite", SqliteBlobServiceConfig, replace=True)
    return registry


class SqliteBackdoor:
    """Reaches the database file behind the service."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def corrupt(self, digest: B3Digest) -> None:
        def flip() -> None:
            with sqlite3.connect(self.path) as conn:
                (data,) = conn.execute("SELECT data FROM blobs WHERE digest = ?", (bytes(digest),)).fetchone()
                conn.execute("UPDATE blobs SET data = ? WHERE digest = ?", (bytes([data[0] ^ 1]) + data[1:], bytes(digest)))

        await asyncio.to_thread(flip)


class TestSqliteBlobService(BlobServiceConformance):
    @pytest.fixture
    async def blob_service(self, tmp_path: Path, registry: Registry) -> AsyncIterator[BlobService]:
        config = {"blobservices": {"default": {"type": "sqlite", "path": str(tmp_path / "blobs.sqlite3")}}}
        async with load_container(config, registry) as container:
            yield container.blob_service()

    @pytest.fixture
    def backdoor(self, tmp_path: Path) -> SqliteBackdoor:
        return SqliteBackdoor(tmp_path / "blobs.sqlite3")


async def test_url_form(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite://{tmp_path}/by-url.sqlite3"
    async with load_container({"blobservices": {"default": url}}, registry) as container:
        service = container.blob_service()
        assert isinstance(service, SqliteBlobService)
        assert service.path == f"{tmp_path}/by-url.sqlite3"
        digest = await service.put(b"via URL")
    # A second container over the same file sees the blob: it is on disk.
    async with load_container({"blobservices": {"default": url}}, registry) as container:
        assert await container.blob_service().read_bytes(digest) == b"via URL"


def test_bad_config_is_refused(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="blobservices.default"):
        load_container({"blobservices": {"default": {"type": "sqlite", "path": ""}}}, registry)
    with pytest.raises(ConfigError, match="unknown"):
        load_container({"blobservices": {"default": {"type": "sqlite", "size": 1}}}, registry)
