"""Read-only access to a stored tree by path: the shared core of ``castore mount`` and fsspec.

Directories are fetched on first use and kept in a bounded LRU cache (a Directory is
immutable under its digest, so a cached one never goes stale). Paths resolve inside the
tree: ``.`` and ``..`` are handled, relative symlinks are followed (at most
:data:`MAX_SYMLINKS` hops), and a path that leaves the tree or an absolute symlink target
does not resolve. File contents are read through :class:`FileReader`, which fetches only
the chunks a read needs and verifies each one.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import os
from collections import OrderedDict
from typing import Final

from castore_di.blobservice.base import BlobReader, BlobService, ChunkMeta
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import IntegrityError, StorageError
from castore_di.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["TreeView", "FileReader", "MAX_SYMLINKS", "PathError"]

MAX_SYMLINKS: Final = 40  # as Linux's ELOOP limit
_CHUNK_CACHE: Final = 4  # chunks kept per open file: a sequential read reuses the current one


class PathError(OSError):
    """A path that does not resolve in the tree; ``errno`` says why (ENOENT, ENOTDIR, ELOOP)."""

    def __init__(self, code: int, path: str) -> None:
        super().__init__(code, os.strerror(code), path)


class TreeView:
    """Path lookups in the trees of one directory service, with a shared directory cache."""

    def __init__(self, blob: BlobService, dirs: DirectoryService, *, cache_size: int = 4096) -> None:
        self.blob = blob
        self.dirs = dirs
        self._cache: OrderedDict[B3Digest, Directory] = OrderedDict()
        self._cache_size = cache_size

    async def directory(self, digest: B3Digest) -> Directory:
        """The directory (cached); a missing one is a store inconsistency (:class:`StorageError`)."""
        found = self._cache.get(digest)
        if found is not None:
            self._cache.move_to_end(digest)
            return found
        directory = await self.dirs.get(digest)
        if directory is None:
            raise StorageError(f"directory {digest} does not exist")
        self._cache[digest] = directory
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return directory

    async def root(self, digest: B3Digest) -> DirectoryNode:
        """The root node of a stored tree; :class:`PathError` (ENOENT) when it is not stored."""
        if digest not in self._cache and await self.dirs.get(digest) is None:
            raise PathError(errno.ENOENT, str(digest))
        return (await self.directory(digest)).as_node()

    async def resolve(self, root: B3Digest, path: str | bytes, *, follow: bool = True) -> Node:
        """The node at ``path`` (``a/b/c``) below ``root``.

        Symlinks on the way are followed; the last component's only when ``follow``.

        Raises:
            PathError: ENOENT (nothing there, the path leaves the tree, an absolute or dangling
                symlink), ENOTDIR (a file on the way), ELOOP (too many symlinks).
        """
        shown = os.fsdecode(path)
        pending = [p for p in os.fsencode(path).split(b"/") if p and p != b"."]
        pending.reverse()  # a stack: the next component last
        stack: list[Node] = [await self.root(root)]
        hops = 0
        while pending:
            part = pending.pop()
            if part == b"..":
                if len(stack) == 1:
                    raise PathError(errno.ENOENT, shown)
                stack.pop()
                continue
            current = stack[-1]
            if type(current) is not DirectoryNode:
                raise PathError(errno.ENOTDIR, shown)
            child = (await self.directory(current.digest)).get(part)
            if child is None:
                raise PathError(errno.ENOENT, shown)
            if type(child) is SymlinkNode and (pending or follow):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise PathError(errno.ELOOP, shown)
                if child.target.startswith(b"/"):
                    raise PathError(errno.ENOENT, shown)  # points outside the tree
                pending.extend(reversed([p for p in child.target.split(b"/") if p and p != b"."]))
                continue
            stack.append(child)
        return stack[-1]

    async def open_file(self, node: FileNode) -> "FileReader":
        """A random-access reader of a file's contents."""
        chunks = await self.blob.chunks(node.digest)
        if chunks is None:
            raise StorageError(f"blob {node.digest} does not exist")
        return FileReader(self.blob, node, chunks)


class FileReader:
    """Random reads of one blob: only the chunks a read touches are fetched, each verified.

    A blob stored whole (no chunk list) is read through the service's seekable reader,
    which verifies it. Safe to use from concurrent tasks.
    """

    def __init__(self, blob: BlobService, node: FileNode, chunks: list[ChunkMeta]) -> None:
        self._blob = blob
        self.node = node
        self._chunks = chunks
        self._offsets: list[int] = []
        total = 0
        for c in chunks:
            self._offsets.append(total)
            total += c.size
        if chunks and total != node.size:
            raise IntegrityError(f"blob {node.digest}: chunks add up to {total} bytes, the node says {node.size}")
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._reader: BlobReader | None = None
        self._lock = asyncio.Lock()
        self.fetched: list[B3Digest] = []  # chunk digests fetched so far (for tests and stats)

    @property
    def size(self) -> int:
        return self.node.size

    async def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (``b""`` at or past the end)."""
        end = min(self.node.size, offset + max(length, 0))
        if offset >= end:
            return b""
        if not self._chunks:
            async with self._lock:
                if self._reader is None:
                    self._reader = await self._blob.open_read(self.node.digest)
                    if self._reader is None:
                        raise StorageError(f"blob {self.node.digest} does not exist")
                await self._reader.seek(offset)
                return await self._reader.read(end - offset)
        first = bisect.bisect_right(self._offsets, offset) - 1
        parts: list[bytes] = []
        index = first
        pos = offset
        while pos < end:
            data = await self._chunk(index)
            start = pos - self._offsets[index]
            piece = data[start : start + (end - pos)]
            parts.append(piece)
            pos += len(piece)
            index += 1
        return b"".join(parts)

    async def _chunk(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        meta = self._chunks[index]
        reader = await self._blob.open_read(meta.digest)
        if reader is None:
            raise StorageError(f"blob {self.node.digest}: chunk #{index} {meta.digest} is missing")
        async with reader:
            data = await reader.read()
        # Verified here too: the whole-blob reader of some backends trusts its own chunk store.
        if len(data) != meta.size or blake3_digest(data) != meta.digest:
            raise IntegrityError(f"blob {self.node.digest}: chunk #{index} {meta.digest} is corrupted")
        self.fetched.append(meta.digest)
        self._cache[index] = data
        if len(self._cache) > _CHUNK_CACHE:
            self._cache.popitem(last=False)
        return data

    async def close(self) -> None:
        self._cache.clear()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
