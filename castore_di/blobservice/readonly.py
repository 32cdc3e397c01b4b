"""A read-only view of a blob service (``type: readonly``, field ``backend``).

Reads pass through unchanged. Every write is refused with
:class:`~castore_di.errors.UnsupportedOperationError` when the writer is opened, before
anything reaches the backend.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from castore_di.composition.config import BlobServiceConfig, reference, split_wrapper_url
from castore_di.digests import B3Digest
from castore_di.errors import UnsupportedOperationError

__all__ = ["ReadOnlyBlobService", "ReadOnlyBlobServiceConfig"]


class ReadOnlyBlobService(BlobService):
    def __init__(self, backend: BlobService, name: str = "backend") -> None:
        self.backend = backend
        self.name = name

    async def has(self, digest: B3Digest) -> bool:
        return await self.backend.has(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return await self.backend.open_read(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await self.backend.chunks(digest)

    def open_write(self) -> BlobWriter:
        raise UnsupportedOperationError(f"blob service {self.name!r} is read-only: writes are refused")


@attrs.frozen(kw_only=True)
class ReadOnlyBlobServiceConfig(BlobServiceConfig):
    """Reads of `backend` pass through; every write is refused before anything is stored."""

    type_tag: ClassVar[str] = "readonly"
    backend: str = reference("blobservices", doc="the service read through")

    def build(self, backend: BlobService) -> ReadOnlyBlobService:
        return ReadOnlyBlobService(backend, self.backend)

    @classmethod
    def from_url(cls, url: str) -> "ReadOnlyBlobServiceConfig":
        """``readonly+<url>``, e.g. `readonly+grpc+http://host:8000`, or `readonly://<instance name>`."""
        return cls(backend=split_wrapper_url(url, "readonly"))
