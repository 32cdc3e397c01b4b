"""A castore slot configured from the host's ``providers.Configuration``."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject

from castore_di import BlobService, load_container
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.composition.container import CastoreContainer
from castore_di.composition.host import LazyCastoreSlot, castore_container
from castore_di.errors import CycleError, UnknownInstanceError, UnknownTypeError
from tests import recording

MEMORY: dict[str, Any] = {"blobservices": {"default": "memory://"}, "directoryservices": {"default": "memory://"}}
COMBINED: dict[str, Any] = {"blobservices": {
    "local": {"type": "memory"}, "remote": {"type": "memory"},
    "default": {"type": "combined", "local": "local", "remote": "remote"},
}}


class Holder:
    def __init__(self, blobs: BlobService) -> None:
        self.blobs = blobs


class Host(containers.DeclarativeContainer):
    config = providers.Configuration()
    castore = castore_container(config.castore)
    holder = providers.Singleton(Holder, blobs=castore.blob("default"))
    by_attribute = providers.Singleton(Holder, blobs=castore.blobservices.default)


class WholeConfigHost(containers.DeclarativeContainer):
    config = providers.Configuration()
    castore = castore_container(config)


@inject
def injected(blobs: BlobService = Provide["castore.blobservices.default"]) -> BlobService:
    return blobs


def test_config_read_when_first_needed_per_host_instance() -> None:
    first, second = Host(), Host()
    assert isinstance(first.castore, LazyCastoreSlot)
    first.config.from_dict({"castore": MEMORY})
    second.config.from_dict({"castore": COMBINED})
    assert isinstance(first.holder().blobs, MemoryBlobService)
    assert isinstance(second.holder().blobs, CombinedBlobService)  # each instance reads its own config
    assert first.holder().blobs is first.castore().blob_service()
    assert first.by_attribute().blobs is first.holder().blobs
    assert isinstance(first.castore(), CastoreContainer) and first.castore() is not second.castore()


def test_option_override_per_test() -> None:
    host = Host()
    host.config.from_dict({"castore": MEMORY})
    with host.config.castore.override(COMBINED):
        assert isinstance(host.castore().blob_service(), CombinedBlobService)


def test_whole_configuration_as_source() -> None:
    host = WholeConfigHost()
    host.config.from_dict(MEMORY)
    assert isinstance(host.castore().blob_service(), MemoryBlobService)


def test_wiring_by_string_id() -> None:
    host = Host()
    host.config.from_dict({"castore": MEMORY})
    host.wire(modules=[sys.modules[__name__]])
    try:
        assert injected() is host.castore().blob_service()
    finally:
        host.unwire()


@pytest.mark.parametrize(("castore", "error", "message"), [
    ({"blobservices": {"default": {"type": "nope"}}}, UnknownTypeError,
     "config.castore.blobservices.default.type: unknown type 'nope'"),
    ({"blobservices": {"default": {"type": "combined", "local": "x", "remote": "memory://"}}}, UnknownInstanceError,
     "config.castore.blobservices.default.local: unknown instance 'x'"),
    ({"blobservices": {"a": {"type": "combined", "local": "b", "remote": "b"},
                       "b": {"type": "combined", "local": "a", "remote": "a"}}}, CycleError,
     "config.castore: reference cycle: blobservices.a -> blobservices.b -> blobservices.a"),
    (None, Exception, "config.castore: no castore configuration"),
])
def test_errors_name_the_path_in_the_host_config(castore: Any, error: type[Exception], message: str) -> None:
    host = Host()
    host.config.from_dict({"castore": castore, "other": 1})
    with pytest.raises(error, match=message.replace(".", r"\.")):
        host.holder()


def test_errors_before_any_service_is_built() -> None:
    host = Host()
    host.config.from_dict({"castore": {"blobservices": {"default": "memory://", "bad": {"type": "memory", "x": 1}}}})
    with pytest.raises(Exception, match=r"config\.castore\.blobservices\.bad: unknown field 'x'"):
        host.holder()


async def test_host_lifecycle_with_configuration() -> None:
    host = Host()
    host.config.from_dict({"castore": COMBINED})
    await host.init_resources()
    castore = host.castore()
    default = castore.blob_service()
    assert isinstance(default, CombinedBlobService)
    assert host.holder().blobs is default
    await host.shutdown_resources()
    assert castore.blob_service() is not default  # closed and dropped; a new one on next use


def test_replace_the_castore_container_at_construction() -> None:
    replacement = load_container(MEMORY)
    host = Host(castore=replacement)
    assert host.holder().blobs is replacement.blob_service()


class RecordingHost(containers.DeclarativeContainer):
    config = providers.Configuration()
    castore = castore_container(config.castore, recording.registry())


def test_sync_host_lifecycle_closes_dependents_first_once() -> None:
    recording.EVENTS.clear()
    host = RecordingHost()
    host.config.from_dict({"castore": {"blobservices": {
        "a": {"type": "leaf", "label": "a"}, "b": {"type": "peer", "label": "b", "peer": "a"}}}})
    host.init_resources()
    assert recording.EVENTS == [("build", "a"), ("build", "b")]
    host.shutdown_resources()
    host.shutdown_resources()
    assert recording.EVENTS[2:] == [("close", "b"), ("close", "a")]
    recording.EVENTS.clear()


async def _archive(castore: CastoreContainer) -> Any:
    """A host async resource on castore services: records its own shutdown."""
    blobs = await castore.ablob_service("a")
    yield blobs
    recording.record("close", "host-resource")


class ResourceHost(containers.DeclarativeContainer):
    config = providers.Configuration()
    castore = castore_container(config.castore, recording.registry())
    # Taking castore.lifecycle (a Resource) makes the direct edge dependency-injector needs to
    # shut this resource down before the castore services.
    archive = providers.Resource(_archive, castore=castore.lifecycle)


async def test_a_host_resource_on_castore_lifecycle_shuts_down_first() -> None:
    recording.EVENTS.clear()
    host = ResourceHost()
    host.config.from_dict({"castore": {"blobservices": {
        "a": {"type": "leaf", "label": "a"}, "b": {"type": "peer", "label": "b", "peer": "a"}}}})
    await host.init_resources()
    assert await host.archive() is host.castore().blob_service("a")  # an async resource: awaited
    await host.shutdown_resources()
    assert [e for e in recording.EVENTS if e[0] == "close"] == [("close", "host-resource"), ("close", "b"), ("close", "a")]
    recording.EVENTS.clear()


def test_reset_override_wipes_a_from_dict_config() -> None:
    """dependency-injector stores from_dict as an override: reset_override() removes it."""
    host = Host()
    host.config.from_dict({"castore": MEMORY})
    host.reset_override()
    with pytest.raises(Exception, match="config.castore: no castore configuration"):
        host.castore()
