"""A two-level directory cache (``type: cache``, fields ``near`` and ``far``).

``get`` and ``get_recursive`` try ``near`` first. On a miss the closure is fetched from
``far``, validated, and copied into ``near`` (the whole closure, since ``far`` may serve
only roots); a miss in both is "absent" (``None`` / an empty stream), not an error, unlike
the reference. A closure that is incomplete in ``near`` (a bounded near store evicted part
of it) is fetched from ``far`` again. Writes go to ``far`` first, then ``near``, so ``far`` stays authoritative.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from typing import ClassVar

import attrs

from castore_di.composition.config import DirectoryServiceConfig, reference
from castore_di.composition.fields import config_from_url_fields, parse_query, query_fields
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import RootToLeaves, leaves_first
from castore_di.errors import ConfigError, StorageError
from castore_di.nodes import Directory

__all__ = ["CacheDirectoryService", "CacheDirectoryServiceConfig"]


class CacheDirectoryService(DirectoryService):
    def __init__(self, near: DirectoryService, far: DirectoryService) -> None:
        self.near = near
        self.far = far

    async def _fill_from_far(self, root: B3Digest) -> list[Directory]:
        validator = RootToLeaves(root)
        fetched: list[Directory] = []
        async for d in self.far.get_recursive(root):
            validator.add(d)
            fetched.append(d)
        if not fetched:
            return []
        validator.finish()
        await self.near.put_closure(leaves_first(root, fetched))
        return fetched

    async def get(self, digest: B3Digest) -> Directory | None:
        hit = await self.near.get(digest)
        if hit is not None:
            return hit
        fetched = await self._fill_from_far(digest)
        return fetched[0] if fetched else None

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:  # type: ignore[override]
        # The near closure is collected before anything is yielded: a bounded near store may
        # have evicted an inner directory (a StorageError mid-walk), and then far serves it all.
        try:
            closure = [d async for d in self.near.get_recursive(root)]
        except StorageError:
            closure = []
        if not closure:
            closure = await self._fill_from_far(root)
        for d in closure:
            yield d

    async def put(self, directory: Directory) -> B3Digest:
        digest = await self.far.put(directory)
        await self.near.put(directory)
        return digest

    async def _store_closure(self, root: B3Digest, directories: list[Directory]) -> None:
        await self.far.put_closure(directories)
        await self.near.put_closure(directories)


@attrs.frozen(kw_only=True)
class CacheDirectoryServiceConfig(DirectoryServiceConfig):
    """``near`` (fast, e.g. local) in front of ``far`` (authoritative, e.g. remote)."""

    type_tag: ClassVar[str] = "cache"
    near: str = reference("directoryservices", doc="the fast store filled on misses")
    far: str = reference("directoryservices", doc="the authoritative store")

    def build(self, near: DirectoryService, far: DirectoryService) -> CacheDirectoryService:
        return CacheDirectoryService(near, far)

    @classmethod
    def from_url(cls, url: str) -> "CacheDirectoryServiceConfig":
        """``cache://?near=<url or name>&far=<url or name>``."""
        parts = urllib.parse.urlsplit(url)
        if parts.netloc or parts.path:
            raise ConfigError(f"invalid url {url!r}: cache:// takes no host or path")
        return config_from_url_fields(cls, url, query_fields(cls, url, parse_query(url, parts.query)))
