"""Importing a filesystem tree into a blob service and a directory service.

Semantics follow the reference's filesystem import: symlinks are never followed (a root
symlink becomes a :class:`~castore_di.nodes.SymlinkNode`, a root file a
:class:`~castore_di.nodes.FileNode` without any directory upload), a file is executable
when its owner-execute bit (``0o100``) is set, and special files (fifos, sockets, devices)
are refused with :class:`~castore_di.errors.UnsupportedFileTypeError` naming the path.

How it is fast: the tree is walked first with ``os.scandir`` (one ``lstat`` per file),
then a fixed pool of worker coroutines reads and uploads the files (bounded parallelism:
at most ``concurrency`` files in flight). Small files are read whole and hashed here;
when the blob is already present (``has``) the upload is skipped, so importing the same
tree twice stores nothing new. Large files stream in blocks read in worker threads.
Finally the directories go through one ``put_multiple_start`` putter, leaves first.

Measured and not kept: a reader thread handing small files to the loop in batches (to
overlap ``os.read`` with the store's work) made a stdlib import slower on this 2-core
machine, 7.1 s against 6.1 s, from GIL hand-offs; LMDB's ``writemap`` gave no gain either.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from typing import Final, Protocol, cast

import attrs
import blake3

from castore_di.blobservice.base import BlobService
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import CastoreError, StorageError, UnsupportedFileTypeError, ValidationError
from castore_di.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["ingest_path", "ImportProgress", "ImportStats", "SMALL_FILE", "DEFAULT_CONCURRENCY"]

SMALL_FILE: Final = 1 << 20  # files up to this size are read whole and checked with ``has``
DEFAULT_CONCURRENCY: Final = 32
_BLOCK: Final = 1 << 20
_O_READ: Final = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class ImportProgress(Protocol):
    """Receives progress: the totals once the walk is done, then each finished file.

    A progress object may also have ``partial(key, nbytes)``: the importer then reports the
    bytes done inside a large file while it is read (``key`` names the file; ``0`` before
    its ``advance``). A file read twice (hashed, then uploaded) counts each pass as half.
    """

    def start(self, files: int, nbytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


@attrs.define
class ImportStats:
    """What an import did; filled in as it runs."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0


def _rewrap(e: StorageError | ValidationError, context: str) -> CastoreError:
    """The same category of error with ``context`` in front of its message."""
    cls = StorageError if isinstance(e, StorageError) else ValidationError
    return cls(f"{context}: {e}")


class _File:
    __slots__ = ("path", "size", "executable")

    def __init__(self, path: str, size: int, executable: bool) -> None:
        self.path = path
        self.size = size
        self.executable = executable


# A directory's entries while walking: (name, kind, payload) where kind is "f" (payload:
# index into the file list), "l" (SymlinkNode) or "d" (index into the directory list).
_Entry = tuple[bytes, str, "int | SymlinkNode"]


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return f"unknown (mode {mode:o})"


def _symlink(path: str) -> SymlinkNode:
    try:
        target = os.readlink(os.fsencode(path))
    except OSError as e:
        raise StorageError(f"unable to read symlink {path}: {e.strerror or e}") from e
    try:
        return SymlinkNode(target)
    except ValidationError as e:
        raise ValidationError(f"{path}: {e}") from e


