"""Tests of the FastAPI example: the store overridden by memory services, the lifespan, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import castore_di
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import blake3_digest

import blob_api


@pytest.fixture
def store() -> MemoryBlobService:
    return MemoryBlobService()


@pytest.fixture
def client(store: MemoryBlobService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[TestClient]:
    """The app built from its default config, with ``blobservices.default`` overridden."""
    monkeypatch.setenv("CASTORE_DATA_DIR", str(tmp_path))  # the lifespan builds the other instances
    monkeypatch.delenv("CASTORE_CONFIG", raising=False)
    application = blob_api.default_application()
    with application.castore().override_instance("blobservices.default", store):
        with TestClient(blob_api.create_app(application)) as test_client:
            yield test_client
    application.unwire()


async def test_upload_then_download(client: TestClient, store: MemoryBlobService) -> None:
    data = bytes(range(256)) * 5000
    response = client.post("/blobs", content=data)
    assert response.status_code == 201
    body = response.json()
    assert body == {"digest": str(blake3_digest(data)), "size": len(data)}
    assert await store.read_bytes(blake3_digest(data)) == data  # it went to the overriding store
    download = client.get(f"/blobs/{body['digest']}")
    assert download.status_code == 200
    assert download.headers["content-length"] == str(len(data))
    assert download.content == data


def test_download_accepts_hex_digests(client: TestClient) -> None:
    digest = client.post("/blobs", content=b"hex").json()["digest"]
    assert client.get(f"/blobs/{castore_di.B3Digest.parse(digest).hex()}").content == b"hex"


async def test_blob_put_directly_is_served(client: TestClient, store: MemoryBlobService) -> None:
    digest = await store.put(b"seeded")
    assert client.get(f"/blobs/{digest}").content == b"seeded"


def test_absent_blob_is_404(client: TestClient) -> None:
    response = client.get(f"/blobs/{blake3_digest(b'never uploaded')}")
    assert response.status_code == 404


def test_malformed_digest_is_400(client: TestClient) -> None:
    assert client.get("/blobs/not-a-digest").status_code == 400


def test_empty_upload(client: TestClient) -> None:
    body = client.post("/blobs", content=b"").json()
    assert body == {"digest": str(blake3_digest(b"")), "size": 0}
    assert client.get(f"/blobs/{body['digest']}").content == b""


def test_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without overrides: ``CASTORE_CONFIG`` names containers/memory.yaml."""
    monkeypatch.setenv("CASTORE_CONFIG", str(blob_api.CONTAINERS / "memory.yaml"))
    app = blob_api.create_app()
    with TestClient(app) as client:
        digest = client.post("/blobs", content=b"hello").json()["digest"]
        assert client.get(f"/blobs/{digest}").content == b"hello"
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert 'castore_written_bytes_total{instance="blobservices.default",type="memory"} 5.0' in metrics.text
        assert 'castore_operations_total{instance="blobservices.default",operation="open_read",type="memory"} 1.0' \
            in metrics.text
    app.state.container.unwire()


def test_config_from_the_host_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test gives the castore config through the application's own Configuration."""
    application = blob_api.Application()
    application.config.from_dict({"castore": {"blobservices": {"default": "memory://"}}})
    with TestClient(blob_api.create_app(application)) as client:
        digest = client.post("/blobs", content=b"from the host config").json()["digest"]
        assert client.get(f"/blobs/{digest}").content == b"from the host config"
        castore = application.castore()
        served = castore.blob_service()
    application.unwire()
    # the lifespan's shutdown closed the services: a new instance is built on next use
    assert castore.blob_service() is not served


async def test_local_config_end_to_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without overrides: the default containers/local.yaml, in a temporary data directory."""
    monkeypatch.setenv("CASTORE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CASTORE_CONFIG", raising=False)
    app = blob_api.create_app()
    with TestClient(app) as client:
        digest = client.post("/blobs", content=b"on disk").json()["digest"]
        assert client.get(f"/blobs/{digest}").content == b"on disk"
    app.state.container.unwire()
    # The lifespan closed the store; a new container over the same directory finds the blob.
    async with castore_di.load_container(blob_api.CONTAINERS / "local.yaml") as again:
        assert await again.blob_service().read_bytes(castore_di.B3Digest.parse(digest)) == b"on disk"
