"""The in-memory directory service (``type: memory``, URL ``memory://``).

With ``max_entries`` it is a bounded LRU cache (``get`` and ``put`` refresh an entry); an
evicted inner directory makes its closure incomplete there, so a bounded store is a cache
(the ``near`` side of a ``cache``), not a primary copy.
"""

from __future__ import annotations

from collections import OrderedDict
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

    loopless = True

    def __init__(self, max_entries: int | None = None) -> None:
        self._dirs: OrderedDict[B3Digest, bytes] = OrderedDict()
        self.max_entries = max_entries

    async def get(self, digest: B3Digest) -> Directory | None:
        raw = self._dirs.get(digest)
        if raw is None:
            return None
        if blake3_digest(raw) != digest:
            raise IntegrityError(f"directory {digest}: stored bytes do not match the digest")
        if self.max_entries is not None:
            self._dirs.move_to_end(digest)
        return Directory.decode(raw)

    async def put(self, directory: Directory) -> B3Digest:
        digest = directory.digest
        if digest not in self._dirs:
            self._dirs[digest] = directory.encode()
        if self.max_entries is not None:
            self._dirs.move_to_end(digest)
            while len(self._dirs) > self.max_entries:
                self._dirs.popitem(last=False)
        return digest

    async def directory_digests(self) -> AsyncIterator[B3Digest]:
        for digest in list(self._dirs):
            yield digest


@attrs.frozen(kw_only=True)
class MemoryDirectoryServiceConfig(DirectoryServiceConfig):
    """Keeps directories in process memory; with `max_entries`, a bounded LRU cache."""

    type_tag: ClassVar[str] = "memory"
    max_entries: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    """bound on the stored directories; least recently used ones are evicted past it (null: unbounded)"""

    def build(self) -> MemoryDirectoryService:
        return MemoryDirectoryService(self.max_entries)

    @classmethod
    def from_url(cls, url: str) -> "MemoryDirectoryServiceConfig":
        """``memory://``, optionally ``memory://?max_entries=N`` (no host or path)."""
        query = parse_memory_url(url, {"max_entries"})
        return cls(max_entries=int(query["max_entries"])) if "max_entries" in query else cls()
