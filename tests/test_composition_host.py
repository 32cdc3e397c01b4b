"""castore_di.composition.host: a castore container as a slot of a host container."""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject

from castore_di import BlobService, ConfigError, DirectoryService, load_container
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.composition.container import CastoreContainer
from castore_di.composition.host import CastoreContainerProvider, castore_container, fresh_copy

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


class PlainHost(containers.DeclarativeContainer):
    """A stock ``providers.Container`` slot: works because CastoreContainer deep-copies fresh."""

    castore = providers.Container(lambda: load_container(CONFIG))  # type: ignore[arg-type]
    holder = providers.Singleton(Holder, blobs=castore.blobservices.default, directories=castore.directoryservices.default)


def test_a_plain_container_provider_holds_a_castore_container() -> None:
    first, second = PlainHost(), PlainHost()
    assert first.castore() is not second.castore() is not PlainHost.castore()
    assert isinstance(first.castore(), CastoreContainer)
    assert first.holder().blobs is first.castore().blob_service()
    assert first.holder().directories is first.castore().directory_service()
    assert second.holder().blobs is not first.holder().blobs
    assert second.castore().graph is first.castore().graph
    assert first.castore().parent is first.castore  # the host's slot, not the class's


def test_plain_slot_wires_by_string_id() -> None:
    host = PlainHost()
    host.wire(modules=[sys.modules[__name__]])
    try:
        blobs, holder = injected()
        assert blobs is host.castore().blob_service() is holder.blobs
    finally:
        host.unwire()


async def test_deepcopy_is_a_fresh_container_with_overrides() -> None:
    original = load_container(CONFIG)
    replacement = MemoryBlobService()
    original.provider("blobservices.local").override(providers.Object(replacement))
    used = original.blob_service()
    copied = copy.deepcopy(original)
    assert isinstance(copied, CastoreContainer) and copied.graph is original.graph
    combined = copied.blob_service()
    assert combined is not used
    assert isinstance(combined, CombinedBlobService) and combined.local is replacement
    assert copied.blobservices.default is not original.blobservices.default
    assert copied.blobservices.default() is combined
    original.provider("blobservices.local").reset_override()
    assert copied.provider("blobservices.local").overridden  # the copy keeps its own
    await copied.aclose()
    assert original.blob_service() is used  # closing the copy leaves the original alone
    await original.aclose()


def test_copy_order_host_providers_after_the_container() -> None:
    """Providers copied after the container are rewired; an orphan copy fails clearly."""
    castore = load_container(CONFIG)
    slot = providers.Container(container=castore)  # type: ignore[var-annotated]
    holder = providers.Singleton(Holder, blobs=castore.provider("blobservices.default"),
                                 directories=castore.provider("directoryservices.default"))
    copied = providers.deepcopy({"slot": slot, "holder": holder})
    fresh = copied["slot"]()
    assert fresh is not castore
    assert copied["holder"]().blobs is fresh.blob_service()
    assert copied["holder"]().directories is fresh.directory_service()
    for wrong in ({"holder": holder, "slot": slot}, castore.provider("blobservices.local")):
        with pytest.raises(Exception) as exc:  # dependency-injector wraps ours, chained
            providers.deepcopy(wrong)
        causes = [exc.value]
        while causes[-1].__cause__ is not None or causes[-1].__context__ is not None:
            causes.append(causes[-1].__cause__ or causes[-1].__context__)  # type: ignore[arg-type]
        ours = [e for e in causes if isinstance(e, ConfigError)]
        assert ours and "deep-copied before its container" in str(ours[0]), causes


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
