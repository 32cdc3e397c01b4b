"""Directories kept in several stores at once (``type: mirrored``, field ``members``).

Writes (single directories and closures) go to every member concurrently and succeed only
when all succeed; a failure names the member. Reads try the members in order; a directory
found in a later member has its whole closure copied into the earlier members that
answered "absent" (read repair; the closure is validated first, and whole closures are
what every backend accepts). A member that is down (:class:`~castore_di.errors.StorageError`)
is skipped by reads; when no reachable member has the directory and one was down, the read
raises. Corrupt data (:class:`~castore_di.errors.IntegrityError`) is raised, not skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import ClassVar, TypeVar

import attrs

from castore_di.blobservice.mirrored import member_error, parse_members_url
from castore_di.composition.config import DirectoryServiceConfig, reference_list
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import RootToLeaves, leaves_first
from castore_di.errors import StorageError
from castore_di.nodes import Directory

__all__ = ["MirroredDirectoryService", "MirroredDirectoryServiceConfig"]

T = TypeVar("T")
_log = logging.getLogger(__name__)


class MirroredDirectoryService(DirectoryService):
    def __init__(self, members: Sequence[DirectoryService], names: Sequence[str] | None = None) -> None:
        if len(members) < 2:
            raise ValueError("mirrored needs at least 2 members")
        self.members = list(members)
        self.names = list(names) if names is not None else [f"#{i}" for i in range(len(members))]

    async def _all(self, op: Callable[[DirectoryService], Awaitable[T]]) -> list[T]:
        results = await asyncio.gather(*(op(m) for m in self.members), return_exceptions=True)
        for name, result in zip(self.names, results):
            if isinstance(result, StorageError):
                raise member_error("member", name, result) from result
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def _closure(self, index: int, root: B3Digest) -> list[Directory]:
        validator = RootToLeaves(root)
        closure: list[Directory] = []
        async for d in self.members[index].get_recursive(root):
            validator.add(d)
            closure.append(d)
        if closure:
            validator.finish()
        return closure

    async def _repair(self, root: B3Digest, closure: list[Directory], lacking: list[int]) -> None:
        ordered = leaves_first(root, closure)
        results = await asyncio.gather(*(self.members[i].put_closure(ordered) for i in lacking),
                                       return_exceptions=True)
        for i, result in zip(lacking, results):
            if isinstance(result, StorageError):  # the repair failed, the read need not
                _log.warning("mirrored: read repair of directory %s into member %r failed: %s",
                             root, self.names[i], result)
            elif isinstance(result, BaseException):
                raise result

    async def _read(self, root: B3Digest) -> tuple[int, list[Directory], list[int]]:
        """The closure of ``root`` from the first member that has it, repaired into earlier ones."""
        absent: list[int] = []
        down: list[tuple[int, StorageError]] = []
        for i, member in enumerate(self.members):
            try:
                first = await member.get(root)
            except StorageError as e:
                down.append((i, e))
                continue
            if first is None:
                absent.append(i)
                continue
            return i, [first], absent
        if down:
            at, error = down[0]
            raise member_error("member", self.names[at], error) from error
        return -1, [], absent

    async def get(self, digest: B3Digest) -> Directory | None:
        index, found, absent = await self._read(digest)
        if not found:
            return None
        if absent:
            await self._repair(digest, await self._closure(index, digest), absent)
        return found[0]

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:  # type: ignore[override]
        index, found, absent = await self._read(root)
        if not found:
            return
        if not absent:
            async for d in self.members[index].get_recursive(root):
                yield d
            return
        closure = await self._closure(index, root)
        await self._repair(root, closure, absent)
        for d in closure:
            yield d

    async def put(self, directory: Directory) -> B3Digest:
        await self._all(lambda m: m.put(directory))
        return directory.digest

    async def _store_closure(self, root: B3Digest, directories: list[Directory]) -> None:
        await self._all(lambda m: m.put_closure(directories))


@attrs.frozen(kw_only=True)
class MirroredDirectoryServiceConfig(DirectoryServiceConfig):
    """Every directory in each of `members`: writes go to all, reads take the first that has it."""

    type_tag: ClassVar[str] = "mirrored"
    members: tuple[str, ...] = reference_list(
        "directoryservices", min_items=2,
        doc="read in order; written all at once; a later member's hit is copied (with its closure) into earlier ones",
    )

    def build(self, members: list[DirectoryService]) -> MirroredDirectoryService:
        return MirroredDirectoryService(members, self.members)

    @classmethod
    def from_url(cls, url: str) -> "MirroredDirectoryServiceConfig":
        """``mirrored://?member=<url or name>&member=<url or name>[&member=…]``."""
        return cls(members=tuple(parse_members_url(url, "mirrored", "member")))
