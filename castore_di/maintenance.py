"""Optional maintenance roles of a service: a consistency check and a garbage collection.

A backend takes part by having the method; callers (``castore fsck``, ``castore gc``) test
for the role with ``isinstance(service, Checkable)`` and name no backend. Both reports are
plain data, cheap to import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from castore_di.digests import B3Digest

__all__ = ["Checkable", "Collectable", "Compactable", "DirectoryListing", "FsckReport", "GcReport"]


@attrs.define(kw_only=True)
class FsckReport:
    """What a check covered and what it found wrong (``problems`` empty = healthy).

    ``notes`` are facts that are not damage (e.g. unreferenced chunks a ``gc`` would remove).
    """

    chunks: int = 0
    blobs: int = 0
    directories: int = 0
    bytes_checked: int = 0
    problems: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: the counts and the verdict."""
        head = (
            f"{self.chunks} chunks, {self.blobs} blob indexes, {self.directories} directories, "
            f"{self.bytes_checked} bytes checked: "
        )
        return head + ("ok" if self.ok else f"{len(self.problems)} problems")

    def __str__(self) -> str:
        lines = [self.summary()] + [f"  {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@attrs.define(kw_only=True)
class GcReport:
    """What a garbage collection removed (or, with ``dry_run``, would remove)."""

    dry_run: bool = False
    removed: list[str] = attrs.field(factory=list)
    """Hex digests of the chunks removed."""
    removed_bytes: int = 0
    """Stored (possibly compressed) bytes of the removed chunks."""
    kept_in_flight: int = 0
    """Unreferenced chunks kept because a live writer may still commit a blob naming them."""
    dead_writers: int = 0
    """Writers that died before committing; their claims were dropped."""

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{verb} {len(self.removed)} unreferenced chunks ({self.removed_bytes} bytes stored); "
            f"kept {self.kept_in_flight} chunks of writers in progress; "
            f"{self.dead_writers} dead writers"
        )


@runtime_checkable
class Checkable(Protocol):
    """A service that can verify everything it stores."""

    async def fsck(self) -> FsckReport:
        """Read and verify the whole store; damage goes into ``problems``, never raises for it."""
        ...


@runtime_checkable
class Collectable(Protocol):
    """A service that can remove data no blob (or directory) refers to."""

    async def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove unreferenced data, safely against concurrent writers."""
        ...


@runtime_checkable
class DirectoryListing(Protocol):
    """A directory service that can list what it stores (for the referential check)."""

    def directory_digests(self) -> "AsyncIterator[B3Digest]":
        """Digests of stored directories: at least every closure root (inner ones may follow)."""
        ...


@runtime_checkable
class Compactable(Protocol):
    """A service whose storage can be rewritten to give freed space back to the file system."""

    async def compact(self) -> tuple[int, int]:
        """Rewrite the storage compactly; ``(bytes on disk before, after)``."""
        ...
