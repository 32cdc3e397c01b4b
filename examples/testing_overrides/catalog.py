"""A small application service built on a castore blob service, and its container."""

from __future__ import annotations

from pathlib import Path

import castore_di
from castore_di import B3Digest, BlobService

CONFIG = Path(__file__).with_name("catalog.yaml")


class Catalog:
    """Named documents whose contents live in a blob service."""

    def __init__(self, blobs: BlobService) -> None:
        self._blobs = blobs
        self._names: dict[str, B3Digest] = {}

    async def add(self, name: str, data: bytes) -> B3Digest:
        digest = await self._blobs.put(data)
        self._names[name] = digest
        return digest

    async def get(self, name: str) -> bytes | None:
        digest = self._names.get(name)
        return None if digest is None else await self._blobs.read_bytes(digest)

    async def link(self, name: str, digest: B3Digest) -> bool:
        """Name an existing blob (from anywhere the blob service reads); False if absent."""
        if not await self._blobs.has(digest):
            return False
        self._names[name] = digest
        return True


def load() -> castore_di.CastoreContainer:
    """The catalog's container, loaded from ``catalog.yaml``."""
    return castore_di.load_container(CONFIG)
