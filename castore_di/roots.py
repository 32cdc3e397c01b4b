"""Named roots and retention: which trees matter, and deleting everything else.

A *named root* records a tree under a name, with the time it was named and its size. Names
live in the store itself, so they travel with it; a directory service that keeps them
implements :class:`NamedRoots` (the embedded one does; others are refused with a clear
error by :func:`named_roots`).

:func:`prune` deletes every blob, chunk and directory not reachable from a named root or
from a ``keep`` digest. It is deliberately hard to run by accident: with no named roots it
refuses unless ``keep`` or ``all_unnamed`` says what to do. It takes the store for itself
first: a process that has it open (an import, a server, a mount) is waited for, and one that
tries to open it meanwhile is refused ("try again"), so a running import never loses what it
wrote. Then it marks (walking every kept closure through the directory service, with the
names as they are now; an incomplete closure aborts the prune before anything is deleted)
and sweeps.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from castore_di.digests import B3Digest
from castore_di.errors import CastoreError, LockedError, StorageError, UnsupportedOperationError, ValidationError
from castore_di.nodes import FileNode

if TYPE_CHECKING:  # the embedded directory service imports this module
    from castore_di.blobservice.base import BlobService
    from castore_di.directoryservice.base import DirectoryService

__all__ = [
    "NamedRoot",
    "NamedRoots",
    "PruneReport",
    "Prunable",
    "named_roots",
    "prune",
    "validate_root_name",
    "NoRootsError",
]

_NAME = re.compile(r"[A-Za-z0-9._@+:=,-][A-Za-z0-9._@+:=,/-]{0,199}")


class NoRootsError(CastoreError, ValueError):
    """``prune`` on a store with no named roots, without ``keep`` or ``all_unnamed``."""


def validate_root_name(name: str) -> str:
    """A root name: 1-200 of ``A-Z a-z 0-9 . _ @ + : = , - /``, not starting with ``/``."""
    if not _NAME.fullmatch(name):
        raise ValidationError(
            f"invalid root name {name!r}: use 1-200 characters of A-Z a-z 0-9 . _ @ + : = , - / "
            "(not starting with /)"
        )
    return name


@attrs.frozen(kw_only=True)
class NamedRoot:
    """A tree recorded under a name."""

    name: str
    digest: B3Digest
    created: float
    """Unix time the name was recorded."""
    size: int
    """Bytes of file contents in the tree (as the import counted them)."""
    entries: int = 0
    """The root directory node's size (entries below it)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": str(self.digest),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "size": self.size,
            "entries": self.entries,
        }


@runtime_checkable
class NamedRoots(Protocol):
    """A directory service that stores names for roots."""

    async def set_root(self, root: NamedRoot) -> NamedRoot | None:
        """Record ``root`` (replacing a root of that name); the replaced one, if any."""
        ...

    async def list_roots(self) -> list[NamedRoot]:
        """Every named root, sorted by name."""
        ...

    async def forget_root(self, name: str) -> NamedRoot | None:
        """Drop a name; what it named, or ``None`` when there was no such name."""
        ...


@runtime_checkable
class Prunable(Protocol):
    """A service that can delete what a mark phase did not keep."""

    def exclusive_use(self, wait: float | None = None) -> AbstractAsyncContextManager[None]:
        """Exclusive use of the underlying store (waits for other users; :class:`LockedError` after ``wait`` s)."""
        ...

    async def prune(self, keep: set[B3Digest], *, dry_run: bool) -> tuple[int, int]:
        """Delete records not in ``keep`` (blobs or directories); ``(records, stored bytes)`` freed."""
        ...


def named_roots(dirs: DirectoryService) -> NamedRoots:
    """``dirs`` as a :class:`NamedRoots`, or a clear refusal."""
    if isinstance(dirs, NamedRoots):
        return dirs
    raise UnsupportedOperationError(
        f"named roots are kept only by the embedded directory service; {type(dirs).__name__} cannot store them"
    )


