"""Blobs kept in several stores at once (``type: mirrored``, field ``members``).

Writes go to every member concurrently and succeed only when all succeed; a failure names
the member. Reads try the members in order; a blob found in a later member is copied into
the earlier members that answered "absent" (read repair), verified against its digest on
the way. A member that is down (raises :class:`~castore_di.errors.StorageError`) is
skipped by reads, so reads keep working while one member is reachable and has the blob;
when no reachable member has it and one was down, the read raises rather than report an
absence it cannot know. Corrupt bytes (:class:`~castore_di.errors.IntegrityError`) are not
skipped: they are raised, never served from another member in silence.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, TypeVar

import attrs

from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from castore_di.composition.config import BlobServiceConfig, reference_list
from castore_di.digests import B3Digest
from castore_di.errors import ConfigError, IntegrityError, StorageError

__all__ = ["MirroredBlobService", "MirroredBlobServiceConfig", "FanOutWriter", "member_error", "parse_members_url"]

T = TypeVar("T")
_log = logging.getLogger(__name__)


def member_error(role: str, name: str, error: BaseException) -> StorageError:
    """A :class:`StorageError` naming the member (``role`` is ``member`` or ``shard``)."""
    err = StorageError(f"{role} {name!r}: {error}")
    err.__cause__ = error
    return err


class FanOutWriter(BlobWriter):
    """Writes every block to several writers; closes them in ``stages`` (each stage concurrently).

    ``stages`` is a list of lists of indices into ``writers``: ``[[0, 1]]`` closes both at
    once, ``[[0], [1]]`` closes the first before the second. All must report the same digest.
    """

    def __init__(self, writers: Sequence[BlobWriter], names: Sequence[str], role: str,
                 stages: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        self._writers = list(writers)
        self._names = list(names)
        self._role = role
        self._stages = [list(s) for s in stages] if stages is not None else [list(range(len(writers)))]

    async def _each(self, indices: Sequence[int], op: Callable[[BlobWriter], Awaitable[T]]) -> list[T]:
        results = await asyncio.gather(*(op(self._writers[i]) for i in indices), return_exceptions=True)
        for i, result in zip(indices, results):
            if isinstance(result, BaseException):
                if isinstance(result, (StorageError, IntegrityError)):
                    raise member_error(self._role, self._names[i], result) from result
                raise result
        return results  # type: ignore[return-value]

    async def _write(self, data: bytes) -> None:
        await self._each(range(len(self._writers)), lambda w: w.write(data))

    async def _finish(self) -> B3Digest:
        digests: list[B3Digest] = []
        for stage in self._stages:
            digests += await self._each(stage, lambda w: w.close())
        if len(set(digests)) != 1:
            raise IntegrityError(f"{self._role}s disagree on the digest of one blob: {sorted(map(str, set(digests)))}")
        return digests[0]

    async def _abort(self) -> None:
        await asyncio.gather(*(w.abort() for w in self._writers), return_exceptions=True)


async def copy_blob(source: BlobReader, digest: B3Digest, targets: Sequence[BlobService], names: Sequence[str],
                    role: str) -> None:
    """Stream ``source`` into every target and check each stored the bytes under ``digest``."""
    writer = FanOutWriter([t.open_write() for t in targets], names, role)
    try:
        async with source:
            async for block in source.iter_blocks():
                await writer.write(block)
        got = await writer.close()
    except BaseException:
        await writer.abort()
        raise
    if got != digest:
        raise IntegrityError(f"blob {digest}: a {role} returned bytes hashing to {got}")


class MirroredBlobService(BlobService):
    def __init__(self, members: Sequence[BlobService], names: Sequence[str] | None = None) -> None:
        if len(members) < 2:
            raise ValueError("mirrored needs at least 2 members")
        self.members = list(members)
        self.names = list(names) if names is not None else [f"#{i}" for i in range(len(members))]

    async def _find(self, digest: B3Digest, op: Callable[[BlobService], Awaitable[T | None]]
                    ) -> tuple[int, T | None, list[int]]:
        """The first member whose ``op`` finds something; the members that said "absent"."""
        absent: list[int] = []
        down: list[tuple[int, StorageError]] = []
        for i, member in enumerate(self.members):
            try:
                found = await op(member)
            except StorageError as e:
                down.append((i, e))
                continue
            if found is not None and found is not False:
                return i, found, absent
            absent.append(i)
        if down:
            first, error = down[0]
            raise member_error("member", self.names[first], error) from error
        return -1, None, absent

    async def has(self, digest: B3Digest) -> bool:
        index, _, _ = await self._find(digest, lambda m: m.has(digest))
        return index >= 0

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        index, reader, absent = await self._find(digest, lambda m: m.open_read(digest))
        if reader is None:
            return None
        lacking = [i for i in absent if i < index]
        if not lacking:
            return reader
        try:
            await copy_blob(reader, digest, [self.members[i] for i in lacking], [self.names[i] for i in lacking],
                            "member")
        except StorageError as e:  # the repair failed, the read need not
            _log.warning("mirrored: read repair of blob %s failed: %s", digest, e)
            return await self.members[index].open_read(digest)
        return await self.members[lacking[0]].open_read(digest)

    def open_write(self) -> BlobWriter:
        return FanOutWriter([m.open_write() for m in self.members], self.names, "member")

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        _, chunks, _ = await self._find(digest, lambda m: m.chunks(digest))
        return chunks


def parse_members_url(url: str, scheme: str, key: str) -> list[str]:
    """``scheme://?key=<url or name>&key=…``: the repeated query values, in order."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc or parts.path:
        raise ConfigError(f"invalid url {url!r}: {scheme}:// takes no host or path")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    unknown = {k for k, _ in query if k != key}
    if unknown:
        raise ConfigError(f"invalid url {url!r}: unknown query parameter(s) {', '.join(sorted(unknown))}")
    return [v for _, v in query]


@attrs.frozen(kw_only=True)
class MirroredBlobServiceConfig(BlobServiceConfig):
    """Every blob in each of `members`: writes go to all, reads take the first that has it."""

    type_tag: ClassVar[str] = "mirrored"
    members: tuple[str, ...] = reference_list(
        "blobservices", min_items=2,
        doc="read in order; written all at once; a later member's hit is copied into earlier ones that lacked it",
    )

    def build(self, members: list[BlobService]) -> MirroredBlobService:
        return MirroredBlobService(members, self.members)

    @classmethod
    def from_url(cls, url: str) -> "MirroredBlobServiceConfig":
        """``mirrored://?member=<url or name>&member=<url or name>[&member=…]``."""
        return cls(members=tuple(parse_members_url(url, "mirrored", "member")))
