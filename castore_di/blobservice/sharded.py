"""Blobs spread over several stores (``type: sharded``, fields ``shards``, ``weights``).

Each digest lives on one shard, chosen by rendezvous (highest random weight) hashing keyed
by the shard's *name*: adding or removing a shard moves only the digests that shard gains
or held, and renaming a shard is what moves data, not reordering the list. ``weights``
(``{name: int}``, default 1) scale a shard's share.

A blob's digest is known only at the end of a write, so a writer spools the bytes (in
memory up to :data:`SPOOL_MEMORY`, then in a temporary file) and sends them to their shard
on ``close()``. Chunks are a shard's own business: a chunk lives on its blob's shard, not
on the shard its own digest would pick, so ``chunks()`` reports a present blob as
unchunked (``[]``) and readers fetch whole blobs. A shard that is down fails only the
digests that live on it, with an error naming the shard.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import tempfile
from collections.abc import Awaitable, Mapping
from typing import IO, Any, ClassVar, TypeVar

import attrs

from castore_di.blobservice.base import READ_BLOCK, BlobReader, BlobService, BlobWriter, ChunkMeta, HashingWriter
from castore_di.blobservice.mirrored import member_error, parse_members_url
from castore_di.composition.config import BlobServiceConfig, ReferenceListOrMap, reference_map
from castore_di.digests import B3Digest
from castore_di.errors import ConfigError, IntegrityError, StorageError

__all__ = ["ShardedBlobService", "ShardedBlobServiceConfig", "Rendezvous", "ShardRouter", "shard_names", "SPOOL_MEMORY", "validate_weights"]

SPOOL_MEMORY = 8 << 20  # bytes a writer keeps in memory before spooling to a temporary file

T = TypeVar("T")
S = TypeVar("S")


class Rendezvous:
    """Highest-random-weight choice of one name per key, weighted (Schindelhauer-Schomaker)."""

    def __init__(self, names: list[str], weights: Mapping[str, int] | None = None) -> None:
        if not names:
            raise ValueError("rendezvous hashing needs at least one name")
        weights = weights or {}
        self._names = [(n, n.encode(), float(weights.get(n, 1))) for n in names]

    def pick(self, key: bytes) -> str:
        best, best_score = "", -math.inf
        for name, raw, weight in self._names:
            h = int.from_bytes(hashlib.blake2b(raw + b"\0" + key, digest_size=8).digest(), "big")
            score = weight / -math.log((h + 1) / (2**64 + 1))
            if score > best_score:
                best, best_score = name, score
        return best


def validate_weights(names: list[str], weights: Mapping[str, int]) -> None:
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(f"weights for unknown shard(s) {', '.join(map(repr, unknown))} (shards: {', '.join(names)})",
                          path="weights")
    bad = sorted(k for k, v in weights.items() if v < 1)
    if bad:
        raise ConfigError(f"weights must be positive integers (shard {bad[0]!r})", path="weights")


def shard_names(shards: tuple[str, ...] | Mapping[str, str]) -> list[str]:
    """Shard names: a map's keys, or a list's elements (instance names or URLs)."""
    return list(shards.keys()) if isinstance(shards, Mapping) else list(shards)


class ShardRouter:
    """Routing shared by the blob and directory services."""

    def __init__(self, shards: Mapping[str, Any], weights: Mapping[str, int] | None) -> None:
        if not shards:
            raise ValueError("sharded needs at least one shard")
        self.shards = dict(shards)
        self._rendezvous = Rendezvous(list(self.shards), weights)

    def shard_name(self, digest: B3Digest) -> str:
        """The name of the shard ``digest`` lives on."""
        return self._rendezvous.pick(bytes(digest))

    async def _on(self, name: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except StorageError as e:
            raise member_error("shard", name, e) from e


class ShardedBlobService(ShardRouter, BlobService):
    def __init__(self, shards: Mapping[str, BlobService], weights: Mapping[str, int] | None = None) -> None:
        super().__init__(shards, weights)

    def shard(self, digest: B3Digest) -> tuple[str, BlobService]:
        name = self.shard_name(digest)
        return name, self.shards[name]

    async def has(self, digest: B3Digest) -> bool:
        name, shard = self.shard(digest)
        return await self._on(name, shard.has(digest))

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        name, shard = self.shard(digest)
        return await self._on(name, shard.open_read(digest))

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return [] if await self.has(digest) else None

    def open_write(self) -> BlobWriter:
        return _ShardedWriter(self)


class _ShardedWriter(HashingWriter):
    def __init__(self, service: ShardedBlobService) -> None:
        super().__init__()
        self._service = service
        self._memory: list[bytes] = []
        self._in_memory = 0
        self._file: IO[bytes] | None = None

    async def _write(self, data: bytes) -> None:
        self._hash(data)
        if self._file is None and self._in_memory + len(data) <= SPOOL_MEMORY:
            self._memory.append(data)
            self._in_memory += len(data)
            return
        if self._file is None:
            self._file = await asyncio.to_thread(tempfile.TemporaryFile)
            pending, self._memory, self._in_memory = self._memory, [], 0
            await asyncio.to_thread(self._file.writelines, pending)
        await asyncio.to_thread(self._file.write, data)

    async def _blocks(self) -> Any:
        if self._file is None:
            for block in self._memory:
                yield block
            return
        await asyncio.to_thread(self._file.seek, 0)
        while block := await asyncio.to_thread(self._file.read, READ_BLOCK):
            yield block

    async def _finish(self) -> B3Digest:
        digest = self._hashed_digest()
        name, shard = self._service.shard(digest)
        writer = shard.open_write()
        try:
            async for block in self._blocks():
                await writer.write(block)
            got = await writer.close()
        except StorageError as e:
            await writer.abort()
            raise member_error("shard", name, e) from e
        except BaseException:
            await writer.abort()
            raise
        finally:
            await self._abort()
        if got != digest:
            raise IntegrityError(f"shard {name!r} stored blob {digest} as {got}")
        return digest

    async def _abort(self) -> None:
        self._memory, self._in_memory = [], 0
        if self._file is not None:
            file, self._file = self._file, None
            await asyncio.to_thread(file.close)


@attrs.frozen(kw_only=True)
class ShardedBlobServiceConfig(BlobServiceConfig):
    """Each blob on one of `shards`, picked by rendezvous hashing of the shard names."""

    type_tag: ClassVar[str] = "sharded"
    shards: ReferenceListOrMap = reference_map(
        "blobservices", min_items=1, allow_list=True,
        doc="name -> service; a list names each shard by its element (instance name or URL)",
    )
    weights: dict[str, int] = attrs.field(factory=dict)
    """relative share per shard name (default 1 each)"""

    def __attrs_post_init__(self) -> None:
        validate_weights(shard_names(self.shards), self.weights)

    def build(self, shards: dict[str, BlobService]) -> ShardedBlobService:
        return ShardedBlobService(shards, self.weights)

    @classmethod
    def from_url(cls, url: str) -> "ShardedBlobServiceConfig":
        """``sharded://?shard=<url or name>&shard=<url or name>[&…]`` (equal weights)."""
        return cls(shards=tuple(parse_members_url(url, "sharded", "shard")))
