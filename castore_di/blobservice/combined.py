"""A local store in front of a remote one (``type: combined``, fields ``local``, ``remote``).

Reads try ``local`` first, then ``remote``. Unlike the reference, a blob read from
``remote`` is copied into ``local`` (``populate_local``, on by default) and verified
against its digest on the way, so the next read is local; set it to ``false`` for the
reference's read-only behaviour. ``write_to`` picks where writes go: ``local`` (the
default, as the reference), ``remote``, or ``both``: remote first, then local, and the
digest is reported only once both hold the blob (a failure names the side).

An existence check (``has``) that ``remote`` cannot answer (unreachable, failing) counts
as "absent": the caller uploads, which with ``write_to: local`` only writes ``local``. So
such a combined service imports with its remote down (with ``remote`` or ``both`` the
upload then fails naming the remote side); the first such failure is logged as one
warning, and the remote is not asked again for :data:`REMOTE_RETRY_AFTER` seconds.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar, Literal

import attrs

from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from castore_di.blobservice.mirrored import FanOutWriter
from castore_di.composition.config import BlobServiceConfig, reference
from castore_di.digests import B3Digest
from castore_di.errors import IntegrityError, StorageError

__all__ = ["CombinedBlobService", "CombinedBlobServiceConfig", "WriteTo"]

WriteTo = Literal["local", "remote", "both"]

log = logging.getLogger("castore_di.blobservice.combined")

REMOTE_RETRY_AFTER = 30.0  # seconds existence checks skip a remote that just failed


class CombinedBlobService(BlobService):
    def __init__(self, local: BlobService, remote: BlobService, *, populate_local: bool = True,
                 write_to: WriteTo = "local") -> None:
        self.local = local
        self.remote = remote
        self.populate_local = populate_local
        self.write_to = write_to
        self._warned = False
        self._remote_down_until = 0.0

    async def has(self, digest: B3Digest) -> bool:
        if await self.local.has(digest):
            return True
        if time.monotonic() < self._remote_down_until:
            return False
        try:
            return await self.remote.has(digest)
        except StorageError as e:
            # not asked again for a while: each check of a down remote costs its retries
            self._remote_down_until = time.monotonic() + REMOTE_RETRY_AFTER
            if not self._warned:
                self._warned = True
                log.warning("combined blob service: remote unavailable, treating blobs as absent (%s)", e)
            return False

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        reader = await self.local.open_read(digest)
        if reader is not None or not self.populate_local:
            return reader if reader is not None else await self.remote.open_read(digest)
        remote = await self.remote.open_read(digest)
        if remote is None:
            return None
        writer = self.local.open_write()
        try:
            async with remote:
                async for block in remote.iter_blocks():
                    await writer.write(block)
            got = await writer.close()
        except BaseException:
            await writer.abort()
            raise
        if got != digest:
            raise IntegrityError(f"blob {digest}: remote returned bytes hashing to {got}")
        return await self.local.open_read(digest)

    def open_write(self) -> BlobWriter:
        if self.write_to == "local":
            return self.local.open_write()
        if self.write_to == "remote":
            return self.remote.open_write()
        # both: every block to both; the remote commits first, then the local side
        writers = [self.remote.open_write(), self.local.open_write()]
        return FanOutWriter(writers, ["remote", "local"], "side", stages=[[0], [1]])

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        local = await self.local.chunks(digest)
        return local if local is not None else await self.remote.chunks(digest)


@attrs.frozen(kw_only=True)
class CombinedBlobServiceConfig(BlobServiceConfig):
    """``local`` (written and read first) in front of ``remote`` (read on a local miss)."""

    type_tag: ClassVar[str] = "combined"
    local: str = reference("blobservices", doc="read first; written unless `write_to` is `remote`")
    remote: str = reference("blobservices", doc="read when local misses; written when `write_to` is `remote` or `both`")
    populate_local: bool = True
    """copy a blob read from ``remote`` into ``local``, verified against its digest"""
    write_to: WriteTo = "local"
    """where writes go: ``local`` (as the reference), ``remote``, or ``both`` (remote first, then local)"""

    def build(self, local: BlobService, remote: BlobService) -> CombinedBlobService:
        return CombinedBlobService(local, remote, populate_local=self.populate_local, write_to=self.write_to)