@attrs.define(kw_only=True)
class PruneReport:
    """What :func:`prune` deleted (or, with ``dry_run``, would delete)."""

    dry_run: bool = False
    roots: int = 0
    kept_directories: int = 0
    kept_blobs: int = 0
    missing_blobs: int = 0
    freed_directories: int = 0
    freed_blob_records: int = 0
    """Blobs, chunk indexes and chunks deleted."""
    freed_bytes: int = 0
    """Stored (possibly compressed) bytes deleted."""

    def summary(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        missing = f"; {self.missing_blobs} kept blobs are missing" if self.missing_blobs else ""
        return (
            f"kept {self.kept_directories} directories and {self.kept_blobs} blobs of {self.roots} roots; "
            f"{verb} {self.freed_directories} directories and {self.freed_blob_records} blob records "
            f"({self.freed_bytes} bytes stored){missing}"
        )


@contextlib.asynccontextmanager
async def _exclusive(service: Prunable, wait: float | None, on_wait: Callable[[], None] | None) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(service.exclusive_use(wait=0))
        except LockedError:
            if wait == 0:
                raise
            if on_wait is not None:
                on_wait()
            await stack.enter_async_context(service.exclusive_use(wait=wait))
        yield


async def _closure(dirs: DirectoryService, root: B3Digest) -> AsyncIterator[tuple[B3Digest, list[FileNode]]]:
    async for directory in dirs.get_recursive(root):
        yield directory.digest, [node for _name, node in directory.files()]


async def prune(
    blob: BlobService,
    dirs: DirectoryService,
    *,
    keep: list[B3Digest] = (),  # type: ignore[assignment]
    all_unnamed: bool = False,
    dry_run: bool = False,
    wait: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> PruneReport:
    """Delete every blob, chunk and directory not reachable from a named root or ``keep``.

    ``keep`` digests may name directories (their closure is kept) or blobs. While other
    processes use the store, ``on_wait`` is called once and the prune waits (``wait``
    seconds at most, then :class:`LockedError`; ``None``: as long as it takes).

    Raises:
        NoRootsError: no named roots, no ``keep`` and not ``all_unnamed``.
        UnsupportedOperationError: a service that cannot prune (or keep names).
        StorageError: a kept closure is incomplete (nothing is deleted then).
    """
    report = PruneReport(dry_run=dry_run)
    roots = named_roots(dirs)
    for service in (blob, dirs):
        if not isinstance(service, Prunable):
            raise UnsupportedOperationError(f"{type(service).__name__} cannot prune")
    assert isinstance(blob, Prunable) and isinstance(dirs, Prunable)
    if not keep and not all_unnamed and not await roots.list_roots():
        raise NoRootsError(
            "no named roots: prune would delete every tree in the store; name trees with "
            "`castore import --name`, or say --keep DIGEST or --all-unnamed"
        )
    async with _exclusive(dirs, wait, on_wait), _exclusive(blob, wait, on_wait):
        # Read the names only now: an import that was running has finished and named its root.
        names = await roots.list_roots()
        kept_dirs: set[B3Digest] = set()
        kept_blobs: set[B3Digest] = set()
        starts = [r.digest for r in names] + list(keep)
        report.roots = len(starts)
        for digest in starts:
            if digest in kept_dirs:
                continue
            if await dirs.get(digest) is None:
                if await blob.has(digest):
                    kept_blobs.add(digest)
                    continue
                raise StorageError(f"kept root {digest} is neither a stored directory nor a blob; nothing deleted")
            try:
                async for dir_digest, files in _closure(dirs, digest):
                    kept_dirs.add(dir_digest)
                    kept_blobs.update(f.digest for f in files)
            except CastoreError as e:
                raise StorageError(f"the closure of kept root {digest} is damaged, nothing deleted: {e}") from e
        report.kept_directories = len(kept_dirs)
        report.kept_blobs = len(kept_blobs)
        report.missing_blobs = sum([not await blob.has(d) for d in kept_blobs])
        report.freed_directories, dir_bytes = await dirs.prune(kept_dirs, dry_run=dry_run)
        report.freed_blob_records, blob_bytes = await blob.prune(kept_blobs, dry_run=dry_run)
        report.freed_bytes = dir_bytes + blob_bytes
    return report
