"""Directories spread over several stores (``type: sharded``, fields ``shards``, ``weights``).

Each directory lives on one shard, chosen by rendezvous hashing of its digest keyed by the
shard names (see :mod:`castore_di.blobservice.sharded`), so a closure usually spans shards:
``get_recursive`` walks it with ``get``, following each child to its own shard. A closure
upload is validated whole, then each shard receives its directories leaves first through
``put``, so shards must accept single directories with children (memory, embedded,
bigtable do; grpc and objectstore take whole closures only and cannot be shards here). A
shard that is down fails only the digests that live on it, with an error naming the shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import ClassVar

import attrs

from castore_di.blobservice.mirrored import parse_members_url
from castore_di.blobservice.sharded import ShardRouter, shard_names, validate_weights
from castore_di.composition.config import DirectoryServiceConfig, ReferenceListOrMap, reference_map
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.nodes import Directory

__all__ = ["ShardedDirectoryService", "ShardedDirectoryServiceConfig"]


class ShardedDirectoryService(ShardRouter, DirectoryService):
    def __init__(self, shards: Mapping[str, DirectoryService], weights: Mapping[str, int] | None = None) -> None:
        super().__init__(shards, weights)

    def shard(self, digest: B3Digest) -> tuple[str, DirectoryService]:
        name = self.shard_name(digest)
        return name, self.shards[name]

    async def get(self, digest: B3Digest) -> Directory | None:
        name, shard = self.shard(digest)
        return await self._on(name, shard.get(digest))

    async def put(self, directory: Directory) -> B3Digest:
        name, shard = self.shard(directory.digest)
        return await self._on(name, shard.put(directory))

    async def _store_closure(self, root: B3Digest, directories: list[Directory]) -> None:
        per_shard: dict[str, list[Directory]] = {}
        for d in directories:  # leaves first already; each shard keeps that order
            per_shard.setdefault(self.shard_name(d.digest), []).append(d)

        async def store(name: str, dirs: list[Directory]) -> None:
            for d in dirs:
                await self._on(name, self.shards[name].put(d))

        await asyncio.gather(*(store(n, ds) for n, ds in per_shard.items()))


@attrs.frozen(kw_only=True)
class ShardedDirectoryServiceConfig(DirectoryServiceConfig):
    """Each directory on one of `shards`, picked by rendezvous hashing of the shard names."""

    type_tag: ClassVar[str] = "sharded"
    shards: ReferenceListOrMap = reference_map(
        "directoryservices", min_items=1, allow_list=True,
        doc="name -> service; a list names each shard by its element (instance name or URL)",
    )
    weights: dict[str, int] = attrs.field(factory=dict)
    """relative share per shard name (default 1 each)"""

    def __attrs_post_init__(self) -> None:
        validate_weights(shard_names(self.shards), self.weights)

    def build(self, shards: dict[str, DirectoryService]) -> ShardedDirectoryService:
        return ShardedDirectoryService(shards, self.weights)

    @classmethod
    def from_url(cls, url: str) -> "ShardedDirectoryServiceConfig":
        """``sharded://?shard=<url or name>&shard=<url or name>[&…]`` (equal weights)."""
        return cls(shards=tuple(parse_members_url(url, "sharded", "shard")))
