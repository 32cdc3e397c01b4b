"""castore_di.composition.embedding: a castore container as a slot of a host container."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject

from castore_di import BlobService, DirectoryService, load_container
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.composition.embedding import CastoreContainerProvider, castore_container, fresh_copy

CONFIG: dict[str, Any] = {
    "blobservices": {"local": {"type": "memory"}, "default": {"type": "combined", "local": "local", "remote": "memory://"}},
    "directoryservices": {"default": "memory://"},
}


class Holder:
    def __init__(self, blobs: BlobService, directories: DirectoryService) -> None:
        self.blobs = blobs
        self.directories = directories


class Host(containers.DeclarativeContainer):
    castore = castore_container(CONFIG)
    holder = providers.Singleton(Holder, blobs=castore.blobservices.default, directories=castore.directory())


@inject
def injected(blobs: BlobService = Provide["castore.blobservices.default"], holder: Holder = Provide["holder"]) -> tuple[BlobService, Holder]:
    return blobs, holder


def test_a_plain_container_provider_cannot_hold_a_castore_container() -> None:
    """Why the library provides a slot: deep-copying a CastoreContainer fails."""

    class Plain(containers.DeclarativeContainer):
        castore = providers.Container(lambda: load_container(CONFIG))  # type: ignore[arg-type]

    with pytest.raises(Exception, match="copy"):
        Plain()


def test_host_instances_wire_and_get_their_own_services() -> None:
    first, second = Host(), Host()
    assert isinstance(first.castore, CastoreContainerProvider)
    first.wire(modules=[sys.modules[__name__]])
    try:
        blobs, holder = injected()
        assert blobs is first.castore().blob_service() is holder.blobs
        assert isinstance(blobs, CombinedBlobService)
        assert holder.directories is first.castore().directory_service()
    finally:
        first.unwire()
    assert second.holder().blobs is not first.holder().blobs
    assert second.castore().graph is first.castore().graph  # validated once, shared read-only


def test_references_inside_the_castore_container_are_rewired() -> None:
    host = Host()
    local = host.castore().blob_service("local")
    combined = host.castore().blob_service()
    assert isinstance(combined, CombinedBlobService) and combined.local is local


def test_class_level_overrides_are_carried_to_instances() -> None:
    replacement = MemoryBlobService()
    with Host.castore.castore.provider("blobservices.local").override(providers.Object(replacement)):
        combined = Host().castore().blob_service()
        assert isinstance(combined, CombinedBlobService) and combined.local is replacement
    combined = Host().castore().blob_service()
    assert isinstance(combined, CombinedBlobService) and combined.local is not replacement


async def test_fresh_copy_shares_nothing() -> None:
    original = load_container(CONFIG)
    copy = fresh_copy(original)
    assert copy.blob_service() is not original.blob_service()
    digest = await original.blob_service().put(b"x")
    assert not await copy.blob_service().has(digest)
    await original.aclose()
    await copy.aclose()


def test_config_errors_surface_at_class_definition() -> None:
    from castore_di import ConfigError

    with pytest.raises(ConfigError, match="blobservices.default"):
        castore_container({"blobservices": {"default": {"type": "nope"}}})
