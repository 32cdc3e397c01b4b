"""Tests of the host_container example: host config, lifecycle, wiring, overrides, metrics."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest

from castore_di import CastoreContainer, load_container
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.composition.host import init_resources, shutdown_resources
from castore_di.digests import blake3_digest
from castore_di.metrics import MeteredBlobService

import host_app
from host_app import Application, Archive


@pytest.fixture
async def app() -> AsyncIterator[Application]:
    """The application started and stopped through the host's own resource lifecycle."""
    application = host_app.create_application()
    await init_resources(application)  # builds the castore services
    application.wire(modules=[sys.modules[host_app.__name__]])
    yield application
    application.unwire()
    await shutdown_resources(application)  # closes them, dependents first


async def test_wired_functions_share_the_embedded_services(app: Application) -> None:
    root = await host_app.archive_files({"a.txt": b"alpha", "b.txt": b"beta"})
    assert await host_app.blob_exists(blake3_digest(b"alpha"))
    archive = app.archive()
    assert archive.blobs is app.castore().blob_service()
    assert archive.directories is app.castore().directory_service()
    assert await archive.load(root) == {"a.txt": b"alpha", "b.txt": b"beta"}


async def test_per_test_config_from_dict() -> None:
    """The castore config comes from the host's Configuration, read when first needed."""
    app = Application()
    app.config.from_dict({"castore": {
        "blobservices": {"local": "memory://", "default": {"type": "combined", "local": "local", "remote": "memory://"}},
        "directoryservices": {"default": "memory://"},
    }})
    await init_resources(app)
    try:
        blobs = app.archive().blobs
        assert isinstance(blobs, MeteredBlobService)  # the host records metrics: services are wrapped
        assert isinstance(blobs.inner, CombinedBlobService)
    finally:
        await shutdown_resources(app)


async def test_each_host_instance_has_its_own_services(app: Application) -> None:
    other = host_app.create_application()
    await init_resources(other)
    try:
        assert other.castore() is not app.castore()
        assert other.archive().blobs is not app.archive().blobs
        digest = await app.archive().blobs.put(b"only in app")
        assert not await other.archive().blobs.has(digest)
    finally:
        await shutdown_resources(other)


async def test_override_an_embedded_instance(app: Application) -> None:
    replacement = MemoryBlobService()
    castore: CastoreContainer = app.castore()
    before = app.archive().blobs
    digest = await before.put(b"stored before the override")
    with castore.override_instance("blobservices.default", replacement):
        app.archive.reset()  # host singletons are the host's to reset
        assert app.archive().blobs is replacement
        await host_app.archive_files({"x": b"seen by the replacement"})
        assert await replacement.has(blake3_digest(b"seen by the replacement"))
    app.archive.reset()
    assert app.archive().blobs is before  # the original comes back, with its data
    assert await app.archive().blobs.has(digest)


async def test_replace_the_whole_castore_container_at_construction() -> None:
    config = {"blobservices": {"default": "memory://"}, "directoryservices": {"default": "memory://"}}
    replacement = load_container(config)
    app = Application(castore=replacement)
    try:
        assert app.archive().blobs is replacement.blob_service()
    finally:
        await replacement.aclose()


async def test_shutdown_closes_the_embedded_services(app: Application) -> None:
    archive: Archive = app.archive()
    await archive.blobs.put(b"x")
    await shutdown_resources(app)
    assert app.archive() is archive  # host singletons are the host's; castore's were closed
    assert app.castore().blob_service() is not archive.blobs
    await init_resources(app)  # the fixture shuts down again


async def test_operations_are_measured(app: Application) -> None:
    await host_app.archive_files({"m.txt": b"measured"})
    text = app.metrics().exposition().decode()
    assert 'castore_written_bytes_total{instance="blobservices.default",type="memory"} 8.0' in text
    assert 'castore_operations_total{instance="directoryservices.default",operation="put_multiple",type="memory"}' in text \
        or 'castore_operations_total{instance="directoryservices.default",operation="put",type="memory"} 1.0' in text
