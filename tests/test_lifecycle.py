"""Building, lifecycle and overrides: async builds, failed builds, host resources, state kept."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from dependency_injector import containers, providers

from castore_di import load_container
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.composition.host import castore_container
from castore_di.digests import blake3_digest
from castore_di.errors import InstantiationError

from tests import recording


@pytest.fixture(autouse=True)
def _clear_events() -> Iterator[None]:
    recording.EVENTS.clear()
    yield
    recording.EVENTS.clear()


def _events(kind: str) -> list[str]:
    return [name for event, name in recording.EVENTS if event == kind]


CHAIN: dict[str, Any] = {"blobservices": {
    "a": {"type": "leaf", "label": "a"},
    "b": {"type": "peer", "label": "b", "peer": "a"},
    "c": {"type": "peer", "label": "c", "peer": "b"},
}}


# -- failed builds -------------------------------------------------------------------


def test_a_failed_build_is_not_cached_and_names_the_chain() -> None:
    container = load_container({"blobservices": {
        "remote": {"type": "flaky", "label": "remote", "failures": 2},
        "default": {"type": "peer", "label": "default", "peer": "remote"},
    }}, recording.registry())
    for attempt in (1, 2):
        with pytest.raises(InstantiationError) as e:
            container.blob_service()
        assert str(e.value) == (
            f"blobservices.default -> blobservices.remote: cannot build 'flaky' service: attempt {attempt} failed"
        )
    service = container.blob_service()  # the third attempt works: nothing was cached
    assert service is container.blob_service()
    assert _events("attempt") == ["remote"] * 3 and _events("build") == ["remote", "default"]


async def test_a_failed_async_build_is_not_cached() -> None:
    registry = recording.registry()
    container = load_container({"blobservices": {
        "remote": {"type": "async_leaf", "label": "remote", "fail": True},
        "default": {"type": "peer", "label": "default", "peer": "remote"},
    }}, registry)
    for _ in range(2):
        with pytest.raises(InstantiationError, match=r"^blobservices.default -> blobservices.remote: "
                                                     r"cannot build 'async_leaf' service: cannot connect"):
            await container.ablob_service()
    assert _events("attempt") == ["remote", "remote"]


# -- async builds --------------------------------------------------------------------


async def test_async_build_is_awaited_and_dependents_become_async() -> None:
    container = load_container({"blobservices": {
        "remote": {"type": "async_leaf", "label": "remote", "delay": 0.01},
        "local": {"type": "leaf", "label": "local"},
        "default": {"type": "combined", "local": "local", "remote": "remote"},
    }}, recording.registry())
    with pytest.raises(InstantiationError, match="built asynchronously"):
        container.blob_service()  # nothing awaited it yet
    default = await container.ablob_service()
    assert isinstance(default, CombinedBlobService)
    assert isinstance(default.remote, recording.RecordingBlobService)
    assert container.blob_service() is default  # built: sync access returns it
    assert container.blob_service("local") is default.local  # a sync instance stays sync
    assert await container.blobservices.default() is default  # the provider returns an awaitable
    await container.aclose()
    assert _events("close") == ["remote", "local"]  # (combined records nothing) dependents first


def test_concurrent_first_use_from_threads_and_tasks_builds_one() -> None:
    container = load_container({"blobservices": {
        "default": {"type": "async_leaf", "label": "x", "delay": 0.05},
    }}, recording.registry())
    results: list[object] = []
    lock = threading.Lock()
    start = threading.Barrier(5)

    def in_thread() -> None:
        async def use() -> list[object]:
            return list(await asyncio.gather(*(container.ablob_service() for _ in range(10))))

        start.wait()
        got = asyncio.run(use())  # each thread has its own event loop
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=in_thread) for _ in range(4)]
    for t in threads:
        t.start()

    async def main_loop() -> list[object]:
        await asyncio.to_thread(start.wait)
        return list(await asyncio.gather(*(container.ablob_service() for _ in range(10))))

    results.extend(asyncio.run(main_loop()))
    for t in threads:
        t.join()
    assert len(results) == 50 and len({id(r) for r in results}) == 1
    assert _events("build") == ["x"]


# -- lifecycle -----------------------------------------------------------------------


class Holder:
    def __init__(self, blobs: Any) -> None:
        self.blobs = blobs


class Host(containers.DeclarativeContainer):
    castore = castore_container(CHAIN, recording.registry())
    holder = providers.Singleton(Holder, blobs=castore.blobservices.c)


def test_host_sync_init_and_shutdown_resources() -> None:
    host = Host()
    host.init_resources()
    assert _events("build") == ["a", "b", "c"]  # every instance, dependencies first
    assert host.holder().blobs is host.castore().blob_service("c")
    host.shutdown_resources()
    assert _events("close") == ["c", "b", "a"]  # dependents first
    host.shutdown_resources()
    assert _events("close") == ["c", "b", "a"]  # exactly once
    host.init_resources()  # a new lifecycle builds new services
    assert _events("build") == ["a", "b", "c"] * 2
    host.shutdown_resources()


async def test_host_awaited_init_and_shutdown_resources() -> None:
    host = Host()
    await host.init_resources()
    assert _events("build") == ["a", "b", "c"]
    await host.shutdown_resources()
    await host.shutdown_resources()
    assert _events("close") == ["c", "b", "a"]


async def test_awaited_init_resources_builds_async_instances() -> None:
    container = load_container({"blobservices": {
        "remote": {"type": "async_leaf", "label": "remote"},
        "default": {"type": "peer", "label": "default", "peer": "remote"},
    }}, recording.registry())
    await container.init_resources()
    assert _events("build") == ["remote", "default"]
    assert isinstance(container.blob_service(), recording.RecordingBlobService)  # sync access after init
    await container.shutdown_resources()
    assert _events("close") == ["default", "remote"]


async def test_container_is_an_async_context_manager() -> None:
    async with load_container(CHAIN, recording.registry()) as container:
        container.blob_service("c")
    assert _events("close") == ["c", "b", "a"]


# -- overrides that keep state -------------------------------------------------------

STATEFUL: dict[str, Any] = {"blobservices": {
    "local": {"type": "memory"},
    "remote": {"type": "memory"},
    "default": {"type": "combined", "local": "local", "remote": "remote"},
    "other": {"type": "combined", "local": "local", "remote": "memory://"},
}}


async def test_override_instance_keeps_the_original_and_its_dependents() -> None:
    container = load_container(STATEFUL)
    remote = container.blob_service("remote")
    digest = await remote.put(b"stored before the block")
    default = container.blob_service()
    replacement = MemoryBlobService()
    with container.override_instance("blobservices.remote", replacement):
        inside = container.blob_service()
        assert isinstance(inside, CombinedBlobService) and inside.remote is replacement and inside is not default
        assert container.blob_service("remote") is replacement
        assert not await inside.has(digest)
    assert container.blob_service("remote") is remote  # the very same object...
    assert await remote.has(digest)  # ...with its state
    assert container.blob_service() is default  # a dependent built before the block comes back
    await container.aclose()


async def test_nested_overrides_restore_each_level() -> None:
    container = load_container(STATEFUL)
    remote = container.blob_service("remote")
    first, second = MemoryBlobService(), MemoryBlobService()
    with container.override_instance("blobservices.remote", first):
        during_first = container.blob_service()
        with container.override_instance("blobservices.remote", second):
            assert isinstance(container.blob_service(), CombinedBlobService)
            assert container.blob_service().remote is second  # type: ignore[attr-defined]
        assert container.blob_service() is during_first  # the outer block's dependent is back
        assert during_first.remote is first  # type: ignore[attr-defined]
    assert container.blob_service("remote") is remote
    await container.aclose()


async def test_override_of_an_anonymous_instance_keeps_it() -> None:
    container = load_container(STATEFUL)
    other = container.blob_service("other")
    assert isinstance(other, CombinedBlobService)
    anonymous = other.remote
    digest = await anonymous.put(b"anonymous state")
    with container.override_instance("blobservices.other.remote", MemoryBlobService()):
        inside = container.blob_service("other")
        assert inside is not other and not await inside.has(digest)
    assert container.blob_service("other") is other
    assert await container.aget("blobservices.other.remote") is anonymous
    assert await anonymous.has(blake3_digest(b"anonymous state"))
    await container.aclose()
