"""A read-only view of a directory service (``type: readonly``, field ``backend``).

Reads pass through unchanged. ``put`` and closure uploads are refused with
:class:`~castore_di.errors.UnsupportedOperationError` before anything reaches the backend
(``put_multiple_start`` itself raises).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import attrs

from castore_di.composition.config import DirectoryServiceConfig, reference, split_wrapper_url
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryPutter, DirectoryService
from castore_di.errors import UnsupportedOperationError
from castore_di.nodes import Directory

__all__ = ["ReadOnlyDirectoryService", "ReadOnlyDirectoryServiceConfig"]


class ReadOnlyDirectoryService(DirectoryService):
    def __init__(self, backend: DirectoryService, name: str = "backend") -> None:
        self.backend = backend
        self.name = name

    def _refuse(self) -> UnsupportedOperationError:
        return UnsupportedOperationError(f"directory service {self.name!r} is read-only: writes are refused")

    async def get(self, digest: B3Digest) -> Directory | None:
        return await self.backend.get(digest)

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return self.backend.get_recursive(root)

    async def put(self, directory: Directory) -> B3Digest:
        raise self._refuse()

    def put_multiple_start(self) -> DirectoryPutter:
        raise self._refuse()


@attrs.frozen(kw_only=True)
class ReadOnlyDirectoryServiceConfig(DirectoryServiceConfig):
    """Reads of `backend` pass through; every write is refused before anything is stored."""

    type_tag: ClassVar[str] = "readonly"
    backend: str = reference("directoryservices", doc="the service read through")

    def build(self, backend: DirectoryService) -> ReadOnlyDirectoryService:
        return ReadOnlyDirectoryService(backend, self.backend)

    @classmethod
    def from_url(cls, url: str) -> "ReadOnlyDirectoryServiceConfig":
        """``readonly+<url>``, e.g. `readonly+grpc+http://host:8000`, or `readonly://<instance name>`."""
        return cls(backend=split_wrapper_url(url, "readonly"))
