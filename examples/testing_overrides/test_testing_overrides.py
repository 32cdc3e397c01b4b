"""Pytest patterns for overriding castore providers.

``blobservices.default`` is ``combined`` (``local`` in front of ``remote``); the tests put
a memory service in place of ``remote`` and check that ``default`` (a dependent) reads
through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from dependency_injector import providers

import castore_di
from castore_di.composition.host import init_resources, shutdown_resources
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.memory import MemoryBlobService

from catalog import Catalog, create_container, load


@pytest.fixture
async def container() -> AsyncIterator[castore_di.CastoreContainer]:
    """A fresh container per test; closed afterwards."""
    async with load() as c:
        yield c


@pytest.fixture
async def fake_remote(container: castore_di.CastoreContainer) -> AsyncIterator[MemoryBlobService]:
    """Pattern 1 as a fixture: ``blobservices.remote`` is a memory service during the test."""
    remote = MemoryBlobService()
    with container.override_instance("blobservices.remote", remote):
        yield remote


async def test_override_instance(container: castore_di.CastoreContainer) -> None:
    remote = MemoryBlobService()
    digest = await remote.put(b"only on the remote")
    with container.override_instance("blobservices.remote", remote):
        catalog = Catalog(container.blob_service())  # a dependent of the overridden provider
        assert await catalog.link("readme", digest)
        assert await catalog.get("readme") == b"only on the remote"
    # Leaving the block resets the dependents: a new `default` no longer sees the fake remote.
    default = container.blob_service()
    assert isinstance(default, CombinedBlobService)
    assert default.remote is not remote


async def test_provider_override_and_reset(container: castore_di.CastoreContainer) -> None:
    """Pattern 2: dependency-injector's own ``override``; reset cached dependents yourself."""
    before = container.blob_service()  # cached singleton built with the real remote
    remote = MemoryBlobService()
    provider = container.provider("blobservices.remote")
    with provider.override(providers.Object(remote)):
        container.reset("blobservices.remote")  # drops `remote` and `default` (its dependent)
        during = container.blob_service()
        assert during is not before
        assert isinstance(during, CombinedBlobService) and during.remote is remote
    container.reset("blobservices.remote")
    after = container.blob_service()
    assert isinstance(after, CombinedBlobService) and after.remote is not remote


async def test_without_reset_cached_dependents_keep_the_old_service(container: castore_di.CastoreContainer) -> None:
    """Why the reset matters: singletons created before an override keep what they got."""
    before = container.blob_service()
    with container.provider("blobservices.remote").override(providers.Object(MemoryBlobService())):
        assert container.blob_service() is before


async def test_fixture_pattern(container: castore_di.CastoreContainer, fake_remote: MemoryBlobService) -> None:
    digest = await fake_remote.put(b"seeded by the test")
    catalog = Catalog(container.blob_service())
    assert await catalog.link("seed", digest)
    # A read through `default` copies the blob into `local`, as `combined` promises.
    assert await catalog.get("seed") == b"seeded by the test"
    assert await container.blob_service("local").has(digest)


async def test_writes_stay_local(container: castore_di.CastoreContainer, fake_remote: MemoryBlobService) -> None:
    catalog = Catalog(container.blob_service())
    digest = await catalog.add("new", b"written by the app")
    assert await container.blob_service("local").has(digest)
    assert not await fake_remote.has(digest)


async def test_with_the_plugin_fixture(
    container: castore_di.CastoreContainer, castore_memory_container: castore_di.CastoreContainer
) -> None:
    """Pattern 3: castore_di's pytest plugin provides ready memory containers to swap in."""
    replacement = castore_memory_container.blob_service()
    with container.override_instance("blobservices.remote", replacement):
        digest = await replacement.put(b"from the plugin's container")
        assert await Catalog(container.blob_service()).link("plugin", digest)


async def test_override_keeps_what_was_stored_before(container: castore_di.CastoreContainer) -> None:
    """Pattern 4: the original instance comes back after the block, with its data."""
    local = container.blob_service("local")
    digest = await local.put(b"stored before the override")
    default = container.blob_service()
    with container.override_instance("blobservices.local", MemoryBlobService()):
        assert container.blob_service() is not default
        assert not await container.blob_service("local").has(digest)
    assert container.blob_service("local") is local and await local.has(digest)
    assert container.blob_service() is default


async def test_host_configuration_per_test() -> None:
    """Pattern 5: the castore config comes from the host's Configuration; a test replaces it."""
    app = create_container()
    with app.config.castore.override({"blobservices": {"default": "memory://"}}):
        catalog = app.catalog()  # first need: the overridden config is read and validated
        await catalog.add("note", b"no server needed")
        assert await catalog.get("note") == b"no server needed"
        assert isinstance(app.castore().blob_service(), MemoryBlobService)
    await app.castore().aclose()


async def test_host_configuration_from_dict_before_first_use() -> None:
    app = create_container()
    app.config.from_dict({"castore": {"blobservices": {
        "remote": "memory://", "local": "memory://",
        "default": {"type": "combined", "local": "local", "remote": "remote"},
    }}})
    await init_resources(app)
    try:
        assert isinstance(app.castore().blob_service(), CombinedBlobService)
        assert await app.catalog().add("x", b"through the host lifecycle")
    finally:
        await shutdown_resources(app)
