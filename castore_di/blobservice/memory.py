"""The in-memory blob service (``type: memory``, URL ``memory://``)."""

from __future__ import annotations

from typing import ClassVar

import attrs

from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, BytesReader, HashingWriter
from castore_di.composition.config import BlobServiceConfig, parse_memory_url
from castore_di.digests import B3Digest, blake3_digest
from castore_di.errors import IntegrityError

__all__ = ["MemoryBlobService", "MemoryBlobServiceConfig"]


class MemoryBlobService(BlobService):
    """Blobs in a dict; lost when the process ends. Stored data is re-verified on read."""

    def __init__(self) -> None:
        self._blobs: dict[B3Digest, bytes] = {}

    async def has(self, digest: B3Digest) -> bool:
        return digest in self._blobs

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        if data is None:
            return None
        if blake3_digest(data) != digest:
            raise IntegrityError(f"blob {digest}: stored bytes do not match the digest")
        return BytesReader(data)

    def open_write(self) -> BlobWriter:
        return _MemoryWriter(self._blobs)


class _MemoryWriter(HashingWriter):
    def __init__(self, blobs: dict[B3Digest, bytes]) -> None:
        super().__init__()
        self._blobs = blobs
        self._parts: list[bytes] = []

    async def _write(self, data: bytes) -> None:
        self._hash(data)
        self._parts.append(data)

    async def _finish(self) -> B3Digest:
        digest = self._hashed_digest()
        self._blobs.setdefault(digest, b"".join(self._parts))
        self._parts = []
        return digest

    async def _abort(self) -> None:
        self._parts = []


@attrs.frozen(kw_only=True)
class MemoryBlobServiceConfig(BlobServiceConfig):
    """Keeps blobs in process memory. No fields."""

    type_tag: ClassVar[str] = "memory"

    def build(self) -> MemoryBlobService:
        return MemoryBlobService()

    @classmethod
    def from_url(cls, url: str) -> "MemoryBlobServiceConfig":
        """``memory://`` exactly (no host, path or query)."""
        parse_memory_url(url)
        return cls()
