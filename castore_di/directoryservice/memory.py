"""The in-memory directory service (``type: memory``, URL ``memory://``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import attrs

from castore_di.composition.config import DirectoryServiceConfig, parse_memory_url
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import IntegrityError
from castore_di.nodes import Directory

__all__ = ["MemoryDirectoryService", "MemoryDirectoryServiceConfig"]


class MemoryDirectoryService(DirectoryService):
    """Directories as encoded bytes in a dict; re-verified and re-validated on read.

    ``put`` of a single directory does not check that its children exist (as the
    reference); closures put through ``put_multiple_start`` are fully validated.
    """

    def __init__(self) -> None:
        self._dirs: dict[B3Digest, bytes] = {}

    async def get(self, digest: B3Digest) -> Directory | None:
        raw = self._dirs.get(digest)
        if raw is None:
            return None
        if blake3_digest(raw) != digest:
            raise IntegrityError(f"directory {digest}: stored bytes do not match the digest")
        return Directory.decode(raw)

    async def put(self, directory: Directory) -> B3Digest:
        self._dirs.setdefault(directory.digest, directory.encode())
        return directory.digest

    async def directory_digests(self) -> AsyncIterator[B3Digest]:
        for digest in list(self._dirs):
            yield digest


@attrs.frozen(kw_only=True)
class MemoryDirectoryServiceConfig(DirectoryServiceConfig):
    """Keeps directories in process memory. No fields."""

    type_tag: ClassVar[str] = "memory"

    def build(self) -> MemoryDirectoryService:
        return MemoryDirectoryService()

    @classmethod
    def from_url(cls, url: str) -> "MemoryDirectoryServiceConfig":
        """``memory://`` exactly (no host, path or query)."""
        parse_memory_url(url)
        return cls()