class _Walk:
    """The walk's result: files to upload and directories in pre-order."""

    def __init__(self) -> None:
        self.files: list[_File] = []
        self.dirs: list[list[_Entry]] = []  # pre-order: a parent before its children
        self.dir_paths: list[str] = []
        self.bytes = 0

    def scan(self, root: str) -> None:
        stack = [root]
        self.dirs.append([])
        self.dir_paths.append(root)
        indexes = [0]
        while stack:
            path = stack.pop()
            index = indexes.pop()
            entries = self.dirs[index]
            try:
                with os.scandir(path) as it:
                    found = list(it)
            except OSError as e:
                raise StorageError(f"unable to read directory {path}: {e.strerror or e}") from e
            for entry in found:
                name = os.fsencode(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise StorageError(f"unable to stat {entry.path}: {e.strerror or e}") from e
                mode = st.st_mode
                if stat.S_ISREG(mode):
                    entries.append((name, "f", len(self.files)))
                    self.files.append(_File(entry.path, st.st_size, bool(mode & 0o100)))
                    self.bytes += st.st_size
                elif stat.S_ISDIR(mode):
                    entries.append((name, "d", len(self.dirs)))
                    indexes.append(len(self.dirs))
                    self.dirs.append([])
                    self.dir_paths.append(entry.path)
                    stack.append(entry.path)
                elif stat.S_ISLNK(mode):
                    entries.append((name, "l", _symlink(entry.path)))
                else:
                    raise UnsupportedFileTypeError(entry.path, _file_type(mode))


def _hash_fd(fd: int, path: str, report: Callable[[int], None] | None = None) -> tuple[B3Digest, int]:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    size = 0
    try:
        while block := os.read(fd, 4 * _BLOCK):
            hasher.update(block)
            size += len(block)
            if report is not None:
                report(size)
    except OSError as e:
        raise StorageError(f"unable to read {path}: {e.strerror or e}") from e
    return B3Digest(hasher.digest()), size


class _Presence:
    """Decides when asking ``has`` before an upload is worth it.

    Uploading a present blob is correct (stores dedup by digest) but costs the store's
    write path; asking ``has`` first costs a hash and a lookup. While lookups keep missing
    (a fresh store) only every 16th file is checked; one hit resumes checking every file.
    """

    __slots__ = ("_misses", "_count")

    def __init__(self) -> None:
        self._misses = 0
        self._count = 0

    def should_check(self) -> bool:
        self._count += 1
        return self._misses < 64 or self._count % 16 == 0

    def record(self, present: bool) -> None:
        self._misses = 0 if present else self._misses + 1


class _Uploader:
    """Reads files and uploads their contents with at most ``concurrency`` in flight."""

    def __init__(
        self, blob: BlobService, concurrency: int, stats: ImportStats, advance: Callable[[int], None] | None,
        partial: Callable[[object, int], None] | None = None,
    ) -> None:
        self._blob = blob
        self._concurrency = max(1, concurrency)
        self._stats = stats
        self._advance = advance
        self._partial: Callable[[object, int], None] | None = partial
        self._presence = _Presence()

    async def upload_all(self, files: list[_File]) -> list[FileNode]:
        nodes: list[FileNode | None] = [None] * len(files)
        # Big files first: they take longest, so they overlap with the many small ones.
        order = sorted(range(len(files)), key=lambda i: files[i].size, reverse=True)
        it = iter(order)

        async def worker() -> None:
            for i in it:
                nodes[i] = await self.upload(files[i])

        workers = [asyncio.ensure_future(worker()) for _ in range(min(self._concurrency, len(files)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        assert all(n is not None for n in nodes)
        return nodes  # type: ignore[return-value]

    async def upload(self, f: _File) -> FileNode:
        try:
            fd = os.open(f.path, _O_READ)
        except OSError as e:
            raise StorageError(f"unable to open {f.path}: {e.strerror or e}") from e
        try:
            if f.size <= SMALL_FILE:
                data = self._read_small(fd, f)
                if data is not None:
                    digest = await self._put_small(data, f)
                    size = len(data)
                else:
                    digest, size = await self._stream(fd, f)
            else:
                digest, size = await self._put_large(fd, f)
        finally:
            os.close(fd)
        self._stats.files += 1
        self._stats.bytes += size
        if self._partial is not None:
            self._partial(f.path, 0)
        if self._advance is not None:
            self._advance(size)
        return FileNode(digest, size, f.executable)

    @staticmethod
    def _read_small(fd: int, f: _File) -> bytes | None:
        """The whole file, or ``None`` when it grew past the small-file limit meanwhile."""
        try:
            data = os.read(fd, f.size + 1)
            if len(data) <= f.size:
                return data  # a short read of a regular file is its end
            rest = os.read(fd, SMALL_FILE)
            if len(data) + len(rest) > SMALL_FILE:
                os.lseek(fd, 0, os.SEEK_SET)
                return None
            while rest:
                data += rest
                rest = os.read(fd, SMALL_FILE)
            return data
        except OSError as e:
            raise StorageError(f"unable to read {f.path}: {e.strerror or e}") from e

    async def _put_small(self, data: bytes, f: _File) -> B3Digest:
        check = self._presence.should_check()
        digest = blake3_digest(data) if check else None
        try:
            if digest is not None:
                present = await self._blob.has(digest)
                self._presence.record(present)
                if present:
                    return digest
            stored = await self._blob.put(data)
        except StorageError as e:
            raise StorageError(f"unable to upload {f.path}: {e}") from e
        if digest is not None and stored != digest:  # a backend that hashes differently is broken
            raise StorageError(f"blob service returned digest {stored} for {f.path}, expected {digest}")
        self._stats.uploaded_files += 1
        self._stats.uploaded_bytes += len(data)
        return stored

    async def _put_large(self, fd: int, f: _File) -> tuple[B3Digest, int]:
        # Hashing in a worker thread (blake3 releases the GIL) is far cheaper than an
        # upload, so a large file already present costs one read and no write.
        partial = self._partial
        report = (lambda n: partial(f.path, n // 2)) if partial is not None else None
        digest, size = await asyncio.to_thread(_hash_fd, fd, f.path, report)
        try:
            if await self._blob.has(digest):
                return digest, size
        except StorageError as e:
            raise StorageError(f"unable to upload {f.path}: {e}") from e
        os.lseek(fd, 0, os.SEEK_SET)
        stored, size = await self._stream(fd, f, halves=True)
        if stored != digest:
            raise StorageError(f"{f.path} changed while it was imported")
        return stored, size

    async def _stream(self, fd: int, f: _File, halves: bool = False) -> tuple[B3Digest, int]:
        writer = self._blob.open_write()
        size = 0
        try:
            while True:
                try:
                    block = await asyncio.to_thread(os.read, fd, _BLOCK)
                except OSError as e:
                    raise StorageError(f"unable to read {f.path}: {e.strerror or e}") from e
                if not block:
                    break
                size += len(block)
                await writer.write(block)
                if self._partial is not None:
                    self._partial(f.path, f.size // 2 + size // 2 if halves else size)
        except BaseException:
            await writer.abort()
            raise
        try:
            digest = await writer.close()
        except StorageError as e:
            raise StorageError(f"unable to finalize blob {f.path}: {e}") from e
        self._stats.uploaded_files += 1
        self._stats.uploaded_bytes += size
        return digest, size


async def ingest_path(
    blob: BlobService,
    dirs: DirectoryService,
    path: str | os.PathLike[str],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: ImportProgress | None = None,
    stats: ImportStats | None = None,
) -> tuple[bytes, Node]:
    """Import ``path`` and return its name (the basename, as bytes) and its root node.

    Args:
        blob: where file contents go.
        dirs: where directories go (one closure, leaves first).
        path: a directory, a regular file or a symlink (not followed).
        concurrency: the most files read and uploaded at once.
        progress: told the totals after the walk and each finished file.
        stats: filled in with counts as the import runs.

    Raises:
        UnsupportedFileTypeError: a fifo, socket or device in the tree.
        StorageError: a file cannot be read or a service fails.
    """
    root = os.fspath(path)
    stats = stats if stats is not None else ImportStats()
    name = os.fsencode(os.path.basename(os.path.normpath(root)))
    try:
        st = os.lstat(root)
    except OSError as e:
        raise StorageError(f"unable to stat {root}: {e.strerror or e}") from e
    advance = progress.advance if progress is not None else None
    uploader = _Uploader(blob, concurrency, stats, advance, getattr(progress, "partial", None))

    if stat.S_ISLNK(st.st_mode):
        stats.symlinks += 1
        return name, _symlink(root)
    if stat.S_ISREG(st.st_mode):
        if progress is not None:
            progress.start(1, st.st_size)
        return name, await uploader.upload(_File(root, st.st_size, bool(st.st_mode & 0o100)))
    if not stat.S_ISDIR(st.st_mode):
        raise UnsupportedFileTypeError(root, _file_type(st.st_mode))

    walk = _Walk()
    walk.scan(root)
    if progress is not None:
        progress.start(len(walk.files), walk.bytes)
    file_nodes = await uploader.upload_all(walk.files)

    # Reversed pre-order puts every directory after all of its descendants.
    built: list[DirectoryNode | None] = [None] * len(walk.dirs)
    putter = dirs.put_multiple_start()
    for index in range(len(walk.dirs) - 1, -1, -1):
        pairs: list[tuple[bytes, Node]] = []
        for entry_name, kind, payload in walk.dirs[index]:
            if kind == "f":
                pairs.append((entry_name, file_nodes[cast(int, payload)]))
            elif kind == "d":
                child = built[cast(int, payload)]
                assert child is not None
                pairs.append((entry_name, child))
            else:
                pairs.append((entry_name, cast(SymlinkNode, payload)))
                stats.symlinks += 1
        try:
            directory = Directory(pairs)
        except ValidationError as e:
            raise ValidationError(f"cannot import directory {walk.dir_paths[index]}: {e}") from e
        try:
            await putter.put(directory)
        except (StorageError, ValidationError) as e:
            raise _rewrap(e, f"failed to upload directory at {walk.dir_paths[index]}") from e
        built[index] = directory.as_node()
        stats.directories += 1
    try:
        root_digest = await putter.close()
    except (StorageError, ValidationError) as e:
        raise _rewrap(e, "failed to finalize directory upload") from e
    root_node = built[0]
    assert root_node is not None and root_node.digest == root_digest
    return name, root_node
