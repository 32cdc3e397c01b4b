"""Config types for composition tests: they record construction and closing."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, ClassVar

import attrs

from castore_di.blobservice.memory import MemoryBlobService
from castore_di.composition import Registry, default_registry
from castore_di.composition.config import BlobServiceConfig, DirectoryServiceConfig, reference
from castore_di.directoryservice.memory import MemoryDirectoryService

EVENTS: list[tuple[str, str]] = []
_lock = threading.Lock()


def record(event: str, name: str) -> None:
    with _lock:
        EVENTS.append((event, name))


class RecordingBlobService(MemoryBlobService):
    def __init__(self, label: str, **deps: Any) -> None:
        super().__init__()
        self.label = label
        self.deps = deps
        record("build", label)

    async def close(self) -> None:
        record("close", self.label)


class RecordingDirectoryService(MemoryDirectoryService):
    def __init__(self, label: str, **deps: Any) -> None:
        super().__init__()
        self.label = label
        self.deps = deps
        record("build", label)

    async def close(self) -> None:
        record("close", self.label)


@attrs.frozen(kw_only=True)
class LeafConfig(BlobServiceConfig):
    type_tag: ClassVar[str] = "leaf"
    label: str = "leaf"
    delay: float = 0.0

    def build(self) -> RecordingBlobService:
        time.sleep(self.delay)  # widens the race window for concurrency tests
        return RecordingBlobService(self.label)


@attrs.frozen(kw_only=True)
class PeerConfig(BlobServiceConfig):
    type_tag: ClassVar[str] = "peer"
    label: str = "peer"
    peer: str = reference("blobservices")

    def build(self, peer: Any) -> RecordingBlobService:
        return RecordingBlobService(self.label, peer=peer)


@attrs.frozen(kw_only=True)
class BlobOnDirConfig(BlobServiceConfig):
    type_tag: ClassVar[str] = "blob_on_dir"
    label: str = "blob_on_dir"
    dirs: str = reference("directoryservices")

    def build(self, dirs: Any) -> RecordingBlobService:
        return RecordingBlobService(self.label, dirs=dirs)


@attrs.frozen(kw_only=True)
class DirOnBlobConfig(DirectoryServiceConfig):
    type_tag: ClassVar[str] = "dir_on_blob"
    label: str = "dir_on_blob"
    blob: str = reference("blobservices")

    def build(self, blob: Any) -> RecordingDirectoryService:
        return RecordingDirectoryService(self.label, blob=blob)


@attrs.frozen(kw_only=True)
class FailingConfig(BlobServiceConfig):
    type_tag: ClassVar[str] = "failing"

    def build(self) -> RecordingBlobService:
        raise RuntimeError("disk on fire")


@attrs.frozen(kw_only=True)
class FlakyConfig(BlobServiceConfig):
    """Fails its first ``failures`` builds (counted in EVENTS as attempts), then works."""

    type_tag: ClassVar[str] = "flaky"
    label: str = "flaky"
    failures: int = 1

    def build(self) -> RecordingBlobService:
        attempts = sum(1 for e in EVENTS if e == ("attempt", self.label))
        record("attempt", self.label)
        if attempts < self.failures:
            raise RuntimeError(f"attempt {attempts + 1} failed")
        return RecordingBlobService(self.label)


@attrs.frozen(kw_only=True)
class AsyncLeafConfig(BlobServiceConfig):
    """An ``async def build`` that yields to the loop before the service exists."""

    type_tag: ClassVar[str] = "async_leaf"
    label: str = "async_leaf"
    delay: float = 0.0
    fail: bool = False

    async def build(self) -> RecordingBlobService:
        record("attempt", self.label)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("cannot connect")
        return RecordingBlobService(self.label)


@attrs.frozen(kw_only=True)
class PositiveConfig(BlobServiceConfig):
    """Cross-field validation happens when the config loads."""

    type_tag: ClassVar[str] = "positive"
    low: int = 1
    high: int = 2

    def __attrs_post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")

    def build(self) -> RecordingBlobService:
        return RecordingBlobService("positive")


def registry() -> Registry:
    reg = default_registry().copy()
    for cfg in (LeafConfig, PeerConfig, BlobOnDirConfig, FailingConfig, PositiveConfig, FlakyConfig, AsyncLeafConfig):
        reg.register("blobservices", cfg.type_tag, cfg)
    reg.register("directoryservices", DirOnBlobConfig.type_tag, DirOnBlobConfig)
    return reg
