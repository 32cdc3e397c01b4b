"""The referential check of ``castore fsck``: do the directories' references resolve?

For a blob service and a directory service together, every file node's blob must exist
with the node's size and every child directory must exist, so each closure is complete.
This is what a ``combined``/``cache`` setup that lost its remote, or a store filled by
copying directories without their blobs, gets wrong while each service alone is healthy.

The directories checked are every one the directory service lists
(:class:`~castore_di.maintenance.DirectoryListing`) and the closures of the roots given.
It works on any pair of services, remote ones included: only ``get``, ``get_recursive``
and the blob service's ``chunks``/``open_read`` are used, each blob asked about once.
"""

from __future__ import annotations

from collections import deque

import attrs

from castore_di.blobservice.base import BlobService
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import IntegrityError, StorageError
from castore_di.maintenance import DirectoryListing
from castore_di.nodes import Directory

__all__ = ["RefReport", "blob_size", "check_references"]


@attrs.define(kw_only=True)
class RefReport:
    """What the referential check walked and the dangling references it found."""

    directories: int = 0
    blobs: int = 0
    listed: bool = False
    problems: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"references: {self.directories} directories, {self.blobs} blobs checked: "
        return head + ("ok" if self.ok else f"{len(self.problems)} dangling")


async def blob_size(blobs: BlobService, digest: B3Digest) -> int | None:
    """The size of a stored blob without reading it where the service can say; None if absent."""
    sized = getattr(blobs, "stat_size", None)
    if sized is not None:
        size: int | None = await sized(digest)
        return size
    chunks = await blobs.chunks(digest)
    if chunks is None:
        return None
    if chunks:
        return sum(c.size for c in chunks)
    reader = await blobs.open_read(digest)
    if reader is None:
        return None
    async with reader:
        return reader.size


def _name(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


async def check_references(
    blobs: BlobService | None, dirs: DirectoryService, roots: list[B3Digest] | None = None
) -> RefReport:
    """Walk the listed directories and the closures of ``roots``; report each dangling reference.

    Problems read ``dir b3:… entry "x": blob b3:… missing``. Damage the walk meets (a
    directory that does not verify) is reported too, never raised.
    """
    report = RefReport()
    seen: dict[B3Digest, Directory] = {}
    sizes: dict[B3Digest, int | None] = {}
    queue: deque[B3Digest] = deque(roots or ())
    if isinstance(dirs, DirectoryListing):
        report.listed = True
        async for digest in dirs.directory_digests():
            queue.append(digest)
    while queue:
        start = queue.popleft()
        if start in seen:
            continue
        # the closure through get_recursive: backends that serve only closure roots by
        # ``get`` still give every inner directory this way
        try:
            async for directory in dirs.get_recursive(start):
                seen.setdefault(directory.digest, directory)
        except (StorageError, IntegrityError) as e:
            report.problems.append(f"closure of {start}: {e}")
        if start not in seen:
            try:
                got = await dirs.get(start)
            except (StorageError, IntegrityError) as e:
                report.problems.append(f"dir {start}: {e}")
                continue
            if got is None:
                if roots and start in roots:
                    report.problems.append(f"root {start}: directory missing")
                continue
            seen[start] = got
    for digest, directory in seen.items():
        for name, node in directory.directories():
            if node.digest not in seen:
                try:
                    child = await dirs.get(node.digest)
                except (StorageError, IntegrityError) as e:
                    report.problems.append(f"dir {digest} entry \"{_name(name)}\": directory {node.digest}: {e}")
                    continue
                if child is None:
                    report.problems.append(
                        f"dir {digest} entry \"{_name(name)}\": directory {node.digest} missing"
                    )
        if blobs is None:
            continue
        for name, f in directory.files():
            if f.digest not in sizes:
                try:
                    sizes[f.digest] = await blob_size(blobs, f.digest)
                except (StorageError, IntegrityError) as e:
                    report.problems.append(f"dir {digest} entry \"{_name(name)}\": blob {f.digest}: {e}")
                    sizes[f.digest] = f.size  # reported once
                    continue
            size = sizes[f.digest]
            if size is None:
                report.problems.append(f"dir {digest} entry \"{_name(name)}\": blob {f.digest} missing")
            elif size != f.size:
                report.problems.append(
                    f"dir {digest} entry \"{_name(name)}\": blob {f.digest} has {size} bytes, the entry says {f.size}"
                )
    report.directories = len(seen)
    report.blobs = len(sizes)
    return report
