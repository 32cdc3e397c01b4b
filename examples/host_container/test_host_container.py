"""Tests of the host_container example: wiring, per-instance services, overrides, shutdown."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest

from castore_di import CastoreContainer, load_container
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import blake3_digest

import host_app
from host_app import Application, Archive


@pytest.fixture
async def app() -> AsyncIterator[Application]:
    application = Application()
    application.wire(modules=[sys.modules[host_app.__name__]])
    yield application
    application.unwire()
    await application.castore().aclose()


async def test_wired_functions_share_the_embedded_services(app: Application) -> None:
    root = await host_app.archive_files({"a.txt": b"alpha", "b.txt": b"beta"})
    assert await host_app.blob_exists(blake3_digest(b"alpha"))
    archive = app.archive()
    assert archive.blobs is app.castore().blob_service()
    assert archive.directories is app.castore().directory_service()
    assert await archive.load(root) == {"a.txt": b"alpha", "b.txt": b"beta"}


async def test_each_host_instance_has_its_own_services(app: Application) -> None:
    other = Application()
    try:
        assert other.castore() is not app.castore()
        assert other.archive().blobs is not app.archive().blobs
        digest = await app.archive().blobs.put(b"only in app")
        assert not await other.archive().blobs.has(digest)
    finally:
        await other.castore().aclose()


async def test_override_an_embedded_instance(app: Application) -> None:
    replacement = MemoryBlobService()
    castore: CastoreContainer = app.castore()
    with castore.override_instance("blobservices.default", replacement):
        app.archive.reset()  # host singletons are the host's to reset
        assert app.archive().blobs is replacement
        await host_app.archive_files({"x": b"seen by the replacement"})
        assert await replacement.has(blake3_digest(b"seen by the replacement"))
    app.archive.reset()
    assert app.archive().blobs is not replacement


async def test_replace_the_whole_castore_container_at_construction() -> None:
    config = {"blobservices": {"default": "memory://"}, "directoryservices": {"default": "memory://"}}
    replacement = load_container(config)
    app = Application(castore=replacement)
    try:
        assert app.archive().blobs is replacement.blob_service()
    finally:
        await replacement.aclose()
        await app.castore().aclose()


async def test_shutdown_closes_the_embedded_services(app: Application) -> None:
    archive: Archive = app.archive()
    await archive.blobs.put(b"x")
    await app.castore().aclose()
    assert app.archive() is archive  # host singletons are the host's; castore's were reset
    assert app.castore().blob_service() is not archive.blobs
